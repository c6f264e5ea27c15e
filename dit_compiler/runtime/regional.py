"""Run-time state of regional compilation (`dit_compiler.compile_repeated_blocks`): one compiled block graph serves
every block of a model, and every model of that block class with the same options and layout.

- `BlockOwners`: which model and block path a block's parameters belong to (by identity; the block is held weakly,
  never the parameters, which `Module.to()` may swap). A block runner tells the calling model from its graph
  inputs, as `DiTRunner` does: state is never shared between two models of one class.
- `ModelCall`: what the model's forward pre-hook computed for one call (the dense phase, a 0-dim bool on the device,
  from the model's timestep: no host read) and what the blocks report during it (visited-block fractions).
- `BlockRunner`: the callable a sparse block backend returns; feeds the call's dense phase to the block graph as its
  last input and hands the graph's densities to the call.
- `CallHistory`: one per model and layout, laid out as a `DiTRunner` for `dit_compiler.stats`: the model's forward
  hook stacks each call's record `[timestep max, dense, density per sparse site in layer order]` on the device.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dit_compiler.runtime.runner import CallRecord, GraphOutputs, ModelStates, track


class BlockOwners:
    """(owner, block path) for each parameter of a registered block, keyed by the parameter's identity.

    The entry holds the block weakly and the parameter's name in it, never the parameter: `torch.utils.swap_tensors`
    (`Module.to()` for tensor-subclass parameters and under `set_swap_module_params_on_conversion(True)`) refuses a
    tensor with a weak reference. A lookup checks that the block still holds that very object under that name (an
    id may be reused once a parameter is gone); the entries go with the block."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, str, object, str]] = {}

    def add(self, block: torch.nn.Module, owner: object, path: str) -> None:
        slots = [id(param) for param in block.parameters()]

        def forget(ref, slots=slots):
            for slot in slots:
                if self._entries.get(slot, (None,))[0] is ref:
                    del self._entries[slot]

        ref = weakref.ref(block, forget)
        for name, param in block.named_parameters():
            self._entries[id(param)] = (ref, name, owner, path)

    def remove(self, owner: object) -> None:
        for slot in [s for s, entry in self._entries.items() if entry[2] is owner]:
            del self._entries[slot]

    def get(self, param) -> Optional[tuple[object, str]]:
        entry = self._entries.get(id(param))
        if entry is None:
            return None
        block = entry[0]()
        if block is None or _parameter(block, entry[1]) is not param:
            return None
        return entry[2], entry[3]


def _parameter(block: torch.nn.Module, name: str):
    """`block.get_parameter(name)`, or None where the name no longer leads to a parameter."""
    try:
        return block.get_parameter(name)
    except AttributeError:
        return None


OWNERS = BlockOwners()


@dataclass
class ModelCall:
    plan: object  # the layout plan the call runs under (dit_compiler/regional.py)
    t_max: Optional[torch.Tensor]  # 0-dim float32 on the model's device; None without a timestep input
    dense: torch.Tensor  # 0-dim bool on the model's device
    blocks: list = field(default_factory=list)  # (block path, rewritten site indices, densities) per sparse block


class BlockRunner:
    """Runs one compiled sparse block graph for every block (and model) that shares it."""

    def __init__(self, compiled: Callable, outputs: GraphOutputs, rewritten: list[int], model_key_index: int,
                 always_dense: bool, copies_outputs: bool = False) -> None:
        self.compiled = compiled
        self.outputs = outputs
        self.rewritten = rewritten  # indices of the block graph's sites made sparse, in site order
        self.model_key_index = model_key_index
        self.always_dense = always_dense  # the dense phase of a block called outside its model's forward
        self.copies_outputs = copies_outputs

    def __call__(self, *args):
        owner = OWNERS.get(args[self.model_key_index])
        call: Optional[ModelCall] = owner[0].current if owner is not None else None
        if call is not None:
            dense = call.dense
        else:
            dense = torch.full((), self.always_dense, dtype=torch.bool, device=args[self.model_key_index].device)
        outputs = self.compiled(*args, dense)
        if call is not None:
            densities = outputs[self.outputs.record][2:]
            call.blocks.append((owner[1], self.rewritten, densities.clone() if self.copies_outputs else densities))
        return tuple(outputs[: self.outputs.num_user])


class CallHistory:
    """The call records of the models running one layout, read by `dit_compiler.stats` as a `DiTRunner`'s."""

    def __init__(self, site_names: list[str]) -> None:
        self.states = ModelStates()
        self.outputs = GraphOutputs(num_user=0, record=0, site_names=site_names)
        track(self)

    def record(self, key: torch.Tensor, call: ModelCall) -> None:
        head = torch.full((), float("nan"), device=call.dense.device) if call.t_max is None else call.t_max
        vector = torch.cat([torch.stack([head, call.dense.float()])] + [d.float() for _, _, d in call.blocks])
        state = self.states.get(key)
        state.history.append(CallRecord(vector, None, None))
        state.calls += 1
