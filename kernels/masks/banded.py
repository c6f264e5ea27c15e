"""Structured (banded) block masks: each query block visits a contiguous run of key blocks around its own position,
the shape local spatial-temporal attention takes once tokens are laid out so neighbours are adjacent.

    kv_num_blocks, kv_indices = banded_block_mask(B, H, q_len, kv_len, block_size, density)

Every query block visits exactly max(1, round(density * nkv)) key blocks; the band is centred on the query block's
relative position and shifted inward at the ends so its width never shrinks. All heads share the band.
"""
from __future__ import annotations

import torch

from dit_compiler.kernels.block_mask import from_block_bool, num_blocks


def banded_block_mask(batch: int, heads: int, q_len: int, kv_len: int, block_size: int, density: float, *,
                      device=None) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    nq, nkv = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    width = max(1, round(density * nkv))
    centre = (torch.arange(nq, device=device) * nkv) // nq
    start = (centre - width // 2).clamp(0, nkv - width)
    key = torch.arange(nkv, device=device)
    visit = (key >= start[:, None]) & (key < start[:, None] + width)
    return from_block_bool(visit.expand(batch, heads, nq, nkv))
