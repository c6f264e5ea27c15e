"""EasyCache: skip the block stack while its output is predictably a fixed offset from its input.

After two full computations the *transformation rate* k = |Δoutput| / |Δinput| between them is known. At each later
step the relative output change is estimated as k * |x_t - x_{t-1}| / |y_last| and accumulated; while the sum stays
under the threshold the stack is skipped and its output taken as x_t + (y_last - x_last), the last computed
residual. Crossing the threshold computes the stack again and restarts the sum. State is kept per CFG branch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


def _mean_abs(t: torch.Tensor) -> torch.Tensor:
    return t.float().abs().mean()


@dataclass
class _BranchCache:
    last_input: Optional[torch.Tensor] = None  # x of the previous call, computed or not
    computed_input: Optional[torch.Tensor] = None  # x of the last full computation
    residuals: Optional[list] = None  # y - x of the last full computation, one per stack output
    output_scale: float = 0.0  # |y| of the last full computation
    rate: Optional[float] = None  # transformation rate between the last two full computations
    accumulated: float = 0.0
    previous_output: Optional[torch.Tensor] = None  # first output of the last full computation (for the rate)


@dataclass
class CacheDecision:
    reused: bool
    accumulated: float
    rate: Optional[float]


@dataclass
class EasyCache:
    threshold: float
    warmup: int = 2  # full computations after a generation starts, before any reuse
    _branches: dict = field(default_factory=dict)
    _computed_in_generation: dict = field(default_factory=dict)

    def reset(self) -> None:
        self._branches.clear()
        self._computed_in_generation.clear()

    def decide(self, branch: int, entry: torch.Tensor) -> CacheDecision:
        """Whether to reuse the cached residual for this call (one host read of two norms)."""
        state = self._branches.setdefault(branch, _BranchCache())
        if (state.rate is None or state.residuals is None or state.last_input is None
                or self._computed_in_generation.get(branch, 0) < self.warmup):
            return CacheDecision(False, state.accumulated, state.rate)
        input_change = float(_mean_abs(entry - state.last_input))
        estimate = state.accumulated + state.rate * input_change / max(state.output_scale, 1e-12)
        if estimate < self.threshold:
            state.accumulated = estimate
            return CacheDecision(True, estimate, state.rate)
        return CacheDecision(False, estimate, state.rate)

    def reuse(self, branch: int, entry: torch.Tensor, shapes_like_entry: list[bool]) -> list[torch.Tensor]:
        state = self._branches[branch]
        state.last_input = entry
        return [entry + r if like else r for r, like in zip(state.residuals, shapes_like_entry)]

    def record(self, branch: int, entry: torch.Tensor, outputs: list[torch.Tensor], shapes_like_entry: list[bool]):
        """Remember a full computation: residuals, output scale and the transformation rate."""
        state = self._branches.setdefault(branch, _BranchCache())
        first = outputs[0]
        if state.computed_input is not None and state.previous_output is not None:
            input_change = float(_mean_abs(entry - state.computed_input))
            if input_change > 0:
                state.rate = float(_mean_abs(first - state.previous_output)) / input_change
        state.residuals = [o - entry if like else o for o, like in zip(outputs, shapes_like_entry)]
        state.computed_input = entry
        state.last_input = entry
        state.previous_output = first
        state.output_scale = float(_mean_abs(first))
        state.accumulated = 0.0
        self._computed_in_generation[branch] = self._computed_in_generation.get(branch, 0) + 1
