"""Run-time state on real diffusers models: per model, bounded, host-read free, honest under autograd.

The pieces run eagerly here (`compile_piece` patched): the runtime's behaviour does not depend on Inductor, and
test_backend.py checks the Inductor-compiled pieces."""
import gc
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dit_compiler
from test_backend import graph_dirs
from tiny_models import wan, wan_pipeline


pytestmark = pytest.mark.usefixtures("eager_pieces")


def vsparse(model, **options):
    return torch.compile(model, backend="vsparse", options=options, fullgraph=True)


def at(inputs, t, **changes):
    """The inputs of a denoising step at timestep t: the latents drift a little with t, as they do in sampling."""
    return dict(inputs, timestep=torch.full((1,), float(t)), hidden_states=inputs["hidden_states"] * (1 + t / 1e4),
                **changes)


def call(model, inputs, t, **changes):
    with torch.no_grad():
        return model(**at(inputs, t, **changes))[0]


def model_states(model):
    """The run-time states of `model` in every live runner (other tests' runners may still be alive)."""
    from dit_compiler.runtime.runner import runners

    return [state for runner in runners() for state in runner.states.find(list(model.parameters()))]


def cache_decisions(model):
    """(generation, branch, reused) per call of `model`."""
    return [(r.position.generation, r.position.branch, bool(r.cache and r.cache.reused))
            for state in model_states(model) for r in state.history]


def test_two_models_of_one_class_keep_their_own_cache():
    """Dynamo gives two Wan models of one config one compiled graph: the second model's first call used to reuse
    the first model's cached residual (relative error 0.19)."""
    m1, inputs = wan(frames=2, height=8, width=8, seed=0)
    m2, _ = wan(frames=2, height=8, width=8, seed=1)
    c1 = vsparse(m1, sparsity="none", cache="easycache", cache_threshold=0.5)
    c2 = vsparse(m2, sparsity="none", cache="easycache", cache_threshold=0.5)
    for t in (900, 890, 880, 870):
        call(c1, inputs, t)
    assert any(r for _, _, r in cache_decisions(m1))  # the first model does reuse by now
    out = call(c2, inputs, 860)
    torch.testing.assert_close(out, call(m2, inputs, 860), rtol=1e-4, atol=1e-5)
    rows1, rows2 = dit_compiler.stats(c1), dit_compiler.stats(c2)
    assert [(r["calls"], r["computed"]) for r in rows2] == [(1, 1)]
    assert sum(r["calls"] for r in rows1) == 4


def test_wan22_two_experts_track_their_own_steps():
    """Wan2.2 A14B: `transformer` and `transformer_2` (one class) switch at a boundary timestep in one pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    t1, _ = wan(frames=2, height=8, width=8, seed=0)
    t2, _ = wan(frames=2, height=8, width=8, seed=1)
    pipe, args = wan_pipeline(t1, t2, steps=6, guidance_scale_2=3.0)
    expected = pipe(**args, generator=torch.Generator().manual_seed(2)).frames
    c1 = vsparse(t1, sparsity="none", cache="easycache", cache_threshold=1e-9)
    c2 = vsparse(t2, sparsity="none", cache="easycache", cache_threshold=1e-9)
    pipe.transformer, pipe.transformer_2 = c1, c2
    got = pipe(**args, generator=torch.Generator().manual_seed(2)).frames
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    timesteps = FlowMatchEulerDiscreteScheduler(shift=3.0)
    timesteps.set_timesteps(6)
    high = int((timesteps.timesteps >= 875).sum())
    rows1, rows2 = dit_compiler.stats(c1), dit_compiler.stats(c2)
    assert [(r["generation"], r["branch"], r["calls"]) for r in rows1] == [(0, 0, high), (0, 1, high)]
    assert [(r["generation"], r["branch"], r["calls"]) for r in rows2] == [(0, 0, 6 - high), (0, 1, 6 - high)]


def _big_tensor_bytes():
    gc.collect()
    return sum(t.numel() * t.element_size() for t in gc.get_objects()
               if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.numel() > 64)


def test_memory_stays_flat_over_repeated_calls_and_generations():
    """A benchmark loop repeating one call used to open a new CFG branch (with its cached tensors) every call."""
    model, inputs = wan(frames=2, height=8, width=8)
    compiled = vsparse(model, sparsity="none", cache="easycache", cache_threshold=0.05)
    for _ in range(20):
        call(compiled, inputs, 500)
    before = _big_tensor_bytes()
    # Slack: which branches hold state depends on where the last generation stands (at most 3 branches, each a
    # few tensors shaped like the stack's entry). The old runtime grew by that much every call.
    slack = 3 * 4 * 32 * 32 * 4
    for _ in range(300):
        call(compiled, inputs, 500)
    assert _big_tensor_bytes() <= before + slack
    for _ in range(100):  # generations of 3 steps with CFG
        for t in (900, 600, 300):
            call(compiled, inputs, t)
            call(compiled, inputs, t, encoder_hidden_states=inputs["encoder_hidden_states"] * 0)
    assert _big_tensor_bytes() <= before + slack


def test_grad_mode_gets_the_eager_gradients_with_the_cache_on(tmp_path, caplog):
    """With cache="easycache" the output used to come back detached: proj_out.weight.grad was 0."""
    model, inputs = wan(frames=2, height=8, width=8)
    model.train()
    compiled = vsparse(model, sparsity="draft", cache="easycache", dump_dir=str(tmp_path))
    for t in (900, 890, 880):
        model.zero_grad()
        compiled(**at(inputs, t))[0].square().mean().backward()
        got = model.proj_out.weight.grad.clone()
        model.zero_grad()
        model(**at(inputs, t))[0].square().mean().backward()
        torch.testing.assert_close(got, model.proj_out.weight.grad, rtol=1e-4, atol=1e-6)
        assert got.abs().sum() > 0
    assert "grad mode" in caplog.text
    (graph_dir,) = graph_dirs(tmp_path)
    assert "grad mode: compiled dense and without the cache" in (graph_dir / "report.md").read_text()


def test_per_token_timesteps_track_steps_and_go_sparse(tmp_path):
    """Wan2.2 TI2V passes a [B, tokens] timestep with the first latent frame at t=0: the tracker read token 0, so
    every call was "step 0, a new branch" and the dense phase never ended."""
    model, inputs = wan(frames=3, height=8, width=8, head_dim=64)
    compiled = vsparse(model, sparsity="draft", density=1.0, block_size=64, dense_layers=0, dense_steps=0.25,
                       dump_dir=str(tmp_path))
    tokens = 3 * 4 * 4
    for t in (950, 950, 600, 600, 300, 300):
        timestep = torch.full((1, tokens), float(t))
        timestep[:, :16] = 0.0  # the first latent frame is the clean conditioning image
        with torch.no_grad():
            out = compiled(**dict(inputs, timestep=timestep))[0]
            torch.testing.assert_close(out, model(**dict(inputs, timestep=timestep))[0], rtol=1e-4, atol=1e-5)
    (graph_dir,) = graph_dirs(tmp_path)
    records = [json.loads(line) for line in (graph_dir / "runtime.jsonl").read_text().splitlines()]
    assert [(r["step"], r["branch"], r["dense_phase"]) for r in records] == [
        (0, 0, True), (0, 1, True), (1, 0, False), (1, 1, False), (2, 0, False), (2, 1, False)]
    sites = json.loads((graph_dir / "analysis.json").read_text())["sites"]
    assert any(s["rewritten"] for s in sites), [s["decision_reason"] for s in sites]


def _host_reads(compiled, inputs, t):
    """aten::_local_scalar_dense calls of one forward outside our op (whose CPU reference reads mask sizes)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call(compiled, inputs, t)

    def inside_op(event):
        while event is not None:
            if event.name == "vsparse::block_sparse_attention":
                return True
            event = event.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense" and not inside_op(e))


@pytest.mark.parametrize("options,most", [
    (dict(sparsity="draft", dense_layers=0), 0),
    (dict(sparsity="none"), 0),
    (dict(sparsity="draft", dense_layers=0, cache="easycache", cache_threshold=0.5), 1),
])
def test_host_reads_per_forward(options, most):
    """Each host read stalls the CPU until the GPU catches up. Before: one per forward for the timestep with
    sparse attention, and up to 4 more with the cache (norms read on the host)."""
    model, inputs = wan(frames=2, height=8, width=8, head_dim=64)
    compiled = vsparse(model, **options)
    counts = [(_host_reads(compiled, inputs, t), _host_reads(compiled, inputs, t)) for t in (900, 890, 880, 870)]
    assert max(max(c) for c in counts) <= most, counts


def test_bad_option_raises_at_the_first_call_wrapped_by_dynamo():
    model, inputs = wan()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as err:
        call(vsparse(model, density=2.0), inputs, 500)
    cause = err.value.inner_exception
    assert isinstance(cause, ValueError) and "'density'" in str(cause)
    with pytest.raises(ValueError, match="'density'"):
        dit_compiler.vsparse(density=2.0)


def test_a_dump_directory_holds_one_run(tmp_path):
    """A reused dump_dir kept an earlier run's graph folders, and `show` printed them with the new ones."""
    stale = tmp_path / "WanTransformer3DModel_7"
    stale.mkdir()
    (stale / ".vsparse-graph").write_text("")
    (stale / "report.md").write_text("# an earlier run\n")
    (tmp_path / ".vsparse-run").write_text("an earlier process")
    mine = tmp_path / "notes"
    mine.mkdir()
    model, inputs = wan()
    call(vsparse(model, sparsity="none", dump_dir=str(tmp_path)), inputs, 500)
    assert graph_dirs(tmp_path) != [stale], "the backend did not run"
    assert not stale.exists() and mine.exists()
    from dit_compiler.dump import show

    assert "an earlier run" not in show(str(tmp_path))


def test_runtime_jsonl_is_bounded(tmp_path, monkeypatch):
    import dit_compiler.dump as dump

    monkeypatch.setattr(dump, "RUNTIME_LINES", 5)
    model, inputs = wan()
    compiled = vsparse(model, sparsity="none", dump_dir=str(tmp_path))
    for t in range(900, 780, -10):
        call(compiled, inputs, t)
    (graph_dir,) = graph_dirs(tmp_path)
    lines = (graph_dir / "runtime.jsonl").read_text().splitlines()
    assert len(lines) == 6 and "truncated" in json.loads(lines[-1])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(1, 4), st.integers(1, 2), st.booleans()),
                min_size=1, max_size=6), st.data())
def test_call_sequences_never_share_cache_state(generations, data):
    """Generations of two models interleaved call by call (CFG branches, repeats, grad on and off): a reuse only
    ever follows two full computations of the same model, generation and branch, and computed calls equal eager."""
    torch._dynamo.reset()
    models = [wan(frames=2, height=8, width=8, seed=s)[0] for s in (0, 1)]
    _, inputs = wan(frames=2, height=8, width=8)
    compiled = [vsparse(m, sparsity="none", cache="easycache", cache_threshold=0.5) for m in models]
    for which, steps, branches, grad in generations:
        for t in torch.linspace(990, 10, steps).tolist():
            for b in range(branches):
                step = at(inputs, t, encoder_hidden_states=inputs["encoder_hidden_states"] * (1 - b))
                if grad and data.draw(st.booleans()):
                    out = compiled[which](**step)[0]
                    assert out.requires_grad
                    torch.testing.assert_close(out, models[which](**step)[0], rtol=1e-4, atol=1e-5)
                    continue
                with torch.no_grad():
                    out = compiled[which](**step)[0]
                    (state,) = model_states(models[which])
                    if not state.history[-1].cache.reused:
                        torch.testing.assert_close(out, models[which](**step)[0], rtol=1e-4, atol=1e-5)
    for state in model_states(models[0]) + model_states(models[1]):
        computed = {}
        for record in state.history:
            key = (record.position.generation, record.position.branch)
            if record.cache.reused:
                assert computed.get(key, 0) >= 2, (key, computed)
            else:
                computed[key] = computed.get(key, 0) + 1
        assert len(state.branches) <= 3


def _cached_draft_run(tmp_path, dense_steps: float):
    """A tiny Wan, draft and the cache, 8 calls from t=999 down to 50: the compiled model and its dumped call records."""
    model, inputs = wan(frames=2, height=8, width=8, head_dim=64)
    compiled = vsparse(model, sparsity="draft", density=0.5, block_size=64, dense_layers=0, dense_steps=dense_steps,
                       cache="easycache", cache_threshold=0.5, dump_dir=str(tmp_path))
    for t in torch.linspace(999, 50, 8).tolist():
        call(compiled, inputs, t)
    (graph_dir,) = graph_dirs(tmp_path)
    return compiled, [json.loads(line) for line in (graph_dir / "runtime.jsonl").read_text().splitlines()]


def test_a_reused_call_records_its_own_dense_phase(tmp_path):
    """The call record was computed in the stack piece (beside the sparse sites' densities), so a call whose stack
    the cache skipped recorded the last computed call's dense phase: the dump showed reused calls at t=50 as dense."""
    compiled, records = _cached_draft_run(tmp_path, dense_steps=0.25)
    assert any(r["cache"] == "reuse" for r in records if r["timestep"] < 750)
    assert [r["dense_phase"] for r in records] == [r["timestep"] > 750 for r in records]
    (row,) = dit_compiler.stats(compiled)
    assert row["dense_calls"] == sum(r["timestep"] > 750 for r in records)


def test_stats_count_the_dense_phase_calls_whose_stack_ran(tmp_path):
    compiled, records = _cached_draft_run(tmp_path, dense_steps=0.9)
    (row,) = dit_compiler.stats(compiled)
    dense_reused = sum(r["timestep"] > 100 and r["cache"] == "reuse" for r in records)
    assert dense_reused > 0  # the cache skipped dense-phase stacks: computed and all dense-phase calls differ
    assert row["dense_calls"] == sum(r["timestep"] > 100 for r in records)
    assert row["dense_computed"] == row["dense_calls"] - dense_reused


def test_cache_start_reuses_nothing_in_its_leading_share():
    model, inputs = wan(frames=2, height=8, width=8)
    compiled = vsparse(model, sparsity="none", cache="easycache", cache_threshold=0.5, cache_start=0.5)
    timesteps = torch.linspace(990, 10, 16).tolist()
    for t in timesteps:
        call(compiled, inputs, t)
    reused = [r for _, _, r in cache_decisions(model)]
    assert not any(r for t, r in zip(timesteps, reused) if t > 500) and any(reused)


@pytest.mark.parametrize("force", [False, True])
def test_a_cache_that_does_not_pay_is_left_off_unless_forced(monkeypatch, tmp_path, force):
    """The cost model's verdict (tested in test_cost_model.py) reaches the graph: no stack split, the reason in the
    report; `force_cache` keeps the cache."""
    import dit_compiler.backend as backend

    monkeypatch.setattr(backend, "why_cache_does_not_pay",
                        lambda stack, device, cuda_graphs: ("cache does not pay at this size: estimated", "estimated"))
    model, inputs = wan(frames=2, height=8, width=8)
    compiled = vsparse(model, sparsity="none", cache="easycache", cache_threshold=0.5, force_cache=force,
                       dump_dir=str(tmp_path))
    for t in (900, 890, 880, 870):
        call(compiled, inputs, t)
    (graph_dir,) = graph_dirs(tmp_path)
    notes = json.loads((graph_dir / "analysis.json").read_text())["notes"]
    records = [r.cache for state in model_states(model) for r in state.history]
    if force:
        assert any(r.reused for r in records) and "cache kept: estimated (force_cache)" in notes
    else:
        assert records == [None] * 4 and "cache disabled: cache does not pay at this size: estimated" in notes
