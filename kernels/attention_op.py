"""`torch.ops.vsparse.block_sparse_attention`: the op, its fake (meta) implementation, input checks and the
pure-torch reference that serves CPU execution and is the oracle in tests (docs/DESIGN.md, "Op and mask contract").

Checks: everything that reads only metadata (dtypes, ranks, shapes, strides) runs on every call; it costs a few
microseconds of Python and never syncs with the GPU. Checks that read mask *values* (block ids in range) need a
device-to-host copy, so on CUDA they run only when `VSPARSE_CHECK_MASKS=1` is set (or `set_mask_value_checks(True)`);
on CPU they always run. An out-of-range block id on CUDA without the flag reads memory outside K/V.

Registration (kernels/registration.py): a `torch.library.Library` fragment with one kernel per dispatch key (CPU:
the reference, CUDA: the Triton launcher) rather than `torch.library.custom_op`, whose per-call Python wrappers
(pytree walks, aliasing checks) cost more than the whole launch should. On CUDA a call whose `launch_key` was seen
before skips the checks (the key holds every property they read) and Triton's per-call binding
(triton_block_sparse.recorded_launch).
The op has no backward: with grad enabled and an input that requires grad, the output requires grad and its
backward raises.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from dit_compiler.kernels import block_mask
from dit_compiler.kernels.registration import register_op

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_BLOCK_SIZES = (64, 128)
# The reference scores this many elements at a time at most (float32: 64 MiB), whatever the density.
_REFERENCE_CHUNK_ELEMENTS = 1 << 24

_check_mask_values_on_cuda = os.environ.get("VSPARSE_CHECK_MASKS", "0") == "1"
SCHEMA = ("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, "
          "float scale, SymInt block_size, Tensor? kv_lengths=None, Tensor? q_block_order=None, int? kv_unit=None, "
          "Tensor? token_order=None, Tensor? reordered_heads=None) -> Tensor")


def set_mask_value_checks(enabled: bool) -> None:
    """Turn the mask-value checks (a host sync per call) on or off for CUDA inputs."""
    global _check_mask_values_on_cuda
    _check_mask_values_on_cuda = bool(enabled)


def check_bhsd(name: str, t: torch.Tensor) -> None:
    """A [B, H, S, D] tensor whose last (head) dim is contiguous, as the kernels read it."""
    if t.dim() != 4:
        raise ValueError(f"{name} must be [B, H, S, D], got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last (head) dim, got strides {t.stride()}")


def check_inputs(q, k, v, kv_num_blocks, kv_indices, scale, block_size, kv_lengths, q_block_order=None,
                 kv_unit=None, token_order=None, reordered_heads=None) -> None:
    """Raise TypeError / ValueError naming what is wrong. Reads values only on CPU or with the debug flag."""
    for name, t in (("q", q), ("k", k), ("v", v), ("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not isinstance(block_size, int) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if kv_unit is not None and (isinstance(kv_unit, bool) or not isinstance(kv_unit, int) or kv_unit < 1
                                or block_size % kv_unit):
        raise ValueError(f"kv_unit must be a divisor of block_size={block_size}, got {kv_unit!r}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_bhsd(name, t)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    batch, heads, q_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        raise ValueError(f"k/v shape {tuple(k.shape)} must match q {tuple(q.shape)} in B, H and D")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    kv_len = k.shape[2]
    for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if kv_lengths is not None:
        if kv_lengths.dtype != torch.int32 or tuple(kv_lengths.shape) != (batch,):
            raise ValueError(f"kv_lengths must be int32 [B={batch}], got {kv_lengths.dtype} {tuple(kv_lengths.shape)}")
        if kv_lengths.device != q.device:
            raise ValueError(f"kv_lengths is on {kv_lengths.device}, q on {q.device}")
    read_values = q.device.type != "cuda" or _check_mask_values_on_cuda
    if read_values:
        block_mask.validate(kv_num_blocks, kv_indices, batch, heads, q_len, kv_len, block_size, kv_unit)
    else:
        block_mask.validate_shapes(kv_num_blocks, kv_indices, batch, heads, q_len, kv_len, block_size)
    if q_block_order is not None:
        if q_block_order.device != q.device:
            raise ValueError(f"q_block_order is on {q_block_order.device}, q on {q.device}")
        block_mask.validate_order(q_block_order, batch, heads, q_len, block_size, values=read_values)
    check_reordering(token_order, reordered_heads, q, kv_len, read_values)


def check_reordering(token_order, reordered_heads, q, kv_len, read_values: bool) -> None:
    """`token_order` int64 [S] (a permutation, with S = q's and k's length) and `reordered_heads` bool [B|1, H]
    come together or not at all."""
    if token_order is None and reordered_heads is None:
        return
    if token_order is None or reordered_heads is None:
        raise ValueError("token_order and reordered_heads must be given together")
    batch, heads, q_len = q.shape[:3]
    if kv_len != q_len:
        raise ValueError(f"reordered heads need q and k of one length, got {q_len} and {kv_len}")
    if token_order.dtype != torch.int64 or tuple(token_order.shape) != (q_len,):
        raise ValueError(f"token_order must be int64 [S={q_len}], got {token_order.dtype} "
                         f"{tuple(token_order.shape)}")
    if reordered_heads.dtype != torch.bool or reordered_heads.dim() != 2 or \
            reordered_heads.shape[0] not in (1, batch) or reordered_heads.shape[1] != heads:
        raise ValueError(f"reordered_heads must be bool [B={batch}|1, H={heads}], got {reordered_heads.dtype} "
                         f"{tuple(reordered_heads.shape)}")
    for name, t in (("token_order", token_order), ("reordered_heads", reordered_heads)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if read_values and not torch.equal(token_order.sort().values, torch.arange(q_len, device=q.device)):
        raise ValueError("token_order must be a permutation of range(S)")


def head_orders(token_order: torch.Tensor, reordered_heads: torch.Tensor) -> torch.Tensor:
    """int64 [B|1, H, S]: each head's order, `token_order` where `reordered_heads` is set, the identity elsewhere."""
    identity = torch.arange(token_order.shape[0], device=token_order.device)
    return torch.where(reordered_heads[..., None], token_order, identity)


def reference_block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, scale: float, block_size: int,
                                     kv_lengths: Optional[torch.Tensor] = None, kv_unit=None) -> torch.Tensor:
    """Pure-torch block-sparse attention: for a chunk of query blocks at a time, gather the listed K/V blocks (the
    block_size keys from kv_indices * kv_unit on) and run a masked softmax over them. Work and memory grow with the
    visited blocks; no [Sq, Skv] matrix is ever built. Computes in float32 (float64 for float64 inputs); rows with no
    visible key give zeros."""
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    nq, nkv = block_mask.num_blocks(q_len, block_size), block_mask.num_blocks(kv_len, block_size)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    counts = kv_num_blocks.expand(batch, heads, nq).long()
    ids = kv_indices.expand(batch, heads, nq, nkv).long()

    unit = block_mask.key_unit(kv_unit, block_size)
    # Keys padded with zeros to the end of the last block any entry can start; a key is visible below its limit.
    padded_len = block_mask.num_blocks(kv_len, unit) * unit + block_size
    qb = torch.nn.functional.pad(q.to(compute), (0, 0, 0, nq * block_size - q_len)).view(
        batch, heads, nq, block_size, head_dim)
    kp, vp = (torch.nn.functional.pad(t.to(compute), (0, 0, 0, padded_len - kv_len)) for t in (k, v))
    key_limit = torch.full((batch,), kv_len, device=q.device)
    if kv_lengths is not None:
        key_limit = torch.minimum(key_limit, kv_lengths.long())
    offsets = torch.arange(block_size, device=q.device)

    out = torch.zeros(batch, heads, nq, block_size, head_dim, dtype=compute, device=q.device)
    widest = int(counts.max()) if counts.numel() else 0
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(1, batch * heads * block_size * block_size * widest))
    for first in range(0, nq, chunk):
        rows = slice(first, min(first + chunk, nq))
        width = int(counts[:, :, rows].max())
        if width == 0:
            continue  # no query block here visits anything: zeros stay
        listed = torch.arange(width, device=q.device) < counts[:, :, rows, None]  # [B, H, c, w]
        sel = ids[:, :, rows, :width].where(listed, 0)  # entries past a row's count may hold anything
        c = sel.shape[2]
        positions = (sel[..., None] * unit + offsets).view(batch, heads, c * width * block_size)  # key tokens

        def gather(t):  # [B, H, padded, D] -> [B, H, c, w*bs, D]
            got = torch.gather(t, 2, positions[..., None].expand(-1, -1, -1, head_dim))
            return got.view(batch, heads, c, width * block_size, head_dim)

        keys, values = gather(kp), gather(vp)
        visible = positions.view(batch, heads, c, width, block_size) < key_limit[:, None, None, None, None]
        visible = (visible & listed[..., None]).view(batch, heads, c, 1, -1)
        scores = torch.matmul(qb[:, :, rows], keys.transpose(-1, -2)) * scale  # [B, H, c, bs, w*bs]
        scores = scores.masked_fill(~visible, float("-inf"))
        row_max = scores.amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(scores - row_max)
        total = weights.sum(-1, keepdim=True)
        acc = torch.matmul(weights, values)
        out[:, :, rows] = torch.where(total > 0, acc / total.clamp_min(torch.finfo(compute).tiny), 0.0)
    return out.view(batch, heads, nq * block_size, head_dim)[:, :, :q_len].to(q.dtype).contiguous()


def output_like(q: torch.Tensor) -> torch.Tensor:
    """The op's output buffer: [B, H, S, D] of q's dtype, laid out in memory as [B, S, H, D] (what diffusers'
    attention returns to: its transpose back for the output projection is then a view, not a copy). The layout
    follows from the shape alone, never from q's strides: Inductor may hand the op q in other strides than the fake
    kernel saw, and the output must have the strides the fake kernel gave the graph."""
    batch, heads, seq_len, head_dim = q.shape
    return torch.empty(batch, seq_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)


def _cpu_kernel(q, k, v, kv_num_blocks, kv_indices, scale, block_size, kv_lengths=None, q_block_order=None,
                kv_unit=None, token_order=None, reordered_heads=None):
    check_inputs(q, k, v, kv_num_blocks, kv_indices, scale, block_size, kv_lengths, q_block_order, kv_unit,
                 token_order, reordered_heads)
    if token_order is None:
        return output_like(q).copy_(reference_block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, scale,
                                                                      block_size, kv_lengths, kv_unit))
    orders = head_orders(token_order, reordered_heads).expand(q.shape[:3])
    moved = (torch.gather(t, 2, orders[..., None].expand(t.shape)) for t in (q, k, v))
    out = reference_block_sparse_attention(*moved, kv_num_blocks, kv_indices, scale, block_size, kv_lengths, kv_unit)
    return output_like(q).scatter_(2, orders[..., None].expand(out.shape), out)


_triton = None  # dit_compiler.kernels.triton_block_sparse, imported on the first CUDA call (CPU installs need no Triton)


def _cuda_kernel(q, k, v, kv_num_blocks, kv_indices, scale, block_size, kv_lengths=None, q_block_order=None,
                 kv_unit=None, token_order=None, reordered_heads=None):
    global _triton
    if _triton is None:
        from dit_compiler.kernels import triton_block_sparse as _triton
    key = _triton.launch_key(q, k, v, kv_num_blocks, kv_indices, block_size, kv_lengths, q_block_order, kv_unit,
                             token_order, reordered_heads)
    launch = None if _check_mask_values_on_cuda else _triton.recorded_launch(key)
    if launch is not None:
        return launch(q, k, v, kv_num_blocks, kv_indices, scale, kv_lengths, q_block_order, token_order,
                      reordered_heads)
    check_inputs(q, k, v, kv_num_blocks, kv_indices, scale, block_size, kv_lengths, q_block_order, kv_unit,
                 token_order, reordered_heads)
    return _triton.triton_block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, scale, block_size, kv_lengths,
                                                 q_block_order=q_block_order, record=key, kv_unit=kv_unit,
                                                 token_order=token_order, reordered_heads=reordered_heads)


class _NoBackward(torch.autograd.Function):
    """Gives the output a grad_fn whose backward raises, rather than the silent missing gradient of PyTorch's
    fallback for ops without an autograd kernel."""

    @staticmethod
    def forward(ctx, keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return _op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("vsparse::block_sparse_attention has no backward: call it under torch.no_grad() or on "
                           "inputs that do not require grad")


def _autograd_kernel(keyset, *args):
    # Only q, k, v can require grad: the other tensors are int32 (the checks below autograd enforce it).
    if torch.is_grad_enabled() and (args[0].requires_grad or args[1].requires_grad or args[2].requires_grad):
        return _NoBackward.apply(keyset, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return _op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _fake_kernel(q, k, v, kv_num_blocks, kv_indices, scale, block_size, kv_lengths=None, q_block_order=None,
                 kv_unit=None, token_order=None, reordered_heads=None):
    # Only checks that need no shape arithmetic: comparing symbolic sizes here would add guards to the graph.
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype in {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, S, D]")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    return output_like(q)


_lib = register_op(SCHEMA, cpu=_cpu_kernel, cuda=_cuda_kernel, fake=_fake_kernel, autograd=_autograd_kernel)
_op = torch.ops.vsparse.block_sparse_attention.default
# softmax(q kᵀ·scale + block mask) v over the key blocks each query block lists; see docs/DESIGN.md.
# `q_block_order` (int32 [B|1, H|1, nq], a permutation per row) only schedules the kernel's programs; without it the
# kernel sorts the query blocks heaviest first on every call (`block_mask.heaviest_first`). `kv_unit` (a divisor of
# block_size; None = block_size) is the token step of kv_indices: key blocks start at kv_indices * kv_unit.
# `token_order` (int64 [S], a permutation) with `reordered_heads` (bool [B|1, H]): the heads set attend with q, k,
# v reordered along S, x[..., token_order, :] (their mask and kv_lengths count in that order), and their output
# comes back in the original order; the others attend as given. So a per-head order with few reordered heads
# copies only those heads' rows (Sparse VideoGen's temporal heads), where a gather before the op copies every head.
block_sparse_attention = torch.ops.vsparse.block_sparse_attention
