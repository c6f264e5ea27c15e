"""Regional compilation: `dit_compiler.compile_repeated_blocks` (sparse, from a whole-model analysis) and diffusers'
`compile_repeated_blocks(backend="vsparse")` (dense, with the reason). Pieces run eagerly except in the one Inductor
test: what is checked here is recognition, placement and run-time state."""
import gc
import logging

import pytest
import torch

import dit_compiler
import dit_compiler.backend as backend
from dit_compiler.runtime.runner import runners
from tiny_models import cogvideox, wan


def run(model, inputs, t=None):
    if t is not None:
        inputs = dict(inputs, timestep=torch.full_like(inputs["timestep"], t))
    with torch.no_grad():
        return model(**inputs)[0]


def records(model):
    """(sparse site names, [call record as a list]) per call history of `model`, in the order they were made."""
    gc.collect()  # histories of an earlier set-up of the model go with it
    params = list(model.parameters())
    found = []
    for runner in runners():
        for state in runner.states.find(params):
            found.append((list(runner.outputs.site_names), [r.vector.tolist() for r in state.history]))
    return found


@pytest.fixture
def compiles(eager_pieces, monkeypatch):
    """The graphs handed to compile_piece (eagerly run), counted."""
    handed = []

    def compile_piece(gm, example_inputs, config):
        handed.append(gm)
        return gm

    monkeypatch.setattr(backend, "compile_piece", compile_piece)
    return handed


def self_attention_sites(model, inputs):
    """The whole model's video self-attention site names per layer, from vsparse's whole-model analysis."""
    from dit_compiler import patterns

    captured = []

    def record(gm, example_inputs):
        captured.append(patterns.analyze(gm, example_inputs))
        return gm.forward

    run(torch.compile(model, backend=record, fullgraph=True), inputs)
    torch._dynamo.reset()
    return {s.layer: s.node for s in captured[0].sites if s.eligible}


@pytest.mark.parametrize("build", [wan, cogvideox])
def test_sites_go_sparse_and_density_one_equals_eager(build, compiles):
    """Wan (video only; declares `_repeated_blocks`) and CogVideoX (text before the video; names none, so the blocks
    come from the recognized stack): every block past dense_layers runs the sparse op with the whole model's
    layout, all blocks share one sparse and one dense artifact, and density 1 is eager's output."""
    model, inputs = build(head_dim=64, frames=3, height=10, width=14, layers=3)
    expected = run(model, inputs)
    sites = self_attention_sites(model, inputs)
    assert dit_compiler.compile_repeated_blocks(model, density=1.0, block_size=64, dense_steps=0.0) is model
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = run(model, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert sum(e.name == "vsparse::block_sparse_attention" for e in prof.events()) == 2
    assert len(compiles) == 2  # blocks.0 dense (dense_layers=1), blocks 1 and 2 share the sparse graph
    ((names, calls),) = records(model)
    assert names == [sites[1], sites[2]]
    assert calls[0][1:] == [0.0, 1.0, 1.0]  # not dense, each sparse site visits every block at density 1


@pytest.mark.parametrize("build", [wan, cogvideox])
def test_sparse_output_equals_the_whole_model_compile(build, compiles):
    """At density 0.25 the blocks compute what `torch.compile(backend="vsparse")` of the whole model computes (same
    layouts, planner and masks), and stay near dense."""
    model, inputs = build(head_dim=64, frames=3, height=16, width=16, layers=2, seed=1)
    twin, _ = build(head_dim=64, frames=3, height=16, width=16, layers=2, seed=1)
    options = dict(density=0.25, block_size=64, dense_steps=0.0, dense_layers=0)
    whole = run(torch.compile(twin, backend="vsparse", options=options, fullgraph=True), inputs)
    dense = run(model, inputs)
    dit_compiler.compile_repeated_blocks(model, **options)
    out = run(model, inputs)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out, dense)  # sparse did drop blocks
    assert (out - dense).norm() / dense.norm() < 0.1
    ((_, calls),) = records(model)
    assert all(d < 1 for d in calls[0][2:])


def test_dense_steps_from_the_timestep_without_recompiles(compiles):
    """The dense phase is computed from the model's timestep in the pre-hook and fed to the shared block graph: the
    early calls run full masks, the later ones sparse, with no second compile."""
    model, inputs = wan(head_dim=64, frames=3, height=16, width=16, layers=2)
    dit_compiler.compile_repeated_blocks(model, density=0.25, block_size=64, dense_steps=0.25, dense_layers=0)
    for t in (900.0, 800.0, 700.0, 100.0):
        run(model, inputs, t)
    assert len(compiles) == 1
    ((_, calls),) = records(model)
    assert [c[0] for c in calls] == [900.0, 800.0, 700.0, 100.0]
    assert [c[1] for c in calls] == [1.0, 1.0, 0.0, 0.0]  # dense while t > 750
    # What the blocks ran: every key block in the dense phase, a share of them after.
    assert [[d == 1.0 for d in c[2:]] for c in calls] == [[True, True]] * 2 + [[False, False]] * 2
    rows = dit_compiler.stats(model)
    assert [(r["calls"], r["dense_calls"]) for r in rows] == [(4, 2)]


def test_dense_layers_keep_leading_blocks_dense(compiles):
    model, inputs = wan(head_dim=64, frames=2, height=8, width=8, layers=3)
    sites = self_attention_sites(model, inputs)
    expected = run(model, inputs)
    dit_compiler.compile_repeated_blocks(model, density=1.0, block_size=64, dense_steps=0.0, dense_layers=2)
    torch.testing.assert_close(run(model, inputs), expected, rtol=1e-4, atol=1e-5)
    ((names, _),) = records(model)
    assert names == [sites[2]]
    dit_compiler.compile_repeated_blocks(model, density=1.0, block_size=64, dense_steps=0.0, dense_layers=0)
    run(model, inputs)
    assert [n for n, _ in records(model)] == [[sites[0], sites[1], sites[2]]]  # the earlier set-up is gone


def test_two_models_of_one_class_keep_their_own_state(compiles):
    """Two Wan models of one config (Wan2.2's two experts) share the compiled block graphs but never their call
    state or dense phase: calls interleave, one model in its dense phase, the other past it."""
    m1, inputs = wan(head_dim=64, frames=2, height=16, width=16, seed=0)
    m2, _ = wan(head_dim=64, frames=2, height=16, width=16, seed=1)
    dense2 = run(m2, inputs, 100.0)
    for m in (m1, m2):
        dit_compiler.compile_repeated_blocks(m, density=0.25, block_size=64, dense_steps=0.25, dense_layers=0)
    for t1, t2 in ((900.0, 100.0), (800.0, 50.0)):
        run(m1, inputs, t1)
        out2 = run(m2, inputs, t2)
    assert len(compiles) == 1  # one artifact for both models' blocks
    ((_, calls1),) = records(m1)
    ((_, calls2),) = records(m2)
    assert [c[:2] for c in calls1] == [[900.0, 1.0], [800.0, 1.0]]
    assert [c[:2] for c in calls2] == [[100.0, 0.0], [50.0, 0.0]]
    assert all(len(c) == 4 for c in calls1 + calls2)  # timestep, dense, one site per block
    assert all(d == 1.0 for c in calls1 for d in c[2:]) and all(d < 1 for c in calls2 for d in c[2:])
    assert not torch.equal(out2, dense2)


def test_a_new_layout_with_the_same_token_count_is_planned_anew(compiles):
    """Height and width swapped: the block graph's shapes are unchanged, but the token grid is not; the blocks get
    the new layout (a new backend, so Dynamo compiles anew) and still compute what the whole-model compile does."""
    model, inputs = wan(head_dim=64, frames=2, height=8, width=24, layers=1)
    twin, _ = wan(head_dim=64, frames=2, height=8, width=24, layers=1)
    options = dict(density=0.5, block_size=64, dense_steps=0.0, dense_layers=0)
    whole = torch.compile(twin, backend="vsparse", options=options, fullgraph=True)
    dit_compiler.compile_repeated_blocks(model, **options)
    swapped = dict(inputs, hidden_states=inputs["hidden_states"].transpose(3, 4).contiguous())
    for case in (inputs, swapped, inputs):
        torch.testing.assert_close(run(model, case), run(whole, case), rtol=1e-5, atol=1e-6)
    assert len([g for g in compiles if "vsparse_dense" in g.code]) == 2  # block graphs, one per layout


def test_refused_options_name_why():
    model, _ = wan()
    with pytest.raises(ValueError, match="no graph holds the stack"):
        dit_compiler.compile_repeated_blocks(model, cache="easycache")
    with pytest.raises(ValueError, match="dump_dir"):
        dit_compiler.compile_repeated_blocks(model, dump_dir="/tmp/x")
    with pytest.raises(ValueError, match="density"):
        dit_compiler.compile_repeated_blocks(model, density=2.0)


def test_diffusers_compile_repeated_blocks_says_why_blocks_stay_dense(eager_pieces, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(backend, "_warned_block_graph", [])
    model, inputs = wan(head_dim=64)
    expected = run(model, inputs)
    model.compile_repeated_blocks(backend="vsparse", options={"dump_dir": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger="dit_compiler"):
        out = run(model, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "one transformer block" in warning and "dit_compiler.compile_repeated_blocks" in warning
    (report,) = tmp_path.glob("*/report.md")
    assert "dit_compiler.compile_repeated_blocks" in report.read_text()


@pytest.mark.slow
def test_inductor_compiles_the_sparse_blocks():
    torch._dynamo.reset()
    model, inputs = wan(head_dim=64, frames=2, height=8, width=8, layers=2)
    expected = run(model, inputs)
    dit_compiler.compile_repeated_blocks(model, density=1.0, block_size=64, dense_steps=0.0, dense_layers=0)
    torch.testing.assert_close(run(model, inputs), expected, rtol=1e-4, atol=1e-5)
    ((names, calls),) = records(model)
    assert len(names) == 2 and calls[0][2:] == [1.0, 1.0]
    torch._dynamo.reset()


def test_regional_compilation_holds_no_weak_reference_to_a_parameter(compiles):
    # torch.utils.swap_tensors (Module.to() for tensor-subclass parameters and under
    # set_swap_module_params_on_conversion) refuses a tensor with a weak reference: ours must hold none.
    import weakref

    model, inputs = wan()
    dit_compiler.compile_repeated_blocks(model, density=0.5)
    run(model, inputs)
    ours = [r for p in model.parameters() for r in weakref.getweakrefs(p)
            if getattr(r.__callback__, "__module__", "").startswith("dit_compiler")]
    assert not ours


def test_block_owners_tell_a_parameter_by_its_block_and_forget_the_block_when_it_goes():
    from dit_compiler.runtime.regional import BlockOwners

    owners, owner = BlockOwners(), object()
    block = torch.nn.Sequential(torch.nn.Linear(2, 2))
    owners.add(block, owner, "blocks.0")
    weight = block[0].weight
    assert owners.get(weight) == (owner, "blocks.0")
    assert owners.get(torch.nn.Parameter(torch.zeros(2))) is None
    block[0].weight = torch.nn.Parameter(torch.zeros(2, 2))  # the block no longer holds that object
    assert owners.get(weight) is None and owners.get(block[0].weight) is None
    del block
    gc.collect()
    assert not owners._entries
