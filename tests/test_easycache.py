import torch

from dit_compiler.runtime.easycache import EasyCache


def run_steps(cache, inputs, stack):
    """Feed successive stack inputs through the cache; return the outputs and which steps reused."""
    outs, reused = [], []
    for x in inputs:
        decision = cache.decide(0, x)
        if decision.reused:
            y = cache.reuse(0, x, [True])[0]
        else:
            y = stack(x)
            cache.record(0, x, [y], [True])
        outs.append(y)
        reused.append(decision.reused)
    return outs, reused


def test_reuses_when_the_stack_is_a_fixed_offset_and_recomputes_on_change():
    torch.manual_seed(0)
    offset = torch.randn(4, 8)
    base = torch.randn(4, 8)
    inputs = [base + 0.001 * i * torch.randn(4, 8) for i in range(6)]
    outs, reused = run_steps(EasyCache(threshold=0.05), inputs, lambda x: x + offset)
    assert reused[:2] == [False, False]  # warm-up
    assert any(reused[2:])
    for x, y in zip(inputs, outs):  # the residual is exactly the offset, so reuse is exact
        torch.testing.assert_close(y, x + offset)


def test_fast_changing_stack_is_never_skipped():
    torch.manual_seed(1)
    inputs = [torch.randn(4, 8) for _ in range(6)]
    _, reused = run_steps(EasyCache(threshold=0.05), inputs, lambda x: torch.tanh(3 * x) * 5)
    assert not any(reused)


def test_accumulated_error_forces_recompute():
    torch.manual_seed(2)
    base = torch.randn(16)
    inputs = [base + 0.02 * i for i in range(12)]
    _, reused = run_steps(EasyCache(threshold=0.06), inputs, lambda x: 2 * x)
    assert any(reused) and not all(reused[2:])
