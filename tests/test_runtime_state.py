import torch

from dit_compiler.runtime.state import StepTracker


def positions(values):
    tracker = StepTracker()
    return [tracker.observe(None if v is None else torch.tensor([v])) for v in values]


def test_cfg_branches_steps_and_resets():
    seen = positions([999.0, 999.0, 750.0, 750.0, 10.0, 10.0, 999.0, 500.0])
    assert [(p.generation, p.step, p.branch) for p in seen] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0), (1, 1, 0)]
    assert [p.reset for p in seen] == [True, False, False, False, False, False, True, False]


def test_no_timestep_every_call_is_a_step():
    seen = positions([None, None, None])
    assert [(p.generation, p.step, p.branch) for p in seen] == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]


def test_dense_phase_is_a_share_of_the_timestep_range():
    tracker = StepTracker()
    values = [1000.0, 900.0, 760.0, 740.0, 100.0]
    dense = [tracker.dense_phase(tracker.observe(torch.tensor(v)), 0.25) for v in values]
    assert dense == [True, True, True, False, False]
    tracker = StepTracker()
    assert not tracker.dense_phase(tracker.observe(torch.tensor(1000.0)), 0.0)


def test_all_dense_steps_cover_graphs_without_timestep():
    tracker = StepTracker()
    assert tracker.dense_phase(tracker.observe(None), 1.0)
    assert not tracker.dense_phase(tracker.observe(None), 0.5)
