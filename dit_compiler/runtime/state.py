"""Where a compiled DiT stands in a generation, told from its timestep input alone.

Diffusers pipelines call the transformer once per denoising step and branch: with classifier-free guidance the
conditional and unconditional calls share a timestep (two calls, same value), the timestep falls from step to
step, and a new generation starts when it rises again. A graph without a timestep input counts every call as a step.

The value read is the maximum of the timestep tensor, so per-sample and per-token timesteps (Wan2.2 TI2V gives its
first latent frame t=0) read as the step's own timestep.

State stays bounded: a step has at most `MAX_BRANCHES` branches (CFG 2, some guidance schemes 3). The first step of
a generation tells how many branches a step has; a later call that repeats the timestep beyond that count is the
next step (timesteps cast to bf16 collide on neighbouring steps), and calls beyond `MAX_BRANCHES` on the first step
(a benchmark repeating one call) start a new generation, so that nothing keeps growing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MAX_BRANCHES = 3
# Diffusers' schedulers count timesteps on [0, num_train_timesteps = 1000]; a few pipelines pass sigmas on [0, 1].
TIMESTEP_SCALES = (1.0, 1000.0)


@dataclass(frozen=True)
class CallPosition:
    generation: int  # 0 for the first generation, +1 at every reset
    step: int  # denoising step within the generation
    branch: int  # 0, 1, ... for calls that share the step's timestep (CFG)
    timestep: Optional[float]  # the value read (the maximum of the input), None without a timestep input
    reset: bool  # this call started a new generation
    branches: Optional[int] = None  # branches per step, known once the generation's first step is over


def timestep_scale(value):
    """The top of the timestep scale a value lives on: 1000 above 1, else 1 (works on floats and tensors)."""
    if isinstance(value, torch.Tensor):
        return torch.where(value > 1, TIMESTEP_SCALES[1], TIMESTEP_SCALES[0])
    return TIMESTEP_SCALES[1] if value > 1 else TIMESTEP_SCALES[0]


def dense_phase(timestep, dense_steps: float):
    """Whether a call falls in the leading `dense_steps` share of the denoising trajectory.

    Measured on the absolute timestep scale (`timestep_scale`: 1000 down to 0, or 1 down to 0), which every model
    of a pipeline agrees on (Wan2.2's two experts each see half of it) and which needs no step count. `timestep` is
    the maximum of the timestep input: a float, or a 0-dim tensor (then the result is a 0-dim bool tensor computed
    on the device, with no host read).
    """
    return timestep > (1.0 - dense_steps) * timestep_scale(timestep)


def read_timestep(timestep: torch.Tensor) -> torch.Tensor:
    """The reduction the tracker and the dense phase read: the maximum, as a float32 0-dim tensor."""
    return timestep.detach().amax().float()


class StepTracker:
    """Tells step, branch and generation from successive timestep values (host floats)."""

    def __init__(self) -> None:
        self._last: Optional[CallPosition] = None

    def observe(self, value: Optional[float]) -> CallPosition:
        last = self._last
        if last is None:
            pos = CallPosition(0, 0, 0, value, reset=True)
        elif value is None:
            pos = CallPosition(last.generation, last.step + 1, 0, None, reset=False)
        elif value == last.timestep:
            pos = self._repeat(last)
        elif value < last.timestep:
            branches = last.branches if last.branches is not None else last.branch + 1
            pos = CallPosition(last.generation, last.step + 1, 0, value, reset=False, branches=branches)
        else:
            pos = CallPosition(last.generation + 1, 0, 0, value, reset=True)
        self._last = pos
        return pos

    def candidate_branches(self) -> set[int]:
        """The branches the next call can fall on without starting a new generation."""
        if self._last is None:
            return set()
        repeat = self._repeat(self._last)
        return {0} if repeat.reset else {0, repeat.branch}

    @staticmethod
    def _repeat(last: CallPosition) -> CallPosition:
        """A call with the previous call's timestep: another branch, the next step, or a new generation."""
        if last.branches is not None:  # past the first step: the branch count is known
            if last.branch + 1 < last.branches:
                return CallPosition(last.generation, last.step, last.branch + 1, last.timestep, False, last.branches)
            return CallPosition(last.generation, last.step + 1, 0, last.timestep, False, last.branches)
        if last.branch + 1 < MAX_BRANCHES:
            return CallPosition(last.generation, last.step, last.branch + 1, last.timestep, False)
        return CallPosition(last.generation + 1, 0, 0, last.timestep, reset=True)
