"""How every `torch.ops.vsparse` op is registered: a `torch.library.Library` fragment with one kernel per dispatch
key rather than `torch.library.custom_op`, whose per-call Python wrappers cost more than a launch should."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def register_op(schema: str, *, cpu: Callable, cuda: Callable, fake: Callable,
                autograd: Optional[Callable] = None) -> torch.library.Library:
    """Define `vsparse::<name>` from `schema` with its CPU and CUDA kernels, each under `torch._disable_dynamo` (as
    custom_op does: Dynamo never traces into a launch, wherever the kernel is called from), its fake (meta)
    kernel, and an Autograd kernel called with the dispatch keyset if given (without one, PyTorch's fallback raises
    at backward when an input requires grad). Returns the Library: keep it, its registrations live as long."""
    name = schema.split("(", 1)[0]
    lib = torch.library.Library("vsparse", "FRAGMENT")
    lib.define(schema)
    lib.impl(name, torch._disable_dynamo(cpu), "CPU")
    lib.impl(name, torch._disable_dynamo(cuda), "CUDA")
    if autograd is not None:
        lib.impl(name, autograd, "Autograd", with_keyset=True)
    torch.library.register_fake(f"vsparse::{name}", fake, lib=lib)
    return lib
