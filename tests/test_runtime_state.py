import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dit_compiler.runtime.state import MAX_BRANCHES, StepTracker, dense_phase, read_timestep


def positions(values):
    tracker = StepTracker()
    return [tracker.observe(v) for v in values]


def test_cfg_branches_steps_and_resets():
    seen = positions([999.0, 999.0, 750.0, 750.0, 10.0, 10.0, 999.0, 500.0])
    assert [(p.generation, p.step, p.branch) for p in seen] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0), (1, 1, 0)]
    assert [p.reset for p in seen] == [True, False, False, False, False, False, True, False]


def test_no_timestep_every_call_is_a_step():
    seen = positions([None, None, None])
    assert [(p.generation, p.step, p.branch) for p in seen] == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]


def test_a_repeated_call_never_grows_the_branch_count():
    """A benchmark loop (the same call over and over) used to count every repeat as a new CFG branch, whose cache
    state was kept forever; past MAX_BRANCHES it now starts a new generation."""
    seen = positions([500.0] * 10)
    assert max(p.branch for p in seen) == MAX_BRANCHES - 1
    assert [p.reset for p in seen][:MAX_BRANCHES + 1] == [True] + [False] * (MAX_BRANCHES - 1) + [True]


def test_bf16_timestep_collision_is_the_next_step_not_a_third_branch():
    """Neighbouring steps whose timesteps round to the same bf16 value: the first step told there are 2 branches,
    so a third call with that timestep is the next step."""
    t = [float(torch.tensor(v, dtype=torch.bfloat16)) for v in (999.0, 991.0, 990.0)]
    assert t[1] == t[2]
    seen = positions([t[0], t[0], t[1], t[1], t[2], t[2]])
    assert [(p.generation, p.step, p.branch) for p in seen] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]


def test_dense_phase_is_a_share_of_the_absolute_timestep_scale():
    values = [1000.0, 900.0, 760.0, 740.0, 100.0]
    assert [bool(dense_phase(v, 0.25)) for v in values] == [True, True, True, False, False]
    # Wan2.2's second expert starts at the boundary (t=875): on the absolute scale it is past a 0.25 dense share.
    assert not dense_phase(700.0, 0.25) and dense_phase(875.0, 0.25)
    # Sigma-valued timesteps live on [0, 1].
    assert [bool(dense_phase(v, 0.25)) for v in (1.0, 0.8, 0.7)] == [True, True, False]
    assert not dense_phase(1000.0, 0.0)
    # On the device: the same decision as a 0-dim bool tensor.
    assert dense_phase(torch.tensor(760.0), 0.25).item() and not dense_phase(torch.tensor(0.7), 0.25).item()


def test_per_token_timesteps_read_their_maximum():
    """Wan2.2 TI2V gives the first latent frame t=0 per token: reading token 0 saw every call as step 0."""
    t = torch.full((2, 12), 640.0)
    t[:, :4] = 0.0
    assert read_timestep(t).item() == 640.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 6)), min_size=1, max_size=5))
def test_generations_of_cfg_steps_are_told_apart(generations):
    """Any sequence of generations (branches per step, steps) with falling timesteps from 999 to 0 is read back as
    written: generation, step and branch of every call."""
    # A one-step generation ends at t=999, where the next one starts: that reads as another branch.
    assume(all(steps > 1 for _, steps in generations[:-1]))
    values, expected = [], []
    for g, (branches, steps) in enumerate(generations):
        timesteps = torch.linspace(999, 0, steps).tolist()
        for s, t in enumerate(timesteps):
            for b in range(branches):
                values.append(t)
                expected.append((g, s, b))
    seen = positions(values)
    assert [(p.generation, p.step, p.branch) for p in seen] == expected


def test_a_model_state_follows_its_parameters_across_conversions():
    """`Module.to()` keeps the parameter objects, by `param.data = ...` or, for tensor-subclass parameters (torchao)
    and under `set_swap_module_params_on_conversion(True)`, by `torch.utils.swap_tensors`, which refused a tensor
    with a weak reference: the runtime's weak key made `.to()` raise after the model's first compiled call."""
    from dit_compiler.runtime.runner import ModelStates

    model, states = torch.nn.Linear(4, 4), ModelStates()
    key = model.weight
    state = states.get(key)
    model.to(torch.float64).to(torch.float32)
    assert model.weight is key and states.get(model.weight) is state
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert model.weight is key and model.weight.dtype == torch.float64
    assert states.get(model.weight) is state and states.find([key]) == [state]


def test_a_gone_model_leaves_no_state():
    """The state (with its cached tensors) goes at the next lookup after the model does."""
    import weakref

    from dit_compiler.runtime.runner import ModelStates

    states, kept = ModelStates(), torch.nn.Linear(4, 4)
    gone = torch.nn.Linear(4, 4)
    state = weakref.ref(states.get(gone.weight))
    states.get(kept.weight)
    assert state() is not None
    del gone
    assert states.find([kept.weight]) and state() is None


def test_parameters_replaced_on_conversion_start_a_new_state_and_say_so(caplog, monkeypatch):
    """Under `set_overwrite_module_params_on_conversion(True)` `Module.to()` makes new parameter objects, so no
    identity survives it: the runtime says what that costs."""
    import dit_compiler.runtime.runner as runner

    monkeypatch.setattr(runner, "_warned_overwrite", [])
    model, states = torch.nn.Linear(4, 4), runner.ModelStates()
    first = states.get(model.weight)
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to("cpu")
        second = states.get(model.weight)
        model.to("cpu")
        states.get(model.weight)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    assert second is not first and second.index == 1
    warnings = [r for r in caplog.records if "overwrite_module_params_on_conversion" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
