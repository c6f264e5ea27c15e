"""The block-mask format every kernel, planner, test and benchmark shares (docs/DESIGN.md, "Op and mask contract").

A mask is two int32 tensors, FlexAttention's `from_kv_blocks` arguments:
  kv_num_blocks [B|1, H|1, ceil(Sq/bs)]               key blocks each query block visits;
  kv_indices    [B|1, H|1, ceil(Sq/bs), ceil(Skv/bs)]  their ids, the first kv_num_blocks entries valid.
With a key unit u (`kv_unit`, a divisor of bs; default bs, FlexAttention's format) an entry i is a key block that
starts at token i*u: keys [i*u, i*u + bs) cut at Skv. The blocks one query block lists must not overlap (a key in two
would be counted twice); with u = bs they never do. Sparse VideoGen's temporal heads list their query block shifted
by whole frames (passes/planners/svg.py), which no aligned block holds when a frame is not a whole number of blocks.
Everything here is plain torch and traceable (no host syncs) except `validate`, which checks values.
"""
from __future__ import annotations

from typing import Optional

import torch


def num_blocks(seq_len, block_size: int):
    """Blocks covering `seq_len` tokens; the last one may be partial. Works on ints and SymInts."""
    return (seq_len + block_size - 1) // block_size


def from_block_bool(visit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., nq, nkv] bool (True = visit) -> (kv_num_blocks, kv_indices), visited ids first in ascending order."""
    kv_num_blocks = visit.sum(-1, dtype=torch.int32)
    # A stable descending sort of the 0/1 flags puts visited block ids first, each group in ascending id order.
    order = torch.sort(visit.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return kv_num_blocks, order.to(torch.int32)


def heaviest_first(kv_num_blocks: torch.Tensor) -> torch.Tensor:
    """int32 [..., nq]: query-block ids by descending visited-block count (stable: ties keep ascending ids), the
    order the kernel schedules query blocks in. A mask fixed at compile time passes it to the op (`q_block_order`)
    so no call sorts."""
    return torch.sort(kv_num_blocks, dim=-1, descending=True, stable=True).indices.to(torch.int32)


def listed_entries(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(listed bool, kv_indices int64), both broadcast to the mask's full [..., nq, nkv] (counts and ids may each be
    shared by batch elements or heads): which entries a row lists (the first kv_num_blocks), and the entries."""
    listed = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_num_blocks.unsqueeze(-1)
    listed, ids = torch.broadcast_tensors(listed, kv_indices.long())
    return listed, ids


def to_block_bool(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size: Optional[int] = None,
                  kv_unit=None) -> torch.Tensor:
    """Inverse of `from_block_bool`: [..., nq, nkv] bool of the visited blocks. With a `kv_unit`, a key block marks
    the aligned block of `block_size` its start falls in (a picture for dumps: it may also cover the next one)."""
    listed, ids = listed_entries(kv_num_blocks, kv_indices)
    if kv_unit is not None:
        ids = ids * kv_unit // block_size
    # Counted, not scattered as flags: an unlisted entry's id must not overwrite a listed one's.
    return torch.zeros(ids.shape, dtype=torch.int32, device=ids.device).scatter_add(
        -1, ids.where(listed, 0), listed.int()) > 0


def visited_fraction(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """0-dim float: the share of (query block, key block) pairs the mask visits, averaged over batch and heads."""
    return kv_num_blocks.float().mean() / kv_indices.shape[-1]


def key_unit(kv_unit, block_size: int) -> int:
    """The tokens one kv_indices step moves a key block: `kv_unit`, or the block size when None."""
    return block_size if kv_unit is None else kv_unit


def token_visits(kv_num_blocks, kv_indices, kv_len, block_size: int, kv_unit=None) -> torch.Tensor:
    """[..., nq, kv_len] bool: the keys each query block visits. Each listed key block marks its token range
    [i*u, i*u + bs) cut at kv_len (+1 at its start, -1 past its end, a running sum)."""
    listed, ids = listed_entries(kv_num_blocks, kv_indices)
    listed = listed.int()
    starts = (ids * key_unit(kv_unit, block_size)).clamp(0, kv_len)
    ends = (starts + block_size).clamp(max=kv_len)
    steps = torch.zeros(*ids.shape[:-1], kv_len + 1, dtype=torch.int32, device=ids.device)
    steps.scatter_add_(-1, starts, listed).scatter_add_(-1, ends, -listed)
    return steps.cumsum(-1)[..., :kv_len] > 0


def to_token_mask(kv_num_blocks, kv_indices, q_len: int, kv_len: int, block_size: int, kv_unit=None) -> torch.Tensor:
    """[..., q_len, kv_len] bool: the block mask expanded to tokens (True = attend), tails cut off."""
    visits = token_visits(kv_num_blocks, kv_indices, kv_len, block_size, kv_unit)
    return visits.repeat_interleave(block_size, dim=-2)[..., :q_len, :]


def full(batch: int, heads: int, q_len, kv_len, block_size: int, device=None):
    """Every query block visits every key block (density 1)."""
    nq, nkv = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    kv_num_blocks = torch.full((batch, heads, nq), nkv, dtype=torch.int32, device=device)
    kv_indices = torch.arange(nkv, dtype=torch.int32, device=device).expand(batch, heads, nq, nkv).contiguous()
    return kv_num_blocks, kv_indices


def validate(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int,
             block_size: int, kv_unit=None) -> None:
    """Raise ValueError naming what is wrong with a mask for q [batch, heads, q_len, *] and kv length kv_len (the
    listed entries: key blocks starting inside the keys; overlaps are not checked)."""
    validate_shapes(kv_num_blocks, kv_indices, batch, heads, q_len, kv_len, block_size)
    nkv = num_blocks(kv_len, block_size)
    if kv_num_blocks.numel() and (int(kv_num_blocks.min()) < 0 or int(kv_num_blocks.max()) > nkv):
        raise ValueError(f"kv_num_blocks values must lie in [0, {nkv}]")
    starts = num_blocks(kv_len, key_unit(kv_unit, block_size))
    listed, ids = listed_entries(kv_num_blocks, kv_indices)
    ids = ids.masked_select(listed)  # entries past a row's count are never read
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= starts):
        raise ValueError(f"kv_indices values must lie in [0, {starts})" +
                         (f" (key blocks start at kv_indices * kv_unit={kv_unit} < {kv_len})" if kv_unit else ""))


def validate_order(q_block_order: torch.Tensor, batch: int, heads: int, q_len: int, block_size: int,
                   values: bool) -> None:
    """Raise ValueError unless q_block_order is int32 [B|1, H|1, nq] and (with `values`, which reads the device)
    a permutation of the query blocks in every row."""
    nq = num_blocks(q_len, block_size)
    if q_block_order.dtype != torch.int32 or q_block_order.dim() != 3 or q_block_order.shape[2] != nq or \
            q_block_order.shape[0] not in (1, batch) or q_block_order.shape[1] not in (1, heads):
        raise ValueError(f"q_block_order must be int32 [B|1, H|1, {nq}], got {q_block_order.dtype} "
                         f"{tuple(q_block_order.shape)}")
    if values and not torch.equal(q_block_order.sort(-1).values,
                                  torch.arange(nq, dtype=torch.int32, device=q_block_order.device)
                                  .expand_as(q_block_order)):
        raise ValueError("q_block_order must list every query block once in each row")


def validate_shapes(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, batch: int, heads: int, q_len: int,
                    kv_len: int, block_size: int) -> None:
    """The metadata half of `validate` (dtypes and shapes): reads no values, so it never syncs with a GPU."""
    nq, nkv = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    for name, t, ndim in (("kv_num_blocks", kv_num_blocks, 3), ("kv_indices", kv_indices, 4)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
        if t.shape[0] not in (1, batch) or t.shape[1] not in (1, heads):
            raise ValueError(f"{name} shape {tuple(t.shape)}: dims 0 and 1 must be 1 or B={batch}, H={heads}")
    if kv_num_blocks.shape[2] != nq:
        raise ValueError(f"kv_num_blocks has {kv_num_blocks.shape[2]} query blocks, ceil({q_len}/{block_size}) = {nq}")
    if tuple(kv_indices.shape[2:]) != (nq, nkv):
        raise ValueError(f"kv_indices shape {tuple(kv_indices.shape)}: last dims must be ({nq}, {nkv}) query x key blocks")


def invert_permutation(index: torch.Tensor) -> torch.Tensor:
    """inverse[..., index[..., s]] = s for a permutation along the last dim (shared [S] or per head [H, S])."""
    positions = torch.arange(index.shape[-1], device=index.device).expand_as(index)
    return torch.empty_like(index).scatter_(-1, index, positions)
