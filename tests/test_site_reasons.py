"""The reason a site stays dense names what its queries, keys and values really come from."""
import json

import torch

import tiny_models
from dit_compiler import backend


def test_positional_queries_and_keys_are_not_called_text(tmp_path, monkeypatch):
    # Recognition and rewrite only: the pieces run eagerly instead of through Inductor.
    monkeypatch.setattr(backend, "compile_piece", lambda gm, example_inputs, config: gm.forward)
    model, inputs = tiny_models.positional_qk()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vsparse", fullgraph=True,
                             options=dict(sparsity="draft", dense_layers=0, dump_dir=str(tmp_path)))
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs)[0], model(**inputs)[0])
    (graph_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    (site,) = json.loads((graph_dir / "analysis.json").read_text())["sites"]
    reason = site["decision_reason"]
    assert not site["rewritten"] and not site["self_attention"]
    assert "text" not in reason, reason
    q, k, v = reason.split("q from ")[1].split(", k from ")[0], reason.split("k from ")[1].split(", v from ")[0], \
        reason.split("v from ")[1]
    assert q.startswith("positions (") and k.startswith("positions ("), reason
    assert not v.startswith("positions"), reason
