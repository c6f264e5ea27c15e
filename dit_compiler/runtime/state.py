"""Where a compiled DiT stands in a generation, told from its timestep input alone.

Diffusers pipelines call the transformer once per denoising step and branch: with classifier-free guidance the
conditional and unconditional calls share a timestep (two calls, same value), the timestep falls from step to
step, and a new generation starts when it rises again. A graph without a timestep input counts every call as a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class CallPosition:
    generation: int  # 0 for the first generation, +1 at every reset
    step: int  # denoising step within the generation
    branch: int  # 0, 1, ... for calls that share the step's timestep (CFG)
    timestep: Optional[float]  # the value read, None without a timestep input
    first_timestep: Optional[float]  # the generation's first timestep
    reset: bool  # this call started a new generation


class StepTracker:
    """Tells step, branch and generation resets from successive timestep values."""

    def __init__(self) -> None:
        self._last: Optional[CallPosition] = None

    def observe(self, timestep: Optional[torch.Tensor]) -> CallPosition:
        # One host read per forward (not per attention site): the decisions below are made on the host.
        value = None if timestep is None else float(timestep.detach().reshape(-1)[0])
        last = self._last
        if last is None:
            pos = CallPosition(0, 0, 0, value, value, reset=True)
        elif value is None:
            pos = CallPosition(last.generation, last.step + 1, 0, None, None, reset=False)
        elif value == last.timestep:
            pos = CallPosition(last.generation, last.step, last.branch + 1, value, last.first_timestep, reset=False)
        elif value < last.timestep:
            pos = CallPosition(last.generation, last.step + 1, 0, value, last.first_timestep, reset=False)
        else:
            pos = CallPosition(last.generation + 1, 0, 0, value, value, reset=True)
        self._last = pos
        return pos

    def dense_phase(self, pos: CallPosition, dense_steps: float) -> bool:
        """Whether this call falls in the leading `dense_steps` share of the denoising trajectory.

        The share is measured on the timestep scale of the generation (first timestep down to 0), because the
        compiler never sees how many steps the pipeline will take. Without a timestep input only `dense_steps=1` makes
        calls dense.
        """
        if dense_steps >= 1:
            return True
        if dense_steps <= 0 or pos.timestep is None or not pos.first_timestep:
            return False
        return pos.timestep > (1.0 - dense_steps) * pos.first_timestep
