"""benchmarks/site_breakdown.py on a CPU at a tiny grid: every variant compiles and runs, and the `moved` twin's
graph really has Draft's permutation moved out of the site (the in-site twin's keeps it inside)."""
import importlib.util
import json
import operator
import sys
from pathlib import Path

import torch

import dit_compiler.backend as backend
from dit_compiler.passes.sparse_attention import sparse_attention

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("site_breakdown", ROOT / "benchmarks" / "site_breakdown.py")
site_breakdown = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = site_breakdown
spec.loader.exec_module(site_breakdown)


def gathers(gm, index):
    return [n for n in gm.graph.nodes if n.target is torch.index_select and index in n.args[2].target]


def test_the_moved_twin_has_the_gathers_outside_the_site(tmp_path, monkeypatch):
    graphs = []  # what the backend hands Inductor: the in-site twin's, then the moved one's
    compile_piece = backend.compile_piece
    monkeypatch.setattr(backend, "compile_piece", lambda gm, *args: graphs.append(gm) or compile_piece(gm, *args))
    out = tmp_path / "site.json"
    # 1 x 16 x 32 tokens in 128-token blocks: Draft's window order is no identity there.
    monkeypatch.setattr(sys, "argv", ["site_breakdown", "--device", "cpu", "--grid", "1", "16", "32", "--planners",
                                      "draft", "--densities", "0.5", "--budget-ms", "1", "--out", str(out)])
    site_breakdown.main()
    (row,) = json.loads(out.read_text())["sites"]
    assert "inputs gathered once at" in row["moved"] and "restored at" in row["moved"]
    assert all(isinstance(row[key], float) for key in ("layer_in_site_ms", "layer_moved_ms", "permutation_moved_us",
                                                       "site_share_moved"))
    in_site, moved = graphs
    (kept,), (call,) = ([n for n in gm.graph.nodes if n.target is sparse_attention] for gm in graphs)
    assert "permute_inputs" not in kept.kwargs and not gathers(in_site, "perm") and not gathers(in_site, "inverse")
    assert call.kwargs["permute_inputs"] is False and call.kwargs["restore_order"] is False
    # One gather of the projections' input, read by to_q, to_k and to_v; the others gather the RoPE tables' slices
    # (cos[..., 0::2] and sin[..., 1::2] for q and again for k); one gather of the output, before the residual add.
    perm = gathers(moved, "perm")
    assert [sum(u.target is torch._C._nn.linear for u in g.users) for g in perm] == [3, 0, 0, 0, 0]
    assert all(g.args[0].target is operator.getitem for g in perm[1:])
    (restore,) = gathers(moved, "inverse")
    assert [u.target for u in restore.users] == [operator.add]
