"""Triton gather of token rows for `torch.ops.vsparse.permute_tokens`: out[b, h, s] = x[b, h, index[((b,) h,) s]].
Writes are contiguous and reads are whole rows (D elements, 16-byte vectors), so the kernel is a copy with gathered
row addresses: it measured 95-97% of a device-to-device copy's bandwidth on H100 (kernels/NOTES.md)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


MAX_BLOCK_D = 256  # columns per program


@triton.jit
def _gather_tokens_kernel(x_ptr, index_ptr, out_ptr, stride_xb, stride_xh, stride_xs, stride_ib, stride_ih, heads,
                          seq_len, DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    rows = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = rows < seq_len
    keep = inside[:, None] & (cols < DIM)[None, :]
    src = tl.load(index_ptr + b * stride_ib + h * stride_ih + rows, mask=inside, other=0)
    values = tl.load(x_ptr + b * stride_xb + h * stride_xh + src[:, None] * stride_xs + cols[None, :], mask=keep)
    tl.store(out_ptr + (bh * seq_len + rows)[:, None] * DIM + cols[None, :], values, mask=keep)


def triton_permute_tokens(x: torch.Tensor, index: torch.Tensor, block_s: int = 64, num_warps: int = 4,
                          out: torch.Tensor | None = None):
    """Launch the gather; `out` (contiguous, like x) receives the result if given."""
    batch, heads, seq_len, dim = x.shape
    index = index.contiguous()
    if out is None:
        out = torch.empty(batch, heads, seq_len, dim, dtype=x.dtype, device=x.device)
    elif not out.is_contiguous() or out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError("out must be contiguous with x's shape and dtype")
    # [S], [H, S] or [B, H, S]: a missing leading dim is shared (stride 0).
    stride_ib, stride_ih = ([0, 0] + list(index.stride()[:-1]))[-2:]
    # Wide rows (a whole hidden state, D = heads * head dim) are split over a third grid dim.
    block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
    grid = (triton.cdiv(seq_len, block_s), batch * heads, triton.cdiv(dim, block_d))
    _gather_tokens_kernel[grid](x, index, out, x.stride(0), x.stride(1), x.stride(2), stride_ib, stride_ih, heads,
                                seq_len, DIM=dim, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=num_warps)
    return out
