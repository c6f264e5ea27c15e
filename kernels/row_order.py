"""`torch.ops.vsparse.descending_order`: each row's ids by descending value, ties in ascending id order (a stable
descending argsort along the last dim), as int32. Planners rank key blocks with it (passes/planners/common.py,
`strongest_blocks`): per query block, hundreds of pooled scores, thousands of rows per call.

Contract: x `[..., n]`, any real dtype. Returns int32 `[..., n]`, each row a permutation of range(n): the same ids as
`x.argsort(dim=-1, descending=True, stable=True)` (NaN ranks first, as torch orders it; -0.0 ties with 0.0). CUDA
float32 rows of up to `TRITON_MAX_ROW` entries run the Triton kernel in triton_row_order.py. On the H100 it ranked
Draft's pooled logits of the Wan-1.3B shape (3,072 rows of 256) in 15.5 µs, where Inductor's own sort took 132.1 µs
and ATen's 88.7; for Wan-14B's (23,640 rows of 591) 612.8 µs against 712.1 and 715.2 (kernels/NOTES.md). Longer
rows, other dtypes and CPU run ATen's argsort.
"""
from __future__ import annotations

import torch

from dit_compiler.kernels.registration import register_op

TRITON_MAX_ROW = 1024  # the kernel sorts a whole row in one warp's registers; measured up to 1024 padded entries
SCHEMA = "descending_order(Tensor x) -> Tensor"


def check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the rows' entries are its last)")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"x must be real, got {x.dtype}")


def reference_descending_order(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=-1, descending=True, stable=True).to(torch.int32)


def _cpu_kernel(x):
    check_input(x)
    return reference_descending_order(x)


_triton = None  # triton_row_order, imported on the first CUDA call


def _cuda_kernel(x):
    global _triton
    check_input(x)
    if x.dtype != torch.float32 or x.shape[-1] > TRITON_MAX_ROW:
        return reference_descending_order(x)
    if _triton is None:
        from dit_compiler.kernels import triton_row_order as _triton
    return _triton.triton_descending_order(x)


def _fake_kernel(x):
    return torch.empty(x.shape, dtype=torch.int32, device=x.device)


# No autograd kernel: ids are not differentiable (PyTorch's fallback raises at backward if an input requires grad).
_lib = register_op(SCHEMA, cpu=_cpu_kernel, cuda=_cuda_kernel, fake=_fake_kernel)
descending_order = torch.ops.vsparse.descending_order
