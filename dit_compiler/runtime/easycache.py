"""EasyCache: skip the block stack while its output is predictably a fixed offset from its input.

After two full computations the *transformation rate* k = |Δoutput| / |Δinput| between them is known. At each later
call the relative output change is estimated as k * |x_t - x_{t-1}| / |y_last| and accumulated; while the sum stays
under the threshold the stack is skipped and its output taken as x_t + (y_last - x_last), the last computed
residual. Crossing the threshold computes the stack again and restarts the sum.

Everything is kept on the device: `record` reads nothing on the host, and `probe` hands the runner one 0-dim
tensor (the estimate's increment) to read with the call's timestep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from dit_compiler.runtime.cache import CacheDecision


def _mean_abs(t: torch.Tensor) -> torch.Tensor:
    return t.float().abs().mean()


@dataclass
class EasyCacheState:
    last_input: Optional[torch.Tensor] = None  # x of the previous call, computed or not
    computed_input: Optional[torch.Tensor] = None  # x of the last full computation
    previous_output: Optional[torch.Tensor] = None  # first output of the last full computation (for the rate)
    residuals: Optional[list] = None  # y - x of the last full computation, one per stack output
    output_scale: Optional[torch.Tensor] = None  # |y| of the last full computation
    rate: Optional[torch.Tensor] = None  # transformation rate between the last two full computations (inf: unknown)
    accumulated: float = 0.0
    computed: int = 0  # full computations in this generation


class EasyCache:
    warmup = 2  # full computations per branch and generation before any reuse

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def new_state(self) -> EasyCacheState:
        return EasyCacheState()

    def probe(self, state: EasyCacheState, entry: torch.Tensor) -> Optional[torch.Tensor]:
        if state.computed < self.warmup or state.rate is None:
            return None
        change = _mean_abs(entry - state.last_input)
        return state.rate * change / state.output_scale.clamp_min(1e-12)

    def decide(self, state: EasyCacheState, value: Optional[float]) -> CacheDecision:
        if value is None:
            return CacheDecision(False, None)
        estimate = state.accumulated + value
        if estimate < self.threshold:  # NaN and inf (rate unknown) never reuse
            state.accumulated = estimate
            return CacheDecision(True, estimate)
        return CacheDecision(False, estimate if math.isfinite(estimate) else None)

    def reuse(self, state: EasyCacheState, entry: torch.Tensor, like_entry: list[bool]) -> list[torch.Tensor]:
        state.last_input = entry
        # In the computed output's layout (the residual keeps it), which the compiled tail asserts: `entry + r`
        # would take the entry's, and HunyuanVideo's entry is a transposed view.
        return [torch.add(entry, r, out=torch.empty_like(r)) if like else r
                for r, like in zip(state.residuals, like_entry)]

    def record(self, state: EasyCacheState, entry: torch.Tensor, outputs: list[torch.Tensor],
               like_entry: list[bool]) -> None:
        first = outputs[0]
        if state.computed_input is not None:
            input_change = _mean_abs(entry - state.computed_input)
            rate = _mean_abs(first - state.previous_output) / input_change
            unknown = torch.full_like(rate, math.inf) if state.rate is None else state.rate
            state.rate = torch.where(input_change > 0, rate, unknown)
        state.residuals = [torch.sub(o, entry, out=torch.empty_like(o)) if like else o
                           for o, like in zip(outputs, like_entry)]
        state.computed_input = state.last_input = entry
        state.previous_output = first
        state.output_scale = _mean_abs(first)
        state.accumulated = 0.0
        state.computed += 1
