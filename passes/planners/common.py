"""What the planners share: size checks, text blocks, the budgeted block choice, text-fixed permutations."""
from __future__ import annotations

import torch

from dit_compiler.kernels.block_mask import invert_permutation, num_blocks

def check_sizes(least: int, **sizes) -> None:
    """Raise ValueError naming the first of `sizes` (ints or SymInts) that is not an int >= least."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def text_blocks(seq_len, text_before, text_after, block_size: int, device=None) -> torch.Tensor:
    """[num_blocks] bool: blocks holding at least one text token (the first `text_before`, the last `text_after`)."""
    starts = torch.arange(num_blocks(seq_len, block_size), device=device) * block_size
    ends = (starts + block_size).clamp(max=seq_len)
    return (starts < text_before) | (ends > seq_len - text_after)


def keep_strongest(scores: torch.Tensor, density: float, text: torch.Tensor) -> torch.Tensor:
    """Choose the key blocks each query block visits, from self-attention block scores [..., n, n].

    A row keeps its max(1, ceil(density * n)) highest-scoring blocks. Its diagonal block and the text blocks
    (`text`, [n] bool) are taken first and count toward that budget, so a row visits max(budget, forced) blocks;
    text query blocks visit everything. Returns [..., n, n] bool (True = visit).
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    n = scores.shape[-1]
    ids = torch.arange(n, device=scores.device)
    forced = (ids[:, None] == ids) | text
    top = torch.finfo(scores.dtype).max if scores.is_floating_point() else torch.iinfo(scores.dtype).max
    order = scores.masked_fill(forced, top).argsort(dim=-1, descending=True, stable=True)
    # Keep rank r of a row if r < ceil(density * n) (<=> r < density * n for an integer r; float64 matches
    # Python's own product), if r is among the row's forced blocks (its text blocks, plus its diagonal when
    # that is not text), or if the row is text.
    forced_count = text.sum() + ~text
    keep = (ids.double() < density * n) | (ids < forced_count[:, None]) | text[:, None]
    # Scattering the per-rank flags (rather than OR-ing [n, n] masks) leaves a buffer that reductions read as is:
    # Inductor (torch 2.11, CUDA, dynamic n) fails to fuse an [n, n] pointwise into a row reduction (CantSplit).
    return torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, keep.expand_as(order))


def sequence_permutation(video_order: torch.Tensor, text_before, text_after) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse) int64 [S] that reorder the video tokens by `video_order` (a permutation of
    range(num video tokens)) and leave the text tokens in place: x[..., perm, :] is permuted, and
    x_permuted[..., inverse, :] is x again."""
    device = video_order.device
    video_len = video_order.shape[0]
    seq_len = text_before + video_len + text_after
    perm = torch.cat([torch.arange(text_before, device=device), video_order + text_before,
                      torch.arange(text_before + video_len, seq_len, device=device)])
    return perm, invert_permutation(perm)
