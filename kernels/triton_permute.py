"""Triton moves of token rows: `permute_tokens`' gather, out[b, h, s] = x[b, h, index[((b,) h,) s]], and the
block-sparse launcher's per-head reordering (gather into the order, scatter back out of it) of the heads a flag
selects. Reads and writes are whole rows (D elements, 16-byte vectors), so a move is a copy with indexed row
addresses on one side: the gather measured 95-97% of a device-to-device copy's bandwidth on H100 (kernels/NOTES.md).
Rows of heads the flag leaves out are neither read nor written."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


MAX_BLOCK_D = 256  # columns per program
# Rows per program and warps: with 4 warps, 64 rows of 128 columns spilled registers on sm_90 (the row addresses are
# 64-bit on both sides; tests/test_kernels_compile_for_hopper.py).
BLOCK_S, NUM_WARPS = 64, 8


@triton.jit
def _move_tokens_kernel(x_ptr, index_ptr, moved_ptr, out_ptr, stride_xb, stride_xh, stride_xs, stride_ob, stride_oh,
                        stride_os, stride_ib, stride_ih, stride_mb, stride_mh, heads, seq_len, DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SCATTER: tl.constexpr,
                        HAS_MOVED: tl.constexpr):
    """Gather: out[b, h, s] = x[b, h, index[s]]; SCATTER: out[b, h, index[s]] = x[b, h, s]. HAS_MOVED: only heads
    whose moved[b, h] is set."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    rows = tile * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = rows < seq_len
    if HAS_MOVED:
        inside = inside & (tl.load(moved_ptr + b * stride_mb + h * stride_mh) != 0)
    keep = inside[:, None] & (cols < DIM)[None, :]
    index = tl.load(index_ptr + b * stride_ib + h * stride_ih + rows, mask=inside, other=0)
    if SCATTER:
        src, dst = rows, index
    else:
        src, dst = index, rows
    values = tl.load(x_ptr + b * stride_xb + h * stride_xh + src[:, None] * stride_xs + cols[None, :], mask=keep)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dst[:, None] * stride_os + cols[None, :], values, mask=keep)


def triton_move_tokens(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, moved: Optional[torch.Tensor] = None,
                       scatter: bool = False) -> torch.Tensor:
    """Launch a move of x [B, H, S, D] (any strides, contiguous last dim) into `out` (x's shape, likewise) by
    `index` ([S], [H, S] or [B, H, S] int64): a gather, or with `scatter` its inverse. `moved` (bool [B|1, H]):
    only those heads. Returns out."""
    batch, heads, seq_len, dim = x.shape
    index = index.contiguous()
    # A missing or size-1 leading dim is shared (stride 0).
    stride_ib, stride_ih = ([0, 0] + [st if n > 1 else 0 for n, st in zip(index.shape[:-1], index.stride()[:-1])])[-2:]
    stride_mb = stride_mh = 0
    if moved is not None:
        moved = moved.view(torch.uint8)
        stride_mb, stride_mh = (st if n > 1 else 0 for n, st in zip(moved.shape, moved.stride()))
    # Wide rows (a whole hidden state, D = heads * head dim) are split over a third grid dim.
    block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
    grid = (triton.cdiv(seq_len, BLOCK_S), batch * heads, triton.cdiv(dim, block_d))
    _move_tokens_kernel[grid](x, index, index if moved is None else moved, out, *x.stride()[:3], *out.stride()[:3],
                              stride_ib, stride_ih, stride_mb, stride_mh, heads, seq_len, DIM=dim, BLOCK_D=block_d,
                              BLOCK_S=BLOCK_S, SCATTER=scatter, HAS_MOVED=moved is not None, num_warps=NUM_WARPS)
    return out


def triton_permute_tokens(x: torch.Tensor, index: torch.Tensor, out: Optional[torch.Tensor] = None):
    """`permute_tokens`' gather; `out` (contiguous, like x) receives the result if given."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif not out.is_contiguous() or out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError("out must be contiguous with x's shape and dtype")
    return triton_move_tokens(x, index, out)
