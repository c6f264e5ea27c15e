"""`torch.ops.vsparse.block_means`: the mean of each block of `block_size` consecutive tokens of x taken in a given
order, out[b, h, j] = mean over t in block j of x[b, h, order[t]] (a partial last block averages its real tokens).
The dual planner's pooled maps need q's and k's block means in two token orders; this reads x once per order, as it
was written, with no gathered copy and no scatter. Draft's pooled map takes them in x's own order (`order` None):
Inductor's reduction over those blocks took 144.0 µs a site where this kernel takes 101.1 (H100, kernels/NOTES.md).

Contract: x `[B, H, S, D]` (last dim contiguous; fp16 / bf16 / fp32 on CUDA, any float on CPU), `order` int64 `[S]`
(token ids; any ids in range(S), normally a permutation) or None (the tokens as they are), `block_size` >= 1.
Returns float32 `[B, H, ceil(S / block_size), D]`, summed in float32. CUDA runs the Triton kernel in
triton_block_means.py (imported on first use, so CPU-only installs need no Triton); CPU runs the reference. Why an op:
Inductor materialized the gather of the means' first form (dual's planning 589 µs a site on the H100, README "Results"),
and their scatter form (`index_add` into zeros, four a site) came with a compile of 1.46x Inductor's and 817 generated
kernels against svg's 517 (H200, results/h200-2026-12-05/e2e-svg-dual-4698356.txt); one kernel of our own serves every
site.
"""
from __future__ import annotations

import torch

from dit_compiler.kernels.attention_op import SUPPORTED_DTYPES, check_bhsd
from dit_compiler.kernels.block_mask import num_blocks
from dit_compiler.kernels.registration import register_op

SCHEMA = "block_means(Tensor x, Tensor? order, int block_size) -> Tensor"


def check_inputs(x, order, block_size) -> None:
    """Raise TypeError / ValueError naming what is wrong; reads metadata only."""
    if not isinstance(x, torch.Tensor) or not (order is None or isinstance(order, torch.Tensor)):
        raise TypeError("x must be a Tensor and order a Tensor or None")
    check_bhsd("x", x)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if order is not None:
        if order.dtype != torch.int64 or tuple(order.shape) != (x.shape[2],):
            raise ValueError(f"order must be int64 [S={x.shape[2]}], got {order.dtype} {tuple(order.shape)}")
        if order.device != x.device:
            raise ValueError(f"order is on {order.device}, x on {x.device}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")


def block_counts(seq_len, block_size: int, device=None) -> torch.Tensor:
    """int64 [n]: tokens in each block of a sequence, `block_size` but for a partial last one."""
    n = num_blocks(seq_len, block_size)
    return (seq_len - torch.arange(n, device=device) * block_size).clamp(max=block_size)


def consecutive_block_means(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(means [..., n, D] float32, counts [n]): x [..., S, D] averaged over each block of consecutive tokens, summed
    in float32; the last, possibly partial, block averages only its real tokens. Pure torch that Inductor fuses with
    the kernel producing x (Draft's pooled map of q and k already in window order)."""
    seq_len = x.shape[-2]
    n = num_blocks(seq_len, block_size)
    padded = torch.nn.functional.pad(x, (0, 0, 0, n * block_size - seq_len))
    sums = padded.unflatten(-2, (n, block_size)).sum(-2, dtype=torch.float32)
    counts = block_counts(seq_len, block_size, x.device)
    return sums / counts[:, None], counts


def reference_block_means(x: torch.Tensor, order, block_size: int) -> torch.Tensor:
    """Pure torch: the consecutive block means of the tokens, gathered by `order` unless it is None."""
    return consecutive_block_means(x if order is None else x.index_select(2, order), block_size)[0]


def _cpu_kernel(x, order, block_size):
    check_inputs(x, order, block_size)
    return reference_block_means(x, order, block_size)


_triton = None  # triton_block_means, imported on the first CUDA call


def _cuda_kernel(x, order, block_size):
    global _triton
    check_inputs(x, order, block_size)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype must be one of {SUPPORTED_DTYPES} on CUDA, got {x.dtype}")
    if _triton is None:
        from dit_compiler.kernels import triton_block_means as _triton
    return _triton.triton_block_means(x, order, block_size)


def _fake_kernel(x, order, block_size):
    return x.new_empty(x.shape[0], x.shape[1], num_blocks(x.shape[2], block_size), x.shape[3], dtype=torch.float32)


# The means only rank key blocks.
_lib = register_op(SCHEMA, cpu=_cpu_kernel, cuda=_cuda_kernel, fake=_fake_kernel, nondifferentiable=True)
block_means = torch.ops.vsparse.block_means
