"""How every `torch.ops.vsparse` op is registered: a `torch.library.Library` fragment with one kernel per dispatch
key rather than `torch.library.custom_op`, whose per-call Python wrappers cost more than a launch should."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def register_op(schema: str, *, cpu: Callable, cuda: Callable, fake: Callable,
                autograd: Optional[Callable] = None, nondifferentiable: bool = False) -> torch.library.Library:
    """Define `vsparse::<name>` from `schema` with its CPU and CUDA kernels, each under `torch._disable_dynamo` (as
    custom_op does: Dynamo never traces into a launch, wherever the kernel is called from), its fake (meta)
    kernel, and an Autograd kernel called with the dispatch keyset if given (without one, PyTorch's fallback raises
    at backward when an input requires grad). `nondifferentiable`: the result is a constant to autograd (no
    grad_fn, whatever requires grad), for a planner's statistics, so callers need not `detach()` their inputs: a
    detached q became a second view of q after functionalization, which Inductor wrote out a second time for the op
    reading it (tests/test_planners.py). Returns the Library: keep it, its registrations live as long."""
    name = schema.split("(", 1)[0]
    lib = torch.library.Library("vsparse", "FRAGMENT")
    lib.define(schema)
    lib.impl(name, torch._disable_dynamo(cpu), "CPU")
    lib.impl(name, torch._disable_dynamo(cuda), "CUDA")
    if nondifferentiable:
        op = getattr(torch.ops.vsparse, name).default

        def autograd(keyset, *args):
            with torch._C._AutoDispatchBelowAutograd():
                return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
    if autograd is not None:
        lib.impl(name, autograd, "Autograd", with_keyset=True)
    torch.library.register_fake(f"vsparse::{name}", fake, lib=lib)
    return lib
