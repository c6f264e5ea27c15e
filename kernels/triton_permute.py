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

from dit_compiler.kernels.triton_launch import Relaunch


MAX_BLOCK_D = 256  # columns per program
MAX_TENSORS = 3  # tensors one launch moves (q, k, v), reading the index and the head flag once for all
# Rows per program and warps: with 4 warps, 64 rows of 128 columns spilled registers on sm_90 (the row addresses are
# 64-bit on both sides; tests/test_kernels_compile_for_hopper.py).
BLOCK_S, NUM_WARPS = 64, 8


@triton.jit
def _move_tokens_kernel(x0_ptr, x1_ptr, x2_ptr, index_ptr, moved_ptr, out0_ptr, out1_ptr, out2_ptr, stride_xb,
                        stride_xh, stride_xs, stride_ob, stride_oh, stride_os, stride_ib, stride_ih, stride_mb,
                        stride_mh, heads, seq_len, DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                        SCATTER: tl.constexpr, HAS_MOVED: tl.constexpr, NUM_TENSORS: tl.constexpr):
    """Gather: out[b, h, s] = x[b, h, index[s]]; SCATTER: out[b, h, index[s]] = x[b, h, s]; for the first
    NUM_TENSORS (x, out) pairs, which share strides, one pair a program (grid dim 2: pair, then column split: a
    program moving all three held them in registers at once and spilled on sm_90). HAS_MOVED: only heads whose
    moved[b, h] is set."""
    COL_SPLITS: tl.constexpr = (DIM + BLOCK_D - 1) // BLOCK_D
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    pair = tl.program_id(2) // COL_SPLITS
    x_ptr, out_ptr = x0_ptr, out0_ptr
    if NUM_TENSORS > 1:
        if pair == 1:
            x_ptr, out_ptr = x1_ptr, out1_ptr
    if NUM_TENSORS > 2:
        if pair == 2:
            x_ptr, out_ptr = x2_ptr, out2_ptr
    rows = tile * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    cols = (tl.program_id(2) % COL_SPLITS) * BLOCK_D + tl.arange(0, BLOCK_D)
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


class MoveLaunch:
    """One launch of a move as compiled for its tensors' shapes, strides, dtype and alignment, with the arguments
    that depend only on those: called with a later call's tensors that match them all (the block-sparse launcher's
    launch key covers them), it launches the compiled kernel again (triton_launch.Relaunch), without
    JITFunction.run's binding and specialization."""

    def __init__(self, compiled, grid, members: tuple, args: tuple, shape_args: tuple):
        self.launch, self.pick, self.shape_args = Relaunch(compiled, grid, args), _slots(members), shape_args

    def __call__(self, xs, index: torch.Tensor, outs, moved: Optional[torch.Tensor] = None) -> None:
        self.launch(*(xs[i] for i in self.pick), index, _flags(index, moved), *(outs[i] for i in self.pick),
                    *self.shape_args)


def _slots(members: tuple) -> list:
    """The tensor of each of the kernel's MAX_TENSORS slots: the members, then the last again (unread)."""
    return [members[min(i, len(members) - 1)] for i in range(MAX_TENSORS)]


def _flags(index: torch.Tensor, moved: Optional[torch.Tensor]) -> torch.Tensor:
    return index if moved is None else moved.view(torch.uint8)


def move_tokens(xs, index: torch.Tensor, outs, moved: Optional[torch.Tensor] = None, scatter: bool = False) -> list:
    """Launch a move of each x of `xs` (one shape and dtype, [B, H, S, D], any strides with a contiguous last dim)
    into the out at its position in `outs` (likewise) by `index` ([S], [H, S] or [B, H, S] int64): a gather, or with
    `scatter` its inverse. `moved` (bool [B|1, H]): only those heads. Tensors whose strides agree (on both sides)
    share a launch. Returns the compiled launches as `MoveLaunch`es (None under the interpreter)."""
    batch, heads, seq_len, dim = xs[0].shape
    index = index.contiguous()
    # A missing or size-1 leading dim is shared (stride 0).
    stride_ib, stride_ih = ([0, 0] + [st if n > 1 else 0 for n, st in zip(index.shape[:-1], index.stride()[:-1])])[-2:]
    stride_mb = stride_mh = 0
    if moved is not None:
        stride_mb, stride_mh = (st if n > 1 else 0 for n, st in zip(moved.shape, moved.stride()))
    flags = _flags(index, moved)
    # Wide rows (a whole hidden state, D = heads * head dim) are split over a third grid dim.
    block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
    rows_grid = (triton.cdiv(seq_len, BLOCK_S), batch * heads)
    groups: dict = {}
    for i, (x, out) in enumerate(zip(xs, outs)):
        groups.setdefault((x.stride()[:3], out.stride()[:3]), []).append(i)
    launches = []
    for (x_strides, out_strides), members in groups.items():
        for first in range(0, len(members), MAX_TENSORS):
            chunk = tuple(members[first:first + MAX_TENSORS])
            pick = _slots(chunk)
            grid = (*rows_grid, len(chunk) * triton.cdiv(dim, block_d))
            shape_args = (*x_strides, *out_strides, stride_ib, stride_ih, stride_mb, stride_mh, heads, seq_len, dim,
                          block_d, BLOCK_S, scatter, moved is not None, len(chunk))
            tensors = (*(xs[i] for i in pick), index, flags, *(outs[i] for i in pick))
            compiled = _move_tokens_kernel[grid](
                *tensors, *shape_args[:-6], DIM=dim, BLOCK_D=block_d, BLOCK_S=BLOCK_S, SCATTER=scatter,
                HAS_MOVED=moved is not None, NUM_TENSORS=len(chunk), num_warps=NUM_WARPS)
            launches.append(None if compiled is None else
                            MoveLaunch(compiled, grid, chunk, (*tensors, *shape_args), shape_args))
    return launches


def triton_permute_tokens(x: torch.Tensor, index: torch.Tensor, out: Optional[torch.Tensor] = None):
    """`permute_tokens`' gather; `out` (contiguous, like x) receives the result if given."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif not out.is_contiguous() or out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError("out must be contiguous with x's shape and dtype")
    move_tokens((x,), index, (out,))
    return out
