"""Random block masks at a given density, for tests and benchmarks.

    kv_num_blocks, kv_indices = random_block_mask(B, H, q_len, kv_len, block_size, density, generator=g)

`ragged=False`: every query block visits exactly max(1, round(density * nkv)) key blocks (benchmarks' default);
`ragged=True`: each (query block, key block) pair is visited with probability `density`, so rows differ in length
and some may be empty. `empty_rows` is a share of query blocks forced to visit nothing.
"""
from __future__ import annotations

import torch

from dit_compiler.kernels.block_mask import from_block_bool, num_blocks


def random_block_mask(batch: int, heads: int, q_len: int, kv_len: int, block_size: int, density: float, *,
                      ragged: bool = False, empty_rows: float = 0.0, generator: torch.Generator | None = None,
                      device=None) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 <= density <= 1:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    nq, nkv = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    gen_device = generator.device if generator is not None else device
    scores = torch.rand(batch, heads, nq, nkv, generator=generator, device=gen_device)
    if ragged:
        visit = scores < density
    else:
        keep = max(1, round(density * nkv))
        threshold = scores.topk(keep, dim=-1).values[..., -1:]
        visit = scores >= threshold
    if empty_rows > 0:
        visit &= torch.rand(batch, heads, nq, 1, generator=generator, device=gen_device) >= empty_rows
    num, idx = from_block_bool(visit)
    return num.to(device), idx.to(device)
