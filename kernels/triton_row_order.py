"""Triton kernel of `descending_order` (the op and its contract: row_order.py).

One program per row: each entry becomes one int64 key, the float's bits made order-preserving as a signed int in the
high half and (N - 1 - id) in the low half, so one descending bitonic sort of unique keys (`tl.sort`, in registers)
orders by value and breaks ties by ascending id; the ids are read back from the low half. Rows are padded to a
power of two with keys below every real one.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _descending_order_kernel(x_ptr, out_ptr, n, N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ids = tl.arange(0, N)
    inside = ids < n
    x = tl.load(x_ptr + row * n + ids, mask=inside, other=0.0)
    x = tl.where(x != x, float("nan"), x + 0.0)  # one NaN (positive: first, as torch ranks NaN) and one zero (+0.0)
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order of the bits = the floats' order
    ordered = tl.where(inside, ordered, -2147483648)  # padding: below -inf's -2139095041
    key = (ordered.to(tl.int64) << 32) | (N - 1 - ids).to(tl.int64)
    key = tl.sort(key, dim=0, descending=True)
    tl.store(out_ptr + row * n + ids, (N - 1 - (key & 0xFFFFFFFF)).to(tl.int32), mask=inside)


def triton_descending_order(x: torch.Tensor, num_warps: Optional[int] = None) -> torch.Tensor:
    """Launch on float32 x [..., n] (n <= row_order.TRITON_MAX_ROW; checked by the op); `num_warps` overrides the
    choice below (benchmarks)."""
    x = x.contiguous()
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    rows = x.numel() // n if n else 0
    if rows:
        padded = triton.next_power_of_2(n)
        # One warp measured fastest at 256 and at 1024 padded entries on the H100; more warps took up to 3.5x
        # longer (kernels/NOTES.md).
        _descending_order_kernel[(rows,)](x, out, n, N=padded, num_warps=num_warps or 1)
    return out
