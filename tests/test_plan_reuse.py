"""`plan_every`: svg's head classes kept between steps (passes/plan_reuse.py), per model, CFG branch and generation.

The whole-model tests run the pieces eagerly (`compile_piece` patched), so the planner's Python runs on every call
and can be watched; test_backend.py checks the Inductor-compiled graphs, and one test here compiles with Inductor."""
import pytest
import torch
from torch._subclasses import FakeTensor

from dit_compiler.passes import plan_reuse
from dit_compiler.passes.planners import svg
from dit_compiler.runtime.cache import CacheDecision
from dit_compiler.runtime.easycache import EasyCache
from test_runtime_models import at, model_states, vsparse
from tiny_models import wan

SVG = dict(sparsity="svg", density=0.5, block_size=64, force_sparse=True, dense_layers=0, dense_steps=0.0,
           cache="none")


def clock_run(timesteps, every, dense=None):
    """(resampled, stored slot or None) per call of one site's decision over a sequence of timesteps."""
    clock = torch.tensor([float("nan"), 0.0, 0.0])
    table = torch.full((plan_reuse.SLOTS, 2), float("nan"))
    dense = dense or [False] * len(timesteps)
    seen = []
    for t, is_dense in zip(timesteps, dense):
        t = torch.tensor(float(t))
        slot, generation, clock = plan_reuse.call_slot(t, clock)
        resample, store, table = plan_reuse.decide(table, slot, generation, torch.tensor(is_dense), every)
        seen.append((bool(resample), int(store.nonzero()[0]) if store.any() else None))
    return seen


def test_each_cfg_branch_keeps_its_classes_for_plan_every_steps():
    seen = clock_run([900, 900, 800, 800, 700, 700, 600, 600], every=3)
    assert seen == [(True, 0), (True, 1), (False, 0), (False, 1), (False, 0), (False, 1), (True, 0), (True, 1)]


def test_a_new_generation_samples_anew_and_extra_calls_at_one_timestep_store_nothing():
    """900 after 800: the timestep rose, a new generation, whose branches sample although the last generation
    sampled at the same timesteps. Four calls at 500: the fourth is past the three slots."""
    seen = clock_run([900, 900, 800, 800, 900, 900, 800, 800, 500, 500, 500, 500], every=4)
    assert seen == [(True, 0), (True, 1), (False, 0), (False, 1), (True, 0), (True, 1), (False, 0), (False, 1),
                    (False, 0), (False, 1), (True, 2), (True, None)]


def test_the_dense_phase_neither_samples_nor_stores():
    seen = clock_run([900, 800, 700, 600], every=2, dense=[True, True, False, False])
    assert seen == [(True, None), (True, None), (True, 0), (False, 0)]


class SampledClasses:
    """Stands in for svg's sampled-row classification: each sample gives new classes (a counter's bits), and every
    plan's classes are recorded (the eager pieces call the planner's Python on every call)."""

    def __init__(self, monkeypatch):
        self.samples, self.used = [], []
        classify, masks = svg.classify_with, svg.masks_by_class

        def sample(q, k, v, constants, scale=None, skip=None):
            classes = classify(q, k, v, constants, scale, skip)  # the real op still runs (and checks its inputs)
            if isinstance(q, FakeTensor):  # the split's shape propagation
                return classes
            if skip is not None and bool(skip):
                return torch.zeros(q.shape[:2], dtype=torch.bool)
            n = len(self.samples) + 1
            self.samples.append(torch.tensor([[bool(n >> h & 1) for h in range(q.shape[1])]] * q.shape[0]))
            return self.samples[-1]

        def record(temporal, constants):
            if not isinstance(temporal, FakeTensor):
                self.used.append(temporal.clone())
            return masks(temporal, constants)

        monkeypatch.setattr(svg, "classify_with", sample)
        monkeypatch.setattr(svg, "masks_by_class", record)


def run(model, inputs, timesteps):
    with torch.no_grad():
        return [model(**at(inputs, t))[0] for t in timesteps]


def test_a_reused_call_plans_with_its_branch_s_last_sampled_classes(eager_pieces, monkeypatch):
    classes = SampledClasses(monkeypatch)
    model, inputs = wan(frames=3, height=8, width=16, layers=1, head_dim=64)
    run(vsparse(model, **SVG, plan_every=2), inputs, [900, 900, 800, 800, 700, 700])
    s = classes.samples
    assert len(s) == 4  # steps 0 and 2, both branches
    expected = [s[0], s[1], s[0], s[1], s[2], s[3]]
    assert all(torch.equal(u, e) for u, e in zip(classes.used, expected, strict=True))


def test_two_models_sharing_the_graph_keep_their_own_classes(eager_pieces, monkeypatch):
    """Dynamo gives two Wan models of one config one compiled graph: the second model's first call must sample,
    not take the first model's classes of the same timestep."""
    classes = SampledClasses(monkeypatch)
    m1, inputs = wan(frames=3, height=8, width=16, layers=1, head_dim=64, seed=0)
    m2, _ = wan(frames=3, height=8, width=16, layers=1, head_dim=64, seed=1)
    c1, c2 = vsparse(m1, **SVG, plan_every=4), vsparse(m2, **SVG, plan_every=4)
    run(c1, inputs, [900])
    run(c2, inputs, [900, 800])
    run(c1, inputs, [800])
    s = classes.samples
    assert len(s) == 2
    assert all(torch.equal(u, e) for u, e in zip(classes.used, [s[0], s[1], s[1], s[0]], strict=True))
    assert len(model_states(m1)) == len(model_states(m2)) == 1


def test_a_call_the_cache_skips_leaves_the_kept_classes_as_they_were(eager_pieces, monkeypatch):
    """The cache skips the stack, where the sites are: their classes and counts pass through unchanged (a skipped
    call plans nothing), while the clock counts the call, so the next call still finds its branch's slot."""
    classes = SampledClasses(monkeypatch)
    skip = iter([False, False, False, True, False, False])  # the 4th call (step 1, uncond) skipped

    def decide(self, state, value):
        return CacheDecision(next(skip), None)

    monkeypatch.setattr(EasyCache, "decide", decide)
    model, inputs = wan(frames=3, height=8, width=16, layers=1, head_dim=64)
    compiled = vsparse(model, **dict(SVG, cache="easycache", force_cache=True), plan_every=2)
    tables = []
    with torch.no_grad():
        for t in (900, 900, 800, 800, 700, 700):
            compiled(**at(inputs, t))
            state, = model_states(model)
            tables.append(state.plan[1].clone())
    torch.testing.assert_close(tables[3], tables[2], equal_nan=True)  # skipped: as the call before left it
    assert tables[3][0, 1, 1] == 0  # uncond's classes have served one call (step 0), not two
    s = classes.samples
    # uncond at step 2 still samples: step 0's classes served it once, and the skipped step 1 not at all
    assert len(s) == 3
    assert all(torch.equal(u, e) for u, e in zip(classes.used, [s[0], s[1], s[0], s[2], s[1]], strict=True))


def test_planners_that_keep_no_choice_and_plan_every_1_add_no_state(eager_pieces, tmp_path):
    model, inputs = wan(frames=3, height=8, width=16, layers=1, head_dim=64)
    for options, note in ((dict(SVG, sparsity="draft", plan_every=2), "planner draft keeps no choice"),
                          (dict(SVG, plan_every=1), "plan_every=1")):
        torch._dynamo.reset()
        run(vsparse(model, **options, dump_dir=str(tmp_path / options["sparsity"])), inputs, [900])
        state, = model_states(model)
        assert state.plan is None
        report = next((tmp_path / options["sparsity"]).rglob("report.md")).read_text()
        assert f"head choices sampled every call: {note}" in report


@pytest.mark.slow
def test_inductor_compiled_state_decides_as_the_eager_graph(monkeypatch):
    """The state's ops compiled by Inductor: the sampled-row kernel runs on the sampling calls only (its `skip` set
    on the others) and the outputs equal the eager pieces', call for call."""
    from dit_compiler.kernels import sampled_rows

    skips = []
    reference = sampled_rows.reference_sampled_rows_attention

    def watched(q, k, v, rows, masks, scale, skip=None):
        skips.append(bool(skip))
        return reference(q, k, v, rows, masks, scale, skip)

    monkeypatch.setattr(sampled_rows, "reference_sampled_rows_attention", watched)
    timesteps = [900, 900, 800, 800, 700, 700]
    outputs = {}
    for name in ("inductor", "eager"):
        model, inputs = wan(frames=3, height=8, width=16, layers=2, head_dim=64)
        torch._dynamo.reset()
        with monkeypatch.context() as patch:
            if name == "eager":
                import dit_compiler.backend as backend

                patch.setattr(backend, "compile_piece", lambda gm, example_inputs, config: gm)
            outputs[name] = run(vsparse(model, **SVG, plan_every=2), inputs, timesteps)
        # two sites a call: cond and uncond sample at steps 0 and 2 and keep their classes at step 1
        assert skips == [False] * 4 + [True] * 4 + [False] * 4, name
        skips.clear()
    torch._dynamo.reset()
    for a, b in zip(outputs["inductor"], outputs["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_state_inputs_add_no_symbolic_sizes_to_a_static_graph(monkeypatch):
    """The state's example inputs are static: fakified as real tensors they had sizes of fresh symbols no Dynamo input
    has, and on CUDA Inductor's 32-bit indexing guard on them failed Dynamo's guard building (a Wan-1.3B generation
    with plan_every=2 did not compile on an H200, 2026-12-06)."""
    import dit_compiler.backend as backend

    symbols = []
    compile_piece = backend.compile_piece

    def watched(gm, example_inputs, config):
        compiled = compile_piece(gm, example_inputs, config)
        shape_env = torch._guards.detect_fake_mode(example_inputs).shape_env
        # torch 2.13 renamed the map of backed symbols (var_to_val warns there)
        backed = getattr(shape_env, "backed_var_to_val", None)
        symbols.extend(str(s) for s in (shape_env.var_to_val if backed is None else backed))
        return compiled

    monkeypatch.setattr(backend, "compile_piece", watched)
    model, inputs = wan(frames=3, height=8, width=16, layers=2, head_dim=64)
    torch._dynamo.reset()
    compiled = vsparse(model, **SVG, plan_every=2)
    run(compiled, inputs, [900, 900])
    assert model_states(compiled)[0].plan is not None, "the plan state was not added"
    assert symbols == []
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["none", "easycache"])
def test_gpu_cuda_graphs_keep_the_classes_as_the_default_mode_does(cache):
    """Under CUDA graphs the state is a graph input and output like any other (the runner copies the outputs a
    replay overwrites): `mode="reduce-overhead"` gives the default mode's outputs and state, call for call."""
    results = {}
    for mode in ("default", "reduce-overhead"):
        model, inputs = wan(frames=3, height=10, width=14, layers=2, head_dim=64)
        model = model.to("cuda", torch.bfloat16)
        torch._dynamo.reset()
        compiled = vsparse(model, **dict(SVG, cache=cache, force_cache=cache != "none"), plan_every=2, mode=mode)
        outputs = []
        with torch.no_grad():
            for t in (900, 900, 800, 800, 700, 700, 600, 600):
                step = {k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) else v for k, v in at(inputs, t).items()}
                outputs.append(compiled(**step)[0].float())
        state, = model_states(model)
        results[mode] = outputs, [t.float() for t in state.plan]
    torch._dynamo.reset()
    for a, b in zip(*(results[m][0] + results[m][1] for m in ("default", "reduce-overhead")), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, equal_nan=True)
    table = results["reduce-overhead"][1][1]
    assert table[:, :2, 1].eq(1).all()  # the last step (600) reused step 700's classes in both branches
