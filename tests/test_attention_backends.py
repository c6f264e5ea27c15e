"""diffusers' attention dispatcher: sites stay visible to the recognizers under the CPU-capable backends."""
import json

import pytest
import torch

from tiny_models import wan

pytestmark = pytest.mark.usefixtures("eager_pieces")


@pytest.mark.parametrize("attention_backend", ["native", "_native_math"])
def test_sites_are_found_and_go_sparse_under_the_attention_backend(attention_backend, tmp_path):
    model, inputs = wan(head_dim=64)
    model.set_attention_backend(attention_backend)
    compiled = torch.compile(model, backend="vsparse", fullgraph=True,
                             options=dict(sparsity="draft", density=1.0, block_size=64, dense_layers=0,
                                          dump_dir=str(tmp_path)))
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs)[0], model(**inputs)[0], rtol=1e-4, atol=1e-5)
    (graph,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    sites = json.loads((graph / "analysis.json").read_text())["sites"]
    assert [(s["self_attention"], s["rewritten"]) for s in sites] == [(True, True), (False, False)] * 2


@pytest.mark.gpu
@pytest.mark.parametrize("attention_backend", ["_native_cudnn", "_native_flash", "_native_efficient"])
def test_cuda_attention_backends_are_found_and_go_sparse(attention_backend, tmp_path):
    """The CUDA-only backends (run with `pytest -m gpu tests/test_attention_backends.py` on the lent GPU)."""
    model, inputs = wan(head_dim=64)
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
              for k, v in inputs.items()}
    model.set_attention_backend(attention_backend)
    compiled = torch.compile(model, backend="vsparse", fullgraph=True,
                             options=dict(sparsity="draft", density=1.0, block_size=64, dense_layers=0,
                                          dump_dir=str(tmp_path)))
    with torch.no_grad():
        out, expected = compiled(**inputs)[0].float(), model(**inputs)[0].float()
    assert ((out - expected).norm() / expected.norm()).item() < 2e-2
    (graph,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    sites = json.loads((graph / "analysis.json").read_text())["sites"]
    assert any(s["rewritten"] for s in sites), [s["decision_reason"] for s in sites]
