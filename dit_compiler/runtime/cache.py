"""Cache policies: when the block stack may be skipped and what stands in for its outputs.

A policy is one file (`easycache.py` is the first) implementing `CachePolicy`, registered in `POLICIES`; the
`cache` option names one. The runner keeps one policy state per model, generation and CFG branch, and calls:

  probe(state, entry)  -> a 0-dim device tensor (or None while the policy cannot decide yet). The runner reads
                          every probe of a call together with the timestep in one host transfer: the only host
                          read of a forward with the cache on.
  decide(state, value) -> CacheDecision, on the host, from the probe's value.
  reuse(state, entry)  -> the stack's outputs without running it.
  record(state, entry, outputs) after a full computation; must not read device values on the host.

`like_entry[i]` says whether stack output i has the entry's shape (a residual can be added to it); other outputs are
reused as last computed. Tensors handed to `record` are owned by the policy (the runner copies CUDA-graph outputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch


@dataclass(frozen=True)
class CacheDecision:
    reused: bool
    estimate: Optional[float]  # the policy's change estimate for this call (None before it can estimate)


class CachePolicy(Protocol):
    def new_state(self) -> Any: ...

    def probe(self, state: Any, entry: torch.Tensor) -> Optional[torch.Tensor]: ...

    def decide(self, state: Any, value: Optional[float]) -> CacheDecision: ...

    def reuse(self, state: Any, entry: torch.Tensor, like_entry: list[bool]) -> list[torch.Tensor]: ...

    def record(self, state: Any, entry: torch.Tensor, outputs: list[torch.Tensor], like_entry: list[bool]) -> None: ...


def make_policy(name: str, threshold: float) -> CachePolicy:
    from dit_compiler.runtime.easycache import EasyCache

    policies = {"easycache": EasyCache}
    if name not in policies:
        raise ValueError(f"unknown cache policy {name!r}; allowed: {', '.join(sorted(policies))}")
    return policies[name](threshold)
