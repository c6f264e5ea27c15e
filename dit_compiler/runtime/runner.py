"""The callable the backend returns: runs the compiled graph (or its head / stack / tail pieces) with run-time state.

One `DiTRunner` per compiled graph. It reads the timestep input to tell step, CFG branch and generation, passes the
`dense` flag to rewritten attention, lets EasyCache skip the block stack, strips the extra outputs our passes add
(per-site mask counts, masks when dumping) and writes one `runtime.jsonl` line per call. State lives here, never
on module attributes that Dynamo would guard on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dit_compiler.runtime.easycache import CacheDecision, EasyCache
from dit_compiler.runtime.state import CallPosition, StepTracker


@dataclass
class SparseSiteOutputs:
    """Where the per-site extras of a dumping graph sit among its outputs: after the model's own outputs, one
    visited-block fraction per rewritten site, then one block-bool mask per site."""

    names: list[str]  # site node names, in output order
    start: int  # index of the first fraction output


class CachedStack(torch.nn.Module):
    """Stands in for the compiled stack piece inside the split parent graph and applies EasyCache."""

    def __init__(self, compiled: Callable, runner: "DiTRunner", entry_index: int, like_entry: list[bool],
                 single_output: bool):
        super().__init__()
        self.compiled = compiled
        self.runner = runner
        self.entry_index = entry_index
        self.like_entry = like_entry
        self.single_output = single_output  # the piece returns one value, not a tuple

    def forward(self, *args):
        runner = self.runner
        entry = args[self.entry_index]
        decision = runner.cache.decide(runner.position.branch, entry)
        runner.last_cache = decision
        if decision.reused:
            outputs = runner.cache.reuse(runner.position.branch, entry, self.like_entry)
        else:
            result = self.compiled(*args)
            outputs = [result] if self.single_output else list(result)
            runner.cache.record(runner.position.branch, entry, outputs, self.like_entry)
        return outputs[0] if self.single_output else tuple(outputs)


@dataclass
class DiTRunner:
    compiled: Callable  # compiled graph, or the split parent whose stack is a CachedStack
    num_user_outputs: int
    timestep_index: Optional[int]
    dense_steps: float
    uses_dense_flag: bool
    sites: Optional[SparseSiteOutputs] = None
    cache: Optional[EasyCache] = None
    dump: Optional[object] = None  # dit_compiler.dump.Dump
    tracker: StepTracker = field(default_factory=StepTracker)
    position: Optional[CallPosition] = None
    last_cache: Optional[CacheDecision] = None
    calls: int = 0
    _flags: dict = field(default_factory=dict)

    def _dense_flag(self, dense: bool, device: torch.device) -> torch.Tensor:
        key = (dense, device)
        if key not in self._flags:
            self._flags[key] = torch.tensor(dense, device=device)
        return self._flags[key]

    def __call__(self, *args):
        timestep = args[self.timestep_index] if self.timestep_index is not None else None
        self.position = pos = self.tracker.observe(timestep)
        if pos.reset and self.cache is not None:
            self.cache.reset()
        self.last_cache = None
        dense = self.tracker.dense_phase(pos, self.dense_steps)
        call_args = list(args)
        if self.uses_dense_flag:
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            call_args.append(self._dense_flag(dense, device))
        outputs = self.compiled(*call_args)
        if self.dump is not None:
            self._record(pos, dense, outputs)
        self.calls += 1
        return tuple(outputs[: self.num_user_outputs])

    def _record(self, pos: CallPosition, dense: bool, outputs) -> None:
        reused = bool(self.last_cache and self.last_cache.reused)
        record = {"call": self.calls, "generation": pos.generation, "step": pos.step, "branch": pos.branch,
                  "timestep": pos.timestep, "dense_phase": dense,
                  "cache": None if self.cache is None else ("reuse" if reused else "compute"),
                  "cache_accumulated": None if self.last_cache is None else self.last_cache.accumulated,
                  "cache_rate": None if self.last_cache is None else self.last_cache.rate}
        if self.sites is not None and not reused:
            count = len(self.sites.names)
            fractions = outputs[self.sites.start: self.sites.start + count]
            record["density"] = {name: round(float(f), 4) for name, f in zip(self.sites.names, fractions)}
            if not dense and not self.dump.masks_written:
                masks = outputs[self.sites.start + count: self.sites.start + 2 * count]
                self.dump.write_masks(self.sites.names, list(masks))
        self.dump.append_runtime(record)
