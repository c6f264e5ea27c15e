"""passes/move_permutation.py: Draft's window order moved out of the sparse sites of a tiny diffusers Wan model."""
import operator
import re

import pytest
import torch

import dit_compiler.backend as backend
from dit_compiler import patterns
from dit_compiler.options import parse_options
from dit_compiler.passes.move_permutation import move_permutations
from dit_compiler.passes.sparse_attention import rewrite_sparse_attention, sparse_attention
from tiny_models import wan

# 2 x 8 x 16 = 256 tokens in 64-token blocks (8 x 8 windows, two per frame, so the window order is no identity),
# heads of 64: the sites go sparse at density 0.5 (2 of 4 key blocks).
OPTIONS = dict(sparsity="draft", density=0.5, block_size=64, force_sparse=True, dense_layers=0, dense_steps=0)


def tiny_wan():
    return wan(frames=2, height=16, width=32, head_dim=64)


def test_the_window_order_moves_tokens():
    from dit_compiler.passes.planners.draft import window_permutation

    perm, _ = window_permutation(2, 8, 16, 0, 0, OPTIONS["block_size"])
    assert not torch.equal(perm, torch.arange(perm.numel()))


def captured(model, inputs):
    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(**inputs)
    return graphs[0]


def rewritten(gm, example_inputs, move=True):
    """The backend's rewrite of `gm` (a copy), with or without the move; (graph, notes per sparse call)."""
    gm = backend.copy_graph_module(gm)
    analysis = patterns.analyze(gm, example_inputs)
    decisions, _, _ = rewrite_sparse_attention(gm, analysis, parse_options(OPTIONS), None, torch.device("cpu"))
    assert sum(d.rewritten for d in decisions) == 2
    notes = move_permutations(gm, example_inputs, analysis.timestep_input) if move else {}
    return gm, notes


def sparse_calls(gm):
    return [n for n in gm.graph.nodes if n.target is sparse_attention]


def is_gather(node, index_name):
    return node.target is torch.index_select and node.args[1] == 1 and index_name in node.args[2].target


def run(gm, example_inputs):
    with torch.no_grad():
        return gm(*example_inputs)


def test_moved_permutation_gives_the_same_output(eager_pieces, monkeypatch):
    model, inputs = tiny_wan()
    outputs, notes = {}, {}

    def recording(gm, *args):
        notes.update(move_permutations(gm, *args))
        return notes

    for move in (True, False):
        monkeypatch.setattr(backend, "move_permutations", recording if move else lambda gm, *args: {})
        torch._dynamo.reset()
        with torch.no_grad():
            outputs[move] = torch.compile(model, backend="vsparse", options=OPTIONS, fullgraph=True)(**inputs)[0]
    with torch.no_grad():
        dense = model(**inputs)[0]
    assert not torch.allclose(outputs[True], dense, atol=1e-3)  # the sites are sparse
    assert len(notes) == 2 and all("inputs gathered once" in n and "restored at" in n for n in notes.values())
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-6)


def test_gathers_sit_at_the_projections_input_and_the_residual_add():
    model, inputs = tiny_wan()
    gm, example_inputs = captured(model, inputs)
    moved, notes = rewritten(gm, example_inputs)
    for call in sparse_calls(moved):
        assert call.kwargs["permute_inputs"] is False and call.kwargs["restore_order"] is False
        assert "inputs gathered once" in notes[call.name] and "restored at" in notes[call.name]
        for operand in call.args[:3]:  # q, k, v reach the site without a gather of their own
            assert operand.target is not torch.index_select
    projections = [n for n in moved.graph.nodes if n.target is torch._C._nn.linear
                   and re.fullmatch(r"blocks\.\d\.attn1\.to_[qkv]", patterns.graph.module_path(n))]
    inputs_of = {p.args[0] for p in projections}
    assert len(projections) == 6 and len(inputs_of) == 2  # one gather per site, shared by to_q, to_k and to_v
    assert all(is_gather(x, "perm") and not is_gather(x.args[0], "perm") for x in inputs_of)
    for call in sparse_calls(moved):
        out = next(u for u in call.users if u.args[1] == 0)
        assert all(u.target is not torch.index_select for u in out.users)  # the output leaves in window order
    residual_adds = [n for n in moved.graph.nodes if n.target is operator.add
                     and any(isinstance(a, torch.fx.Node) and is_gather(a, "inverse") for a in n.args)]
    assert len(residual_adds) == 2
    reference, _ = rewritten(gm, example_inputs, move=False)
    torch.testing.assert_close(run(moved, example_inputs), run(reference, example_inputs), rtol=1e-5, atol=1e-6)


def _first(gm, predicate):
    return next(n for n in gm.graph.nodes if predicate(n))


def test_a_second_user_keeps_the_inputs_gathered_in_the_site():
    """A value of the q chain also read elsewhere cannot be in window order for both readers."""
    model, inputs = tiny_wan()
    gm, example_inputs = captured(model, inputs)
    norm_q = _first(gm, lambda n: n.target is torch.rms_norm and patterns.graph.module_path(n) == "blocks.0.attn1.norm_q")
    output = gm.graph.output_node()
    with gm.graph.inserting_before(output):
        extra = gm.graph.call_method("sum", (norm_q, 1))
    extra.meta["example_value"] = norm_q.meta["example_value"].sum(1)
    output.args = (tuple(output.args[0]) + (extra,),)
    gm.recompile()
    moved, notes = rewritten(gm, example_inputs)
    first, second = sparse_calls(moved)
    assert f"{norm_q.name} is also read by sum" in notes[first.name]
    assert "permute_inputs" not in first.kwargs  # today's replacement: q, k, v gathered in the site
    assert "restored at" in notes[first.name] and second.kwargs["permute_inputs"] is False
    reference, _ = rewritten(gm, example_inputs, move=False)
    for a, b in zip(run(moved, example_inputs), run(reference, example_inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_token_reduction_stops_the_output_where_it_is_read():
    """A softmax over the tokens after the output projection: the output is restored before it."""
    model, inputs = tiny_wan()
    gm, example_inputs = captured(model, inputs)
    to_out = _first(gm, lambda n: n.target is torch._C._nn.linear
                    and patterns.graph.module_path(n) == "blocks.0.attn1.to_out.0")
    with gm.graph.inserting_after(to_out):
        softmax = gm.graph.call_function(torch.softmax, (to_out, 1))
    softmax.meta["example_value"] = to_out.meta["example_value"]
    to_out.replace_all_uses_with(softmax, delete_user_cb=lambda user: user is not softmax)
    gm.recompile()
    moved, notes = rewritten(gm, example_inputs)
    first = sparse_calls(moved)[0]
    assert f"restored at {to_out.name} ({softmax.name} (softmax) does not keep the tokens whole" in notes[first.name]
    restore = _first(moved, lambda n: is_gather(n, "inverse"))
    assert restore.args[0].name == to_out.name and [u.name for u in restore.users] == [softmax.name]
    reference, _ = rewritten(gm, example_inputs, move=False)
    torch.testing.assert_close(run(moved, example_inputs), run(reference, example_inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("planner", ["svg", "dual"])
def test_a_per_call_order_stays_in_the_site(planner):
    model, inputs = tiny_wan()
    gm, example_inputs = captured(model, inputs)
    gm = backend.copy_graph_module(gm)
    analysis = patterns.analyze(gm, example_inputs)
    rewrite_sparse_attention(gm, analysis, parse_options(dict(OPTIONS, sparsity=planner)), None,
                             torch.device("cpu"))
    notes = move_permutations(gm, example_inputs, analysis.timestep_input)
    assert all("kept in the site" in note for note in notes.values()) and len(notes) == 2
    assert all("permute_inputs" not in c.kwargs for c in sparse_calls(gm))
