"""passes/shared_values.py: a value computed before the blocks and read by several of them is written out once, by
`vsparse::materialize`; values one block reads, and broadcast views, are left alone."""
import pytest
import torch

import dit_compiler.backend as backend
from dit_compiler.kernels import materialize
from graph_passes import compile_dumped
from tiny_models import hunyuan, wan


def test_materialize_is_a_contiguous_copy():
    x = torch.randn(3, 4, 5).transpose(0, 2)
    y = materialize(x)
    assert y.is_contiguous() and torch.equal(y, x) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("sparsity", ["none", "draft"])
def test_wan_writes_its_rope_tables_text_and_timestep_projection_once(tmp_path, sparsity, monkeypatch):
    """Wan's blocks share four values: the two RoPE tables, the text embedding and the timestep projection. Under
    Draft the tables reach the blocks through its token order's gathers, our own op: only the other two are copied.
    The outputs are those of the same compile without the pass."""
    model, inputs = wan(frames=3, height=16, width=20, layers=3, head_dim=64)  # Draft: whole 64-token windows
    options = dict(sparsity=sparsity, cache="none")
    if sparsity == "draft":
        options.update(density=0.5, block_size=64, dense_layers=0, dense_steps=0.0, force_sparse=True)
    got, _, notes, rewritten = compile_dumped(model, inputs, tmp_path / "pass", **options)
    monkeypatch.setattr(backend, "materialize_shared_values", lambda gm, analysis: 0)
    expected, _, _, _ = compile_dumped(model, inputs, tmp_path / "without", **options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    copies = 4 if sparsity == "none" else 2
    assert f"{copies} values the blocks share written out once" in notes, notes
    assert rewritten.count("= torch.ops.vsparse.materialize.default(") == copies


def test_hunyuan_with_two_stacks_and_the_cache_keeps_its_output(tmp_path):
    model, inputs = hunyuan(layers=2, single_layers=2)
    got, expected, notes, rewritten = compile_dumped(model, inputs, tmp_path, sparsity="none", cache="easycache",
                                                     force_cache=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert any(n.endswith("values the blocks share written out once") for n in notes), notes
