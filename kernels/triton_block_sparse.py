"""Triton block-sparse FlashAttention forward: one program per (query tile, batch*head) loops over the key blocks its
query block lists, with an online softmax. Laid out like Triton's fused-attention tutorial: the per-key-tile step,
the kernel, the launcher.

Hopper path: Q/K/V/O move through TMA tensor descriptors made on the device per (batch, head), so tails past S are
zero-filled on load and clipped on store with no masks; matrix products are wgmma through `tl.dot`. Tile shapes,
warps and stages are autotuned once per (head dim, dtype, block size) and cached by Triton's autotuner.

Scheduling: programs run head-major (all query tiles of one head before the next, so that head's K/V stay in L2),
and within a head the query blocks are taken heaviest first (a device-side sort of kv_num_blocks, no host sync), so
the last wave holds the short rows and ragged masks do not leave SMs idle at the end.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_key_tile(acc, l_i, m_i, q, k_desc, v_desc, key_start, key_limit, qk_scale,
                     BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """Fold keys [key_start, key_start+BLOCK_N) into the running (acc, l_i, m_i) of a query tile."""
    k = k_desc.load([key_start, 0])
    v = v_desc.load([key_start, 0])
    if DOT_FP32:  # the interpreter's bf16/fp16 dot is wrong (triton-lang/triton#11584)
        k = k.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, k.T, input_precision="ieee")
    else:
        qk = tl.dot(q, k.T)
    if key_start + BLOCK_N > key_limit:  # tile reaches past S or kv_lengths: hide those keys
        offs_n = tl.arange(0, BLOCK_N)
        qk = tl.where((key_start + offs_n < key_limit)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A row that has seen only hidden keys keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc)
    elif IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _block_sparse_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, num_ptr, idx_ptr, order_ptr, kv_lengths_ptr,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, stride_orb, stride_orh,
        heads, q_len, kv_len, num_q_blocks, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_KV_LENGTHS: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    M_TILES: tl.constexpr = BLOCK_SIZE // BLOCK_M
    N_TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N
    slot = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # offsets below can pass 2**31 elements
    b = bh // heads
    h = bh % heads
    # Heaviest query blocks of this head first (order is a per-head permutation of query-block ids).
    q_block = tl.load(order_ptr + b * stride_orb + h * stride_orh + slot // M_TILES)
    q_start = q_block * BLOCK_SIZE + (slot % M_TILES) * BLOCK_M
    count = tl.load(num_ptr + b * stride_nb + h * stride_nh + q_block)
    ids = idx_ptr + b * stride_ib + h * stride_ih + q_block * stride_iq
    key_limit = kv_len
    if HAS_KV_LENGTHS:
        key_limit = tl.minimum(key_limit, tl.load(kv_lengths_ptr + b))

    dtype = o_ptr.dtype.element_ty
    q_desc = tl.make_tensor_descriptor(q_ptr + b * stride_qb + h * stride_qh, shape=[q_len, HEAD_DIM],
                                       strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(k_ptr + b * stride_kb + h * stride_kh, shape=[kv_len, HEAD_DIM],
                                       strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr + b * stride_vb + h * stride_vh, shape=[kv_len, HEAD_DIM],
                                       strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(o_ptr + bh * q_len * HEAD_DIM, shape=[q_len, HEAD_DIM],
                                       strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q = q_desc.load([q_start, 0])
    if DOT_FP32:
        q = q.to(tl.float32)
    for t in tl.range(0, count * N_TILES, warp_specialize=WARP_SPECIALIZE):
        key_start = tl.load(ids + t // N_TILES) * BLOCK_SIZE + (t % N_TILES) * BLOCK_N
        acc, l_i, m_i = _attend_key_tile(acc, l_i, m_i, q, k_desc, v_desc, key_start, key_limit, qk_scale,
                                         BLOCK_N, DOT_FP32, IEEE)
    # Rows that saw no visible key have l = 0 and acc = 0: they store zeros.
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_desc.store([q_start, 0], acc.to(dtype))


def _configs():
    configs = []
    for block_m, block_n, warps, stages, ws in [
        (128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 64, 8, 3, False), (128, 64, 8, 4, False),
        (64, 64, 4, 3, False), (128, 128, 8, 2, True), (128, 64, 8, 3, True),
    ]:
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "WARP_SPECIALIZE": ws},
                                     num_warps=warps, num_stages=stages))
    return configs


def _prune(configs, named_args, **kwargs):
    """Tiles must divide the mask's block (a query tile shares one key-block list); fp32 needs smaller tiles."""
    block_size, head_dim = kwargs["BLOCK_SIZE"], kwargs["HEAD_DIM"]
    fp32 = named_args["q_ptr"].dtype == torch.float32
    kept = [c for c in configs if block_size % c.kwargs["BLOCK_M"] == 0 and block_size % c.kwargs["BLOCK_N"] == 0
            and not (fp32 and c.kwargs["BLOCK_N"] * head_dim > 64 * 128)]
    return kept or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "WARP_SPECIALIZE": False}, num_warps=4,
                                  num_stages=2)]


_tuned_kernel = triton.autotune(
    configs=_configs(), key=["HEAD_DIM", "BLOCK_SIZE", "HAS_KV_LENGTHS", "IEEE"],
    prune_configs_by={"early_config_prune": _prune})(_block_sparse_attention_kernel)

_allocator_ready = False
_autotune = os.environ.get("VSPARSE_AUTOTUNE", "1") == "1"


def _ensure_descriptor_allocator():
    """Device-side TMA descriptors need a scratch allocator; set one once unless the caller already has."""
    global _allocator_ready
    if _allocator_ready:
        return
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    _allocator_ready = True


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """TMA wants a 16-byte aligned base and 16-byte aligned strides; copy the rare tensor that is not."""
    item = t.element_size()
    if t.data_ptr() % 16 or any((s * item) % 16 for s in t.stride()[:-1]):
        return t.contiguous()
    return t


def triton_block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, scale: float, block_size: int,
                                  kv_lengths: Optional[torch.Tensor] = None, config: Optional[dict] = None,
                                  out: Optional[torch.Tensor] = None):
    """Launch the kernel. Inputs are assumed checked (see attention_op.check_inputs). `config`
    ({"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "WARP_SPECIALIZE"}) skips autotuning, e.g. for benchmarks
    of one variant or tests; so does `set_autotune(False)`, which takes the first valid config of the list;
    under TRITON_INTERPRET=1 a small fixed config is always used. `out` (contiguous, like q) receives the result."""
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    q, k, v = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    if out is None:
        out = torch.empty(batch, heads, q_len, head_dim, dtype=q.dtype, device=q.device)
    elif not out.is_contiguous() or out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError("out must be contiguous with q's shape and dtype")
    num_q_blocks = triton.cdiv(q_len, block_size)
    # Per-head order of query blocks, heaviest first (stable: ties keep ascending ids, good for L2 locality).
    order = torch.sort(kv_num_blocks, dim=-1, descending=True, stable=True).indices.to(torch.int32)
    ib, ih = (kv_indices.stride(0) if kv_indices.shape[0] > 1 else 0), (kv_indices.stride(1) if kv_indices.shape[1] > 1 else 0)
    nb, nh = (kv_num_blocks.stride(0) if kv_num_blocks.shape[0] > 1 else 0), (kv_num_blocks.stride(1) if kv_num_blocks.shape[1] > 1 else 0)
    ob, oh = (order.stride(0) if order.shape[0] > 1 else 0), (order.stride(1) if order.shape[1] > 1 else 0)
    ieee = q.dtype == torch.float32
    args = (q, k, v, out, kv_num_blocks, kv_indices, order, kv_lengths if kv_lengths is not None else kv_num_blocks,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), nb, nh, ib, ih, kv_indices.stride(2), ob, oh,
            heads, q_len, kv_len, num_q_blocks, scale * _LOG2E)
    consts = dict(HEAD_DIM=head_dim, BLOCK_SIZE=block_size, HAS_KV_LENGTHS=kv_lengths is not None, IEEE=ieee)

    def grid(meta):
        return (num_q_blocks * (block_size // meta["BLOCK_M"]), batch * heads)

    if _INTERPRET:
        _block_sparse_attention_kernel[grid](*args, **consts, BLOCK_M=64, BLOCK_N=64, DOT_FP32=True,
                                             WARP_SPECIALIZE=False)
        return out
    _ensure_descriptor_allocator()
    if config is not None:
        config = dict(config)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        config.setdefault("WARP_SPECIALIZE", False)
        _block_sparse_attention_kernel[grid](*args, **consts, **config, DOT_FP32=False, num_warps=warps,
                                             num_stages=stages)
    elif _autotune:
        _tuned_kernel[grid](*args, **consts, DOT_FP32=False)
    else:
        first = _prune(_tuned_kernel.configs, {"q_ptr": q}, **consts)[0]
        _block_sparse_attention_kernel[grid](*args, **consts, **first.kwargs, DOT_FP32=False,
                                             num_warps=first.num_warps, num_stages=first.num_stages)
    return out


def set_autotune(enabled: bool) -> None:
    """Autotuning compiles every config once per key; tests that sweep many keys turn it off."""
    global _autotune
    _autotune = bool(enabled)


def tuned_config(head_dim: int, block_size: int, dtype: torch.dtype) -> Optional[str]:
    """The config the autotuner chose for a key, for benchmark reports (None before the first call)."""
    for key, cfg in _tuned_kernel.cache.items():
        if key[0] == head_dim and key[1] == block_size and str(dtype) in key:
            return str(cfg)
    return None

