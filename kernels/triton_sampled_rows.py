"""Triton kernels of `sampled_rows_attention` (the op and its contract: sampled_rows.py).

The C masks make C·R "virtual rows" (mask c, sampled row r), each its own masked softmax over the keys. Few rows and
many keys: one program per (key split, batch·head, tile of virtual rows) runs a flash-attention loop over its split
of the keys and writes a partial (row max, row sum, unnormalized output), and a second kernel merges the splits,
so the launch fills the GPU although R is small. Every operand moves through a TMA descriptor: K and V, read once per
row tile from memory (the row tiles of one split share them through L2), as the block-sparse kernel reads them; q's
sampled rows, gathered into virtual-row order by the launcher (C·R rows a head); the masks, as bytes, a [virtual rows,
keys] tile a step (TMA wants their rows 16 bytes apart: `sampled_rows.aligned_masks`). Pointer loads of K and V spilled,
and of q and the masks took 254 registers a thread where descriptors take 156 (sm_90, kernels/NOTES.md). With `skip` set
both kernels read it first: the first writes nothing, the second writes zeros.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dit_compiler.kernels.sampled_rows import aligned_masks
from dit_compiler.kernels.triton_block_sparse import INTERPRET, LOG2E, fold_scores, scores, tma_ready
# (BLOCK_M, BLOCK_N, warps, stages); under the interpreter a small tile keeps the tests quick.
CONFIG = (64, 64, 4, 2)
INTERPRETER_CONFIG = (16, 16, 1, 1)
# Programs per SM the key splits aim for: 12 splits (3.27 a SM) ran Wan-1.3B's shape fastest on both the H100 (338 µs
# against 371 at 4 a SM, kernels/NOTES.md run S3) and the H200 (300 against 339, run S6); wave tails move it.
_SPLIT_WAVES = 3.25
# Splits the merge reads as one tile: a program per virtual row (756 on Wan-1.3B at 21 rows) loads its partials a
# chunk at a time. Its row tiles looped over the splits one by one: 48.2 µs a site at 36 splits (kernels/NOTES.md).
MERGE_SPLIT_CHUNK = 32
MERGE_WARPS = 8  # sm_90: 80 registers a thread, none spilled; 4 warps need 168-249 (Triton 3.6 / 3.7)
_sm_counts: dict = {}


@triton.jit
def _sampled_rows_partial_kernel(
        q_desc, k_desc, v_desc, masks_desc, skip_ptr, m_ptr, l_ptr, acc_ptr, heads, kv_len, keys_per_split,
        padded_virtual, qk_scale,
        HAS_SKIP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    tile = tl.program_id(2)
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    b = bh // heads
    h = bh % heads
    virtual = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = q_desc.load([b, h, tile * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)  # zeros past the virtual rows
    if DOT_FP32:  # the interpreter's bf16/fp16 dot is wrong (triton-lang/triton#11584)
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    first = split * keys_per_split
    last = tl.minimum(first + keys_per_split, kv_len)
    for key_start in tl.range(first, last, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_ok = keys < last
        # Past S and past the virtual rows the descriptors give zeros; keys of the next split are hidden by key_ok.
        k = k_desc.load([b, h, key_start, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([b, h, key_start, 0]).reshape(BLOCK_N, HEAD_DIM)
        visible = (masks_desc.load([tile * BLOCK_M, key_start]) != 0) & key_ok[None, :]
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.where(visible, scores(q, k, IEEE), float("-inf"))
        acc, l_i, m_i = fold_scores(acc, l_i, m_i, qk, v, qk_scale, DOT_FP32, IEEE)
    out = (bh * tl.num_programs(0) + split) * padded_virtual + virtual
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    tl.store(acc_ptr + out[:, None] * HEAD_DIM + dims[None, :], acc)


@triton.jit
def _sampled_rows_merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, skip_ptr, splits, num_virtual, padded_virtual,
                               HAS_SKIP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """One program per (batch·head, virtual row): the row's partials of SPLIT_CHUNK splits at a time, as one tile."""
    bh = tl.program_id(0)
    row = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    out_ptrs = out_ptr + (bh * num_virtual + row) * HEAD_DIM + dims
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0:
            tl.store(out_ptrs, tl.zeros([HEAD_DIM], dtype=tl.float32))
            return
    # Per-lane running values, reduced once at the end: no loop-carried scalars.
    chunk = tl.arange(0, SPLIT_CHUNK)
    m_lanes = tl.full([SPLIT_CHUNK], float("-inf"), dtype=tl.float32)
    for first in range(0, splits, SPLIT_CHUNK):
        split = first + chunk
        m_lanes = tl.maximum(m_lanes, tl.load(m_ptr + (bh * splits + split) * padded_virtual + row,
                                              mask=split < splits, other=float("-inf")))
    m_max = tl.max(m_lanes, 0)
    shift = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_lanes = tl.zeros([SPLIT_CHUNK], dtype=tl.float32)
    acc_lanes = tl.zeros([SPLIT_CHUNK, HEAD_DIM], dtype=tl.float32)
    for first in range(0, splits, SPLIT_CHUNK):
        split = first + chunk
        split_ok = split < splits
        part = (bh * splits + split) * padded_virtual + row
        weight = tl.math.exp2(tl.load(m_ptr + part, mask=split_ok, other=float("-inf")) - shift)  # 0 off the end
        l_lanes += weight * tl.load(l_ptr + part, mask=split_ok, other=0.0)
        acc_lanes += weight[:, None] * tl.load(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :],
                                               mask=split_ok[:, None], other=0.0)
    l_sum = tl.sum(l_lanes, 0)
    acc = tl.sum(acc_lanes, 0)
    # Rows that may see no key have l = 0 and acc = 0: they store zeros.
    tl.store(out_ptrs, acc / tl.where(l_sum > 0, l_sum, 1.0))


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
    tiles = triton.cdiv(num_virtual, block_m)
    key_tiles = triton.cdiv(kv_len, block_n)
    if splits is None:
        splits = math.ceil(_SPLIT_WAVES * _sm_count(q.device) / (batch * heads * tiles))
    splits = max(1, min(splits, key_tiles))
    keys_per_split = triton.cdiv(key_tiles, splits) * block_n
    splits = triton.cdiv(kv_len, keys_per_split)  # no split left empty
    padded = tiles * block_m
    partial_m = torch.empty(batch * heads, splits, padded, dtype=torch.float32, device=q.device)
    partial_l = torch.empty_like(partial_m)
    partial_acc = torch.empty(batch * heads, splits, padded, head_dim, dtype=torch.float32, device=q.device)
    shape = (batch, heads, num_masks, num_rows, head_dim)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
    elif not out.is_contiguous() or out.shape != shape or out.dtype != torch.float32:
        raise ValueError(f"out must be contiguous float32 {shape}")
    flag = skip.view(torch.uint8) if skip is not None else rows  # unread without HAS_SKIP
    k_desc, v_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, head_dim])
                      for t in (tma_ready(k), tma_ready(v)))
    # q's sampled rows in virtual-row order (row c * R + r is sampled row r), read through TMA: gathered by pointer in
    # the kernel they took 208 registers a thread at the default tile, 156 this way (sm_90, kernels/NOTES.md).
    q_desc = TensorDescriptor.from_tensor(q.index_select(2, rows.repeat(num_masks)), [1, 1, block_m, head_dim])
    masks = aligned_masks(masks).view(torch.uint8)
    mask_rows = masks.as_strided((num_virtual, kv_len), (masks.stride(1), 1))  # virtual row c * R + r
    masks_desc = TensorDescriptor(mask_rows, list(mask_rows.shape), list(mask_rows.stride()), [block_m, block_n])
    _sampled_rows_partial_kernel[(splits, batch * heads, tiles)](
        q_desc, k_desc, v_desc, masks_desc, flag, partial_m, partial_l, partial_acc, heads, kv_len, keys_per_split,
        padded, scale * LOG2E,
        HAS_SKIP=skip is not None, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_FP32=INTERPRET, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    _sampled_rows_merge_kernel[(batch * heads, num_virtual)](
        partial_m, partial_l, partial_acc, out, flag, splits, num_virtual, padded, HAS_SKIP=skip is not None,
        HEAD_DIM=head_dim, SPLIT_CHUNK=MERGE_SPLIT_CHUNK, num_warps=MERGE_WARPS)
    return out
