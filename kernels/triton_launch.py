"""A compiled Triton kernel launched again for calls whose arguments differ from a recorded launch's only in their
tensors' data and the current stream (the callers' launch keys pin every shape, stride, dtype and alignment).

Triton's runner (`CompiledKernel[grid](...)`) redoes per call, in Python: the current device and stream, the launch
metadata, the scratch checks, and for each host TMA descriptor a fresh CUtensorMap (cuTensorMapEncodeTiled) spliced with
the descriptor's shape and strides into the argument list. For the block-sparse kernel's four to eight descriptors that
was 20–30 µs of a 58–66 µs call on an H100 host (kernels/NOTES.md, "The op's host path"). `Relaunch` takes, once, the
argument list Triton's launcher hands its C launch function, by running Triton's own launcher code with that function
swapped for a recorder (twice: the second time with new tensor, descriptor and float objects, so the entries that change
per call show by identity); a call copies that list, puts in its tensors, floats, the current stream and each
descriptor's CUtensorMap and calls the C function directly. A CUtensorMap holds the base address, shape, strides, tile
and element type, of which only the address can change under one record, so the maps are kept per base address. The list
keeps no tensor of the recorded call: under CUDA graphs that would be pool memory no output tracks.

Nothing here is specific to a Triton version beyond what the recording checks (the runner's launcher object has a
`launch` attribute, and its argument list leads with gridX, gridY, gridZ, stream, function). Where the recording
finds anything else (another layout, global or profile scratch, launch hooks, an entry it cannot place), the
relaunch is not `direct` and launches through Triton's runner; so does every call while launch hooks (Proton) are
set.
"""
from __future__ import annotations

import copy
import sys
import types
from typing import Optional

import torch
from triton import knobs
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

_MAX_MAPS = 64  # CUtensorMaps kept per descriptor: a site's buffers come back at a few addresses


def _hooks_set() -> bool:
    """Whether launch hooks are registered (Triton 3.6+: hook chains, empty by default; before: a hook or None)."""
    return any(getattr(hook, "calls", hook is not None)
               for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


def descriptor_like(fields: dict, base: torch.Tensor) -> TensorDescriptor:
    """A recorded descriptor's copy over another tensor of its shape, strides and dtype, without TensorDescriptor's
    per-construction validation (the recorded one passed it; the caller's launch key pins the rest)."""
    desc = TensorDescriptor.__new__(TensorDescriptor)
    desc.__dict__.update(fields)
    desc.base = base
    return desc


def _alias(arg):
    """The same value under a new object (a tensor, a descriptor over one, a float), so its entries show by
    identity. Ints stay: the callers' launch keys pin them (Triton specializes on them anyway)."""
    if isinstance(arg, torch.Tensor):
        return arg.detach()
    if isinstance(arg, TensorDescriptor):
        return descriptor_like(arg.__dict__, arg.base.detach())
    if type(arg) is float:
        return arg + 0.0
    return arg


class Relaunch:
    """`relaunch(*args)` launches the recorded kernel on the recorded grid: `args` as the runner took them, except
    that each descriptor is given as its base tensor (None where the runner took None). Tensors and floats change
    per call; ints and constants are the recorded ones. `direct` says whether calls skip Triton's runner."""

    def __init__(self, compiled, grid, args: tuple):
        """From `compiled[grid](*args)`, just launched."""
        self.runner = compiled[grid]
        self.fields = {j: dict(a.__dict__, base=None) for j, a in enumerate(args) if isinstance(a, TensorDescriptor)}
        self.maps: dict = {j: {} for j in self.fields}
        self.c_launch = None
        self._take_apart(compiled, grid, args)
        self.direct = self.c_launch is not None

    def _take_apart(self, compiled, grid, args) -> None:
        """Record the C launch function and its argument list, or leave `c_launch` None where the launcher is not
        one this can take apart."""
        run = getattr(compiled, "run", None)
        launch = getattr(run, "launch", None)
        if (launch is None or _hooks_set() or getattr(run, "global_scratch_size", 1)
                or getattr(run, "profile_scratch_size", 1)):
            return
        code = getattr(launch, "__code__", None)
        if code is not None and "launcher" in code.co_freevars:  # Triton's descriptor wrapper around the C function
            at = code.co_freevars.index("launcher")
            cells = launch.__closure__
            c_launch = cells[at].cell_contents

            def with_c_launch(fn):
                closure = tuple(types.CellType(fn) if i == at else cell for i, cell in enumerate(cells))
                return types.FunctionType(code, launch.__globals__, code.co_name, launch.__defaults__, closure)
        else:
            c_launch = launch

            def with_c_launch(fn):
                return fn
        self.device = driver.active.get_current_device()
        self.current_stream = driver.active.get_current_stream
        stream = self.current_stream(self.device)

        def final_args(call_args):
            got = []
            probe = copy.copy(run)
            probe.launch = with_c_launch(lambda *final: got.append(final))
            probe(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                  *call_args)
            return got[0] if len(got) == 1 else None

        first, aliases = final_args(args), [_alias(a) for a in args]
        second = final_args(aliases)
        if first is None or second is None or len(first) != len(second) or len(first) < 5 or first[3] is not stream:
            return
        slots = _places(first, second, args, aliases)
        # Triton's descriptor metadata follows the descriptors given (a None one is a constant, not a parameter).
        metas = list(getattr(compiled.metadata, "tensordesc_meta", None) or [None] * len(self.fields))
        self.make_map = getattr(sys.modules[type(run).__module__], "make_tensordesc_arg", None)
        if slots is None or len(metas) != len(self.fields) or (self.make_map is None and any(m for *_, m in slots)):
            return
        self.metas = dict(zip(self.fields, metas))
        self.nested = isinstance(first[-1], list)  # Triton 3.7 passes the kernel's arguments as one list
        self.top = list(first[:-1]) if self.nested else list(first)
        self.kernel_args = list(first[-1]) if self.nested else None
        # The per-call entries are filled by every call: holding the recorded call's tensors would keep them alive
        # (under CUDA graphs, memory of the graphs' pool that no output tracks: cudagraph trees refuse to record).
        for nested, pos, _, _ in slots:
            (self.kernel_args if nested else self.top)[pos] = None
        self.slots, self.c_launch = slots, c_launch

    def _map(self, j: int, base: torch.Tensor):
        """Argument j's CUtensorMap over `base`, encoded by Triton's own code the first time at this address."""
        maps = self.maps[j]
        found = maps.get(base.data_ptr())
        if found is None:
            if len(maps) >= _MAX_MAPS:
                maps.clear()
            found = maps[base.data_ptr()] = self.make_map(descriptor_like(self.fields[j], base), self.metas[j])[0]
        return found

    def __call__(self, *args) -> None:
        if self.c_launch is None or _hooks_set():
            self.runner(*(descriptor_like(self.fields[j], a) if j in self.fields and a is not None else a
                          for j, a in enumerate(args)))
            return
        top = self.top.copy()
        top[3] = self.current_stream(self.device)
        kernel_args = self.kernel_args.copy() if self.nested else None
        for nested, pos, j, is_map in self.slots:
            (kernel_args if nested else top)[pos] = self._map(j, args[j]) if is_map else args[j]
        if self.nested:
            top.append(kernel_args)
        self.c_launch(*top)


def _places(first, second, args, aliases) -> Optional[list]:
    """Where each argument's per-call entries sit in the C function's arguments: (nested, position, argument,
    whether it is the argument's CUtensorMap); None where an entry that changed cannot be placed."""
    def entries(final):
        if isinstance(final[-1], list):
            return [(False, i, x) for i, x in enumerate(final[:-1])] + [(True, i, x) for i, x in enumerate(final[-1])]
        return [(False, i, x) for i, x in enumerate(final)]

    a, b = entries(first), entries(second)
    if len(a) != len(b):
        return None
    alias_of = {id(al): j for j, (al, arg) in enumerate(zip(aliases, args)) if al is not arg}
    base_of = {id(al.base): j for j, al in enumerate(aliases) if isinstance(al, TensorDescriptor)}
    descriptors = [j for j, arg in enumerate(args) if isinstance(arg, TensorDescriptor)]
    slots, maps = [], []  # maps: the descriptors whose map has been placed, in order
    for (nested, pos, x), (_, _, y) in zip(a, b):
        if x is y:
            continue
        j = alias_of.get(id(y), base_of.get(id(y)))  # a tensor or float argument, or a descriptor's base
        if j is not None:
            slots.append((nested, pos, j, False))
        elif (type(x) is type(y) and not isinstance(y, (torch.Tensor, int, float, str))
              and len(maps) < len(descriptors)):
            maps.append(descriptors[len(maps)])  # a descriptor's map; maps come in the descriptors' order
            slots.append((nested, pos, maps[-1], True))
        else:
            return None
    if {j for _, _, j, _ in slots} != set(alias_of.values()) or (maps and maps != descriptors):
        return None
    return slots
