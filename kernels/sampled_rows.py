"""`torch.ops.vsparse.sampled_rows_attention`: attention of a few sampled query rows under several token masks at
once, the measurement a planner makes to choose among candidate masks (Sparse VideoGen's online profiling). The op,
its fake implementation, its checks and the pure-torch reference that serves CPU execution and is the tests' oracle;
the Triton kernels that serve CUDA are in triton_sampled_rows.py.

Contract: q, k, v `[B, H, Sq|Skv, D]` (last dim contiguous, fp16 / bf16 / fp32; on CUDA the block-sparse op's
head dims), `rows` int64 `[R]` (query rows), `masks` bool `[C, R, Skv]` (True = the row may see that key).
Returns float32 `[B, H, C, R, D]`: per candidate c, softmax(q[rows] kᵀ·scale over the keys masks[c] allows) v; a
row that may see no key gives zeros. `skip` (a 0-dim bool tensor on q's device) set means the caller will not use
the result this call (a planner in the dense phase): the op returns zeros without computing them, and reads the flag
on the device, so there is no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch

from dit_compiler.kernels.attention_op import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, check_bhsd
from dit_compiler.kernels.registration import register_op

SCHEMA = "sampled_rows_attention(Tensor q, Tensor k, Tensor v, Tensor rows, Tensor masks, float scale, " \
         "Tensor? skip=None) -> Tensor"


def check_inputs(q, k, v, rows, masks, skip) -> None:
    """Raise TypeError / ValueError naming what is wrong; reads metadata only (never the device)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("rows", rows), ("masks", masks)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype in {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_bhsd(name, t)
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k, v {tuple(k.shape)}, {tuple(v.shape)} must match each other, and q {tuple(q.shape)} "
                         f"in B, H and D")
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise ValueError(f"rows must be int64 [R], got {rows.dtype} {tuple(rows.shape)}")
    if masks.dtype != torch.bool or masks.dim() != 3 or masks.shape[1:] != (rows.shape[0], k.shape[2]):
        raise ValueError(f"masks must be bool [C, R={rows.shape[0]}, Skv={k.shape[2]}], got {masks.dtype} "
                         f"{tuple(masks.shape)}")
    if skip is not None and (not isinstance(skip, torch.Tensor) or skip.dtype != torch.bool or skip.dim() != 0):
        raise ValueError(f"skip must be a 0-dim bool tensor or None, got {skip!r}")
    for name, t in (("k", k), ("v", v), ("rows", rows), ("masks", masks), ("skip", skip)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


MASK_ROW_BYTES = 16  # the CUDA kernel reads the masks through TMA: each row must start on a multiple of 16 bytes


def padded_masks(masks: torch.Tensor) -> torch.Tensor:
    """A copy of `masks` [C, R, Skv] bool that the CUDA kernel reads as it is: one [C*R, Skv] matrix whose rows start
    MASK_ROW_BYTES apart (a view of a buffer with padded rows). A planner stores its constant masks this way, so the
    op copies nothing per call; pure torch, so it traces with symbolic sizes."""
    num_masks, num_rows, kv_len = masks.shape
    padded = (kv_len + MASK_ROW_BYTES - 1) // MASK_ROW_BYTES * MASK_ROW_BYTES
    out = torch.empty(num_masks, num_rows, padded, dtype=torch.bool, device=masks.device)[..., :kv_len]
    return out.copy_(masks)


def aligned_masks(masks: torch.Tensor) -> torch.Tensor:
    """`masks` itself when the CUDA kernel can read them as they are (rows as `padded_masks` lays them out, on an
    aligned base), else `padded_masks(masks)`. Reads the data pointer: real tensors only."""
    num_rows, row_stride = masks.shape[1], masks.stride(1)
    if (masks.stride(2) == 1 and masks.stride(0) == num_rows * row_stride and row_stride % MASK_ROW_BYTES == 0
            and masks.data_ptr() % MASK_ROW_BYTES == 0):
        return masks
    return padded_masks(masks)


def check_kernel_head_dim(q) -> None:
    """The Triton kernels' head dims (the reference takes any)."""
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS} on CUDA, got {q.shape[3]}")


def reference_sampled_rows_attention(q, k, v, rows, masks, scale: float, skip: Optional[torch.Tensor] = None):
    """Pure torch, in float32 (float64 for float64 inputs): one softmax per mask over the sampled rows' scores."""
    batch, heads, _, head_dim = q.shape
    if skip is not None and bool(skip):
        return torch.zeros(batch, heads, masks.shape[0], rows.shape[0], head_dim, device=q.device)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q[:, :, rows].to(compute) @ k.to(compute).transpose(-1, -2) * scale)[:, :, None]  # [B, H, 1, R, Skv]
    scores = scores.masked_fill(~masks, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    total = weights.sum(-1, keepdim=True)
    out = torch.where(total > 0, (weights @ v.to(compute)[:, :, None]) / total.clamp_min(torch.finfo(compute).tiny), 0)
    return out.float()


def _cpu_kernel(q, k, v, rows, masks, scale, skip=None):
    check_inputs(q, k, v, rows, masks, skip)
    return reference_sampled_rows_attention(q, k, v, rows, masks, scale, skip)


_triton = None  # triton_sampled_rows, imported on the first CUDA call


def _cuda_kernel(q, k, v, rows, masks, scale, skip=None):
    global _triton
    if _triton is None:
        from dit_compiler.kernels import triton_sampled_rows as _triton
    check_inputs(q, k, v, rows, masks, skip)
    check_kernel_head_dim(q)
    return _triton.triton_sampled_rows_attention(q, k, v, rows, masks, scale, skip)


def _fake_kernel(q, k, v, rows, masks, scale, skip=None):
    if q.dim() != 4 or masks.dim() != 3 or rows.dim() != 1:
        raise ValueError("q must be [B, H, S, D], rows [R] and masks [C, R, Skv]")
    return q.new_empty(q.shape[0], q.shape[1], masks.shape[0], rows.shape[0], q.shape[3], dtype=torch.float32)


# The result only chooses among masks.
_lib = register_op(SCHEMA, cpu=_cpu_kernel, cuda=_cuda_kernel, fake=_fake_kernel, nondifferentiable=True)
sampled_rows_attention = torch.ops.vsparse.sampled_rows_attention
