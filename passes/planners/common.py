"""What the planners share: size checks, text blocks, the budgeted block choice, text-fixed permutations."""
from __future__ import annotations

import torch

import dit_compiler.kernels  # noqa: F401  registers torch.ops.vsparse (descending_order)
from dit_compiler.kernels.block_mask import invert_permutation, num_blocks, to_block_bool


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


def block_budget(density: float, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(forced [n, n] bool, kept int32 [n]) for `strongest_blocks`, from the text blocks `text` [n] bool; they
    depend on the layout and density alone, so a planner computes them once (its constants).

    A row keeps its max(1, ceil(density * n)) highest-scoring blocks. Its diagonal block and the text blocks are
    forced: taken first and counted toward that budget, so a row keeps max(budget, forced) blocks; text query blocks
    keep everything (text is few tokens and carries the prompt)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    n = text.shape[0]
    ids = torch.arange(n, device=text.device)
    forced = (ids[:, None] == ids) | text
    # Ranks r < density * n are in the budget (float64 matches Python's own product, so the count is
    # ceil(density * n)); a row's forced blocks are its text blocks, plus its diagonal when that is not text.
    budget = (ids.double() < density * n).sum()
    forced_count = text.sum() + ~text
    return forced, torch.where(text, n, torch.maximum(forced_count, budget)).to(torch.int32)


def strongest_blocks(scores: torch.Tensor, forced: torch.Tensor, kept: torch.Tensor):
    """Choose the key blocks each query block visits, from self-attention block scores [..., n, n], in the mask
    format (kernels/block_mask.py): each row's `kept` [n] blocks, its `forced` [n, n] ones first, then the
    highest-scoring (`block_budget`). One sort ranks each row with its forced blocks first, so the kept blocks are a
    prefix of the ranking: kv_indices is the ranking itself (strongest first) and kv_num_blocks the prefix length.
    Returns (kv_num_blocks int32 [..., n], kv_indices int32 [..., n, n]).
    """
    top = torch.finfo(scores.dtype).max if scores.is_floating_point() else torch.iinfo(scores.dtype).max
    order = torch.ops.vsparse.descending_order(scores.masked_fill(forced, top))
    # Materialized: the kernel reads kv_num_blocks with unit stride along query blocks.
    return kept.expand(order.shape[:-1]).contiguous(), order


def keep_strongest(scores: torch.Tensor, density: float, text: torch.Tensor) -> torch.Tensor:
    """`strongest_blocks` under `block_budget(density, text)`, as [..., n, n] bool (True = visit)."""
    return to_block_bool(*strongest_blocks(scores, *block_budget(density, text)))


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
