"""Triton kernel of `torch.ops.vsparse.block_means` (the op and its contract: block_means.py): one program per
(block, batch·head) sums its tokens' rows, ROWS rows at a time (gathered by the order, or consecutive without one),
in float32, and writes their mean."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 64  # rows a step: 64 x 128 elements of a bf16 head are 16 KB in flight per program
NUM_WARPS = 4


@triton.jit
def _block_means_kernel(x_ptr, order_ptr, out_ptr, stride_xb, stride_xh, stride_xs, heads, seq_len, num_blocks,
                        block_size, DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                        GATHER: tl.constexpr):
    block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    start = block * block_size
    count = tl.minimum(block_size, seq_len - start)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, count, ROWS):
        slot = first + tl.arange(0, ROWS)
        inside = slot < count
        if GATHER:
            rows = tl.load(order_ptr + start + slot, mask=inside, other=0)
        else:
            rows = (start + slot).to(tl.int64)
        values = tl.load(x_ptr + b * stride_xb + h * stride_xh + rows[:, None] * stride_xs + cols[None, :],
                         mask=inside[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(values.to(tl.float32), 0)
    tl.store(out_ptr + (bh * num_blocks + block) * DIM + cols, acc / count, mask=col_ok)


def triton_block_means(x: torch.Tensor, order: torch.Tensor | None, block_size: int,
                       out: torch.Tensor | None = None, rows: int = ROWS, num_warps: int = NUM_WARPS):
    """Launch the kernel; inputs are assumed checked (block_means.check_inputs). `out` (contiguous float32
    [B, H, n, D]), if given, receives the result. `rows` (a power of two) and `num_warps`: for benchmark sweeps."""
    batch, heads, seq_len, dim = x.shape
    num_blocks = triton.cdiv(seq_len, block_size)
    shape = (batch, heads, num_blocks, dim)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif not out.is_contiguous() or out.shape != shape or out.dtype != torch.float32:
        raise ValueError(f"out must be contiguous float32 {shape}")
    _block_means_kernel[(num_blocks, batch * heads)](
        x, x if order is None else order.contiguous(), out, x.stride(0), x.stride(1), x.stride(2), heads, seq_len,
        num_blocks, block_size, DIM=dim, BLOCK_D=triton.next_power_of_2(dim), ROWS=rows, GATHER=order is not None,
        num_warps=num_warps)
    return out
