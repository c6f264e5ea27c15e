"""The callable the backend returns: runs the compiled graph (or its head / stack / tail pieces) with run-time state.

One `DiTRunner` per compiled graph, one `ModelState` per model instance that calls it. Dynamo shares one compiled
graph between models of the same architecture (their parameters are graph inputs), so state is keyed by the
identity of the model's first parameter: two experts of one pipeline each track their own steps and cache, and a
model's state goes soon after the model does (`ModelStates`). Parameter objects keep their identity when offload
moves their data between devices.

Host reads: none per call when the cache is off and nothing is dumped (the dense phase is decided in the graph from
the timestep); one per call with the cache on (`CachedStack` reads the timestep and the policy's probes together).
The graph's call record ([timestep, dense, density per rewritten site], see passes/call_record.py) stays on the
device in a bounded history that `dit_compiler.stats` reads on demand. Observers (the dump) see every call.
"""
from __future__ import annotations

import logging
import sys
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from dit_compiler.runtime.cache import CacheDecision, CachePolicy
from dit_compiler.runtime.state import CallPosition, StepTracker, dense_phase, read_timestep

HISTORY = 4096  # calls kept per model for stats()
log = logging.getLogger("dit_compiler")


@dataclass
class CallRecord:
    vector: Optional[torch.Tensor]  # the graph's call record, on the device; None for graphs that make none
    position: Optional[CallPosition]  # known on the host when the cache or an observer read it, else None
    cache: Optional[CacheDecision]  # None without the cache


@dataclass
class ModelState:
    index: int  # 0, 1, ... in the order models first called this graph (dumps name them so)
    tracker: StepTracker = field(default_factory=StepTracker)
    branches: dict = field(default_factory=dict)  # cache policy state per CFG branch of the current generation
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    calls: int = 0
    plan: Optional[tuple] = None  # the planners' kept choices (passes/plan_reuse.py), inputs of the next call


class ModelStates:
    """`ModelState` per model, keyed by its first parameter's identity (never by address).

    The key is held strongly: a weak reference would make `Module.to()` fail wherever it swaps parameters
    (`torch.utils.swap_tensors` refuses a tensor with weak references; `Module.to()` swaps tensor-subclass parameters
    such as torchao's, and every parameter under `torch.__future__.set_swap_module_params_on_conversion(True)`).
    Swapping, like the default `param.data = ...`, keeps the object, so the state follows the model across devices.
    A key that only this table still holds belongs to a model that is gone: its state is dropped at the next lookup.
    """

    def __init__(self) -> None:
        self._keys: dict[int, Optional[torch.Tensor]] = {}
        self._states: dict[int, ModelState] = {}
        self._count = 0

    def get(self, key: Optional[torch.Tensor]) -> ModelState:
        self._drop_gone()
        slot = id(key)
        if slot in self._states:  # the key is alive (the caller holds it), so its id names no other object
            return self._states[slot]
        if key is not None and torch.__future__.get_overwrite_module_params_on_conversion() and not _warned_overwrite:
            _warned_overwrite.append(True)
            log.warning("vsparse: torch.__future__.get_overwrite_module_params_on_conversion() is on, so Module.to() "
                        "replaces parameter objects; a model's step tracking, cache and stats are kept by its first "
                        "parameter's identity and start afresh after every .to() (accelerate's model offload calls "
                        "it before each forward): outputs stay correct, the cache never reuses")
        state = ModelState(self._count)
        self._count += 1
        self._keys[slot], self._states[slot] = key, state
        return state

    def find(self, keys) -> list[ModelState]:
        """States of live models whose key is among `keys` (tensors)."""
        self._drop_gone()
        return [self._states[id(key)] for key in keys if self._keys.get(id(key), None) is key]

    def _drop_gone(self) -> None:
        for slot, holders in _holders(self._keys).items():
            if holders <= _HELD_BY_ONE_DICT:
                del self._keys[slot], self._states[slot]


def _holders(tensors: dict) -> dict:
    """How many references each value of `tensors` has, counted the same way for every dict."""
    return {slot: sys.getrefcount(t) for slot, t in tensors.items() if t is not None}


# What `_holders` reads for a tensor nothing else holds (measured, since the count depends on the interpreter).
_HELD_BY_ONE_DICT = _holders({0: torch.empty(0)})[0]
_warned_overwrite: list = []  # once per process


@dataclass
class GraphOutputs:
    """How a compiled graph's outputs are laid out: the model's own first, then ours."""

    num_user: int
    record: Optional[int] = None  # index of the call record vector
    site_names: list = field(default_factory=list)  # rewritten sites, in the record's density order
    masks: Optional[int] = None  # index of the first per-site block mask (dumping only)
    plan_state: Optional[int] = None  # index of the first of the planners' state outputs (passes/plan_reuse.py)
    plan_init: Optional[Callable[[], tuple]] = None  # the state a model starts from, passed after the model's inputs


class Observer(Protocol):
    def on_call(self, runner: "DiTRunner", state: ModelState, record: CallRecord, outputs) -> None: ...


@dataclass
class _Call:
    state: ModelState
    timestep: Optional[torch.Tensor]
    position: Optional[CallPosition] = None
    cache: Optional[CacheDecision] = None
    probes: dict = field(default_factory=dict)  # cache probe values by branch, read with the timestep


class DiTRunner:
    """Runs one compiled graph for every model that calls it, with that model's state."""

    def __init__(self, compiled: Callable, outputs: GraphOutputs, *, timestep_index: Optional[int],
                 model_key_index: Optional[int], copies_outputs: bool = False,
                 observers: Optional[list] = None) -> None:
        self.compiled = compiled
        self.outputs = outputs
        self.timestep_index = timestep_index
        self.model_key_index = model_key_index
        self.copies_outputs = copies_outputs  # CUDA graphs overwrite their outputs on the next replay
        self.observers: list[Observer] = list(observers or [])
        self.states = ModelStates()
        self.current: Optional[_Call] = None
        track(self)

    def __call__(self, *args):
        key = args[self.model_key_index] if self.model_key_index is not None else None
        state = self.states.get(key if isinstance(key, torch.Tensor) else None)
        timestep = args[self.timestep_index] if self.timestep_index is not None else None
        self.current = call = _Call(state, timestep)
        plan_state = self.outputs.plan_state
        if plan_state is not None:
            state.plan = state.plan or self.outputs.plan_init()
            args = (*args, *state.plan)
        try:
            outputs = self.compiled(*args)
        finally:
            self.current = None
        if plan_state is not None:
            state.plan = tuple(self.own(t) for t in outputs[plan_state:plan_state + len(state.plan)])
        vector = outputs[self.outputs.record] if self.outputs.record is not None else None
        if vector is not None and self.copies_outputs:
            vector = vector.clone()
        if call.position is None and self.observers:  # observers (the dump) may read the device
            call.position = state.tracker.observe(None if vector is None else _timestep_value(vector))
        record = CallRecord(vector, call.position, call.cache)
        state.history.append(record)
        state.calls += 1
        for observer in self.observers:
            observer.on_call(self, state, record, outputs)
        return tuple(outputs[: self.outputs.num_user])

    def own(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone() if self.copies_outputs else t


def _timestep_value(vector: torch.Tensor) -> Optional[float]:
    value = float(vector[0])
    return None if value != value else value  # NaN: the graph has no timestep input


class CachedStack(torch.nn.Module):
    """Stands in for the compiled stack piece inside the split parent graph and applies the cache policy."""

    def __init__(self, compiled: Callable, runner: DiTRunner, policy: CachePolicy, entry_index: int,
                 like_entry: list[bool], single_output: bool, *, start: float = 0.0,
                 passed_through: Optional[dict] = None):
        super().__init__()
        self.compiled = compiled
        self.runner = runner
        self.policy = policy
        self.entry_index = entry_index
        self.like_entry = like_entry
        self.single_output = single_output  # the piece returns one value, not a tuple
        self.start = start  # `cache_start`: no reuse while the timestep is in this leading share of its scale
        # output index -> input index: state a skipped call leaves as it was (the planners' kept choices)
        self.passed_through = dict(passed_through or {})

    def forward(self, *args):
        call = self.runner.current
        state = call.state
        entry = self.runner.own(args[self.entry_index])
        position = self._position(call, entry)
        branch = state.branches.setdefault(position.branch, self.policy.new_state())
        call.position = position
        in_start = position.timestep is not None and dense_phase(position.timestep, self.start)
        call.cache = decision = (CacheDecision(False, None) if in_start
                                 else self.policy.decide(branch, call.probes.get(position.branch)))
        if decision.reused:
            outputs = self.policy.reuse(branch, entry, self.like_entry)
            for output, given in self.passed_through.items():
                outputs[output] = args[given]
        else:
            result = self.compiled(*args)
            outputs = [result] if self.single_output else list(result)
            self.policy.record(branch, entry, [self.runner.own(o) for o in outputs], self.like_entry)
        return outputs[0] if self.single_output else tuple(outputs)

    def _position(self, call: _Call, entry: torch.Tensor) -> CallPosition:
        """Step, branch and generation of this call, and the policy's probes for the branches it may fall on,
        read from the device in one transfer."""
        state = call.state
        probes = {b: self.policy.probe(state.branches[b], entry)
                  for b in state.tracker.candidate_branches() if b in state.branches}
        probes = {b: p for b, p in probes.items() if p is not None}
        scalars = ([] if call.timestep is None else [read_timestep(call.timestep)]) + list(probes.values())
        values = torch.stack([s.to(entry.device) for s in scalars]).tolist() if scalars else []
        timestep = values.pop(0) if call.timestep is not None else None
        position = state.tracker.observe(timestep)
        if position.reset:
            state.branches.clear()
            call.probes = {}
        else:
            call.probes = dict(zip(probes, values))
        return position


_RUNNERS: weakref.WeakSet = weakref.WeakSet()


def track(runner) -> None:
    """Make a runner's call history visible to `dit_compiler.stats`: anything with `states` (ModelStates) and
    `outputs` (GraphOutputs), a `DiTRunner` or regional compilation's `CallHistory`."""
    _RUNNERS.add(runner)


def runners() -> list:
    """Every live runner (for `dit_compiler.stats`)."""
    return list(_RUNNERS)
