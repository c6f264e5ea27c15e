"""Triton kernels of `sampled_rows_attention` (the op and its contract: sampled_rows.py).

Each mask makes R "virtual rows" (mask c, sampled row r), each its own masked softmax over the keys. Few rows and many
keys: one program per (key split, batch·head, tile of sampled rows × group of up to MASKS_PER_PROGRAM masks) runs a
flash-attention loop over its split of the keys, scores q·kᵀ of a key tile once for every mask of its group (each
mask keeps its own running maximum, sum and output), and writes a partial (row max, row sum, unnormalized output)
per virtual row; a second kernel merges the splits, so the launch fills the GPU although R is small. K and V are read
once per row tile and mask group; the masks are read as bytes. With `skip` set both kernels read it first: the
first writes nothing, the second writes zeros.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from dit_compiler.kernels.triton_block_sparse import INTERPRET, LOG2E, fold_scores, scores
# (BLOCK_M, BLOCK_N, warps, stages); under the interpreter a small tile keeps the tests quick.
CONFIG = (64, 64, 8, 2)
INTERPRETER_CONFIG = (16, 16, 1, 1)
MASKS_PER_PROGRAM = 3  # masks sharing one q·kᵀ per key tile, each with its own [BLOCK_M, D] accumulator
_SPLIT_WAVES = 4  # programs per SM the key splits aim for
_sm_counts: dict = {}


@triton.jit
def _fold_mask(acc, l_i, m_i, qk, v, masks_ptr, mask, rows, row_ok, keys, key_ok, num_rows, kv_len, qk_scale,
               DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """Fold one key tile's scores into mask `mask`'s running softmax of the tile's rows (those it hides: -inf)."""
    visible = tl.load(masks_ptr + (mask * num_rows + rows)[:, None].to(tl.int64) * kv_len + keys[None, :],
                      mask=row_ok[:, None] & key_ok[None, :], other=0) != 0
    return fold_scores(acc, l_i, m_i, tl.where(visible, qk, float("-inf")), v, qk_scale, DOT_FP32, IEEE)


@triton.jit
def _store_partial(m_ptr, l_ptr, acc_ptr, out, acc, l_i, m_i, ok, dims, HEAD_DIM: tl.constexpr):
    tl.store(m_ptr + out, m_i, mask=ok)
    tl.store(l_ptr + out, l_i, mask=ok)
    tl.store(acc_ptr + out[:, None] * HEAD_DIM + dims[None, :], acc, mask=ok[:, None])


@triton.jit
def _sampled_rows_partial_kernel(
        q_ptr, k_ptr, v_ptr, rows_ptr, masks_ptr, skip_ptr, m_ptr, l_ptr, acc_ptr,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        heads, kv_len, num_rows, num_masks, keys_per_split, padded_virtual, qk_scale,
        HAS_SKIP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        MASKS: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    tile = tl.program_id(2)
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    b = bh // heads
    h = bh % heads
    row_tiles = tl.cdiv(num_rows, BLOCK_M)
    rows = (tile % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    first_mask = (tile // row_tiles) * MASKS  # this program's masks: first_mask .. first_mask + MASKS - 1
    row_ok = rows < num_rows
    token = tl.load(rows_ptr + tl.where(row_ok, rows, 0))
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + token[:, None] * stride_qs + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    if DOT_FP32:  # the interpreter's bf16/fp16 dot is wrong (triton-lang/triton#11584)
        q = q.to(tl.float32)
    # One running (max, sum, output) per mask of the group; a slot past the last mask sees no key and stores nothing.
    ok0 = row_ok
    ok1 = row_ok & (first_mask + 1 < num_masks)
    ok2 = row_ok & (first_mask + 2 < num_masks)
    m0 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m1, l1, acc1, m2, l2, acc2 = m0, l0, acc0, m0, l0, acc0
    first = split * keys_per_split
    last = tl.minimum(first + keys_per_split, kv_len)
    for key_start in tl.range(first, last, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_ok = keys < last
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + keys[:, None] * stride_ks + dims[None, :],
                    mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + keys[:, None] * stride_vs + dims[None, :],
                    mask=key_ok[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = scores(q, k, IEEE)
        acc0, l0, m0 = _fold_mask(acc0, l0, m0, qk, v, masks_ptr, first_mask, rows, ok0, keys, key_ok, num_rows,
                                  kv_len, qk_scale, DOT_FP32, IEEE)
        if MASKS > 1:
            acc1, l1, m1 = _fold_mask(acc1, l1, m1, qk, v, masks_ptr, first_mask + 1, rows, ok1, keys, key_ok,
                                      num_rows, kv_len, qk_scale, DOT_FP32, IEEE)
        if MASKS > 2:
            acc2, l2, m2 = _fold_mask(acc2, l2, m2, qk, v, masks_ptr, first_mask + 2, rows, ok2, keys, key_ok,
                                      num_rows, kv_len, qk_scale, DOT_FP32, IEEE)
    # Partials are indexed by virtual row c * R + r, as the merge and the output are.
    out = (bh * tl.num_programs(0) + split) * padded_virtual + first_mask * num_rows + rows
    _store_partial(m_ptr, l_ptr, acc_ptr, out, acc0, l0, m0, ok0, dims, HEAD_DIM)
    if MASKS > 1:
        _store_partial(m_ptr, l_ptr, acc_ptr, out + num_rows, acc1, l1, m1, ok1, dims, HEAD_DIM)
    if MASKS > 2:
        _store_partial(m_ptr, l_ptr, acc_ptr, out + 2 * num_rows, acc2, l2, m2, ok2, dims, HEAD_DIM)


@triton.jit
def _sampled_rows_merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, skip_ptr, splits, num_virtual, padded_virtual,
                               HAS_SKIP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    virtual = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    out_ptrs = out_ptr + (bh * num_virtual + virtual)[:, None] * HEAD_DIM + dims[None, :]
    ok = virtual < num_virtual
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0:
            tl.store(out_ptrs, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), mask=ok[:, None])
            return
    m_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(splits):
        part = (bh * splits + split) * padded_virtual + virtual
        m_max = tl.maximum(m_max, tl.load(m_ptr + part, mask=ok, other=float("-inf")))
    shift = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for split in range(splits):
        part = (bh * splits + split) * padded_virtual + virtual
        weight = tl.math.exp2(tl.load(m_ptr + part, mask=ok, other=float("-inf")) - shift)
        l_sum += weight * tl.load(l_ptr + part, mask=ok, other=0.0)
        acc += weight[:, None] * tl.load(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None],
                                         other=0.0)
    # Rows that may see no key have l = 0 and acc = 0: they store zeros.
    tl.store(out_ptrs, acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None], mask=ok[:, None])


def _sm_count(device: torch.device) -> int:
    if INTERPRET:
        return 1  # a few splits, so the tests exercise the merge
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]


def triton_sampled_rows_attention(q, k, v, rows, masks, scale: float, skip: Optional[torch.Tensor] = None,
                                  config: Optional[tuple] = None, splits: Optional[int] = None,
                                  out: Optional[torch.Tensor] = None):
    """Launch both kernels; inputs are assumed checked (sampled_rows.check_inputs). `config` (BLOCK_M, BLOCK_N,
    warps, stages) and `splits` (key splits) override the defaults, for benchmarks and tests; `out` (contiguous
    float32 [B, H, C, R, D]), if given, receives the result."""
    batch, heads, _, head_dim = q.shape
    kv_len = k.shape[2]
    num_masks, num_rows = masks.shape[:2]
    num_virtual = num_masks * num_rows
    block_m, block_n, warps, stages = config or (INTERPRETER_CONFIG if INTERPRET else CONFIG)
    group = min(MASKS_PER_PROGRAM, num_masks)
    tiles = triton.cdiv(num_rows, block_m) * triton.cdiv(num_masks, group)
    key_tiles = triton.cdiv(kv_len, block_n)
    if splits is None:
        splits = triton.cdiv(_SPLIT_WAVES * _sm_count(q.device), batch * heads * tiles)
    splits = max(1, min(splits, key_tiles))
    keys_per_split = triton.cdiv(key_tiles, splits) * block_n
    splits = triton.cdiv(kv_len, keys_per_split)  # no split left empty
    padded = triton.cdiv(num_virtual, block_m) * block_m  # the merge's row tiles
    partial_m = torch.empty(batch * heads, splits, padded, dtype=torch.float32, device=q.device)
    partial_l = torch.empty_like(partial_m)
    partial_acc = torch.empty(batch * heads, splits, padded, head_dim, dtype=torch.float32, device=q.device)
    shape = (batch, heads, num_masks, num_rows, head_dim)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
    elif not out.is_contiguous() or out.shape != shape or out.dtype != torch.float32:
        raise ValueError(f"out must be contiguous float32 {shape}")
    flag = skip.view(torch.uint8) if skip is not None else rows  # unread without HAS_SKIP
    masks = masks.contiguous().view(torch.uint8)
    _sampled_rows_partial_kernel[(splits, batch * heads, tiles)](
        q, k, v, rows, masks, flag, partial_m, partial_l, partial_acc, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], heads, kv_len, num_rows, num_masks, keys_per_split, padded, scale * LOG2E,
        HAS_SKIP=skip is not None, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, MASKS=group,
        DOT_FP32=INTERPRET, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    _sampled_rows_merge_kernel[(batch * heads, padded // block_m)](
        partial_m, partial_l, partial_acc, out, flag, splits, num_virtual, padded, HAS_SKIP=skip is not None,
        HEAD_DIM=head_dim, BLOCK_M=block_m, num_warps=4)
    return out
