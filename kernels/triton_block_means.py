"""Triton kernel of `torch.ops.vsparse.block_means` (the op and its contract: block_means.py): one program per
(block, batch, group of HEADS_A_PROGRAM heads) sums its tokens' rows, ROWS rows at a time (gathered by the order, or
consecutive without one), in float32, and writes their mean. A group's heads lie side by side in a token's row of
the projections' [B, S, H, D] output, so a program reads HEADS_A_PROGRAM * D contiguous elements a row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 64  # rows a step: 64 x 128 elements of a bf16 head are 16 KB in flight per program
NUM_WARPS = 4
HEADS_A_PROGRAM = 1


@triton.jit
def _block_means_kernel(x_ptr, order_ptr, out_ptr, stride_xb, stride_xh, stride_xs, heads, seq_len, num_blocks,
                        block_size, DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                        HEADS_A_PROGRAM: tl.constexpr, GATHER: tl.constexpr):
    block = tl.program_id(0)
    groups = tl.cdiv(heads, HEADS_A_PROGRAM)
    b = (tl.program_id(1) // groups).to(tl.int64)
    # Columns run over the group's heads: column c is head first_head + c // BLOCK_D, element c % BLOCK_D.
    cols = tl.arange(0, HEADS_A_PROGRAM * BLOCK_D)
    h = (tl.program_id(1) % groups) * HEADS_A_PROGRAM + cols // BLOCK_D
    d = cols % BLOCK_D
    col_ok = (d < DIM) & (h < heads)
    col_offset = b * stride_xb + h.to(tl.int64) * stride_xh + d
    start = block * block_size
    count = tl.minimum(block_size, seq_len - start)
    acc = tl.zeros([HEADS_A_PROGRAM * BLOCK_D], dtype=tl.float32)
    for first in range(0, count, ROWS):
        slot = first + tl.arange(0, ROWS)
        inside = slot < count
        if GATHER:
            rows = tl.load(order_ptr + start + slot, mask=inside, other=0)
        else:
            rows = (start + slot).to(tl.int64)
        values = tl.load(x_ptr + rows[:, None] * stride_xs + col_offset[None, :],
                         mask=inside[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(values.to(tl.float32), 0)
    tl.store(out_ptr + ((b * heads + h) * num_blocks + block) * DIM + d, acc / count, mask=col_ok)


def triton_block_means(x: torch.Tensor, order: torch.Tensor | None, block_size: int,
                       out: torch.Tensor | None = None, rows: int = ROWS, num_warps: int = NUM_WARPS,
                       heads_a_program: int = HEADS_A_PROGRAM):
    """Launch the kernel; inputs are assumed checked (block_means.check_inputs). `out` (contiguous float32
    [B, H, n, D]), if given, receives the result. `rows` and `heads_a_program` (powers of two) and `num_warps`: for
    benchmark sweeps."""
    batch, heads, seq_len, dim = x.shape
    num_blocks = triton.cdiv(seq_len, block_size)
    shape = (batch, heads, num_blocks, dim)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif not out.is_contiguous() or out.shape != shape or out.dtype != torch.float32:
        raise ValueError(f"out must be contiguous float32 {shape}")
    _block_means_kernel[(num_blocks, batch * triton.cdiv(heads, heads_a_program))](
        x, x if order is None else order.contiguous(), out, x.stride(0), x.stride(1), x.stride(2), heads, seq_len,
        num_blocks, block_size, DIM=dim, BLOCK_D=triton.next_power_of_2(dim), ROWS=rows,
        HEADS_A_PROGRAM=heads_a_program, GATHER=order is not None, num_warps=num_warps)
    return out
