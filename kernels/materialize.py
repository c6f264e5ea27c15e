"""`torch.ops.vsparse.materialize`: x copied into a new contiguous tensor, as an op Inductor cannot see into.

Why an op rather than `clone`: Inductor inlines a pointwise value into each of its readers and recomputes it there;
`clone` is inlined the same way. Behind this op the value is computed once and every reader loads the copy
(passes/shared_values.py). Registered as the other vsparse ops are (kernels/registration.py).
"""
from __future__ import annotations

import torch

from dit_compiler.kernels.registration import register_op

SCHEMA = "materialize(Tensor x) -> Tensor"


def _copy(x):
    return x.clone(memory_format=torch.contiguous_format)


def _fake(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# No autograd kernel: the pass inserting it runs for inference graphs only (backend: grad mode compiles as is).
_lib = register_op(SCHEMA, cpu=_copy, cuda=_copy, fake=_fake)
materialize = torch.ops.vsparse.materialize
