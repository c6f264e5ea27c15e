"""DraftAttention: block-sparse masks chosen from a low-resolution (block-pooled) attention map.

Tokens are first reordered so every block of `block_size` consecutive tokens is one compact spatial window of a
frame (`window_permutation`; the same for every head and step, so it lives in the graph as a gather). Then, per
head, q and k are averaged over each block, the pooled attention map softmax(q̄ k̄ᵀ · scale) estimates how much
attention each query block pays each key block, and each query block visits its strongest key blocks
(`draft_block_mask`). All functions are pure torch and trace under make_fx / torch.compile(fullgraph=True) with
symbolic sizes.

Window shape. A block becomes a `rows x cols` patch of one frame, the divisor pair of block_size closest to a
square with cols >= rows: 8x8 for 64-token blocks, 8x16 for 128 (DraftAttention's own pooling patch). For a given
area the near-square patch has the smallest spread, so its mean q/k stand for its tokens best; the longer side
lies along the width because video frames are landscape. Windows stay inside one frame because latent frame counts
are small and odd (1 + 4k: 13, 21), so a multi-frame window would leave a ragged temporal edge on every tile, and
temporal neighbours already line up: a window's counterpart in the next frame is the same tile there.

Ragged edges. When height or width is not a multiple of the window, each frame is tiled with whole windows and
the leftover right strip (top to bottom) and bottom strip (right to left, so the path stays connected) are cut
into pieces one window long. All whole windows of all frames come first, block-aligned; then the edge pieces, each
chaining its frames (forwards, then backwards in the next piece), so an edge block is a short spatio-temporal box
of one piece, or of two neighbouring pieces in the same frames. Text before the video shifts the block grid; the
video order is rotated so whole windows start on a block boundary and the last few edge tokens fill the (always
visited) text block before it (with fewer edge tokens than that, one window is split between the first and the last
video block). Known weak spot: a single frame less than two windows wide or tall leaves a thin strip whose blocks
are long and narrow; on real latent grids (see the tests) block spread is within 10% of a whole window's.
"""
from __future__ import annotations

import math

import torch

from dit_compiler.kernels import block_mask
from dit_compiler.kernels.block_means import block_counts
from dit_compiler.passes.planners import common


def window_shape(block_size: int) -> tuple[int, int]:
    """(rows, cols) of the frame patch one block covers: the divisor pair of block_size closest to a square,
    cols >= rows. 64 -> (8, 8), 128 -> (8, 16), 16 -> (4, 4)."""
    common.check_sizes(1, block_size=block_size)
    block_size = int(block_size)
    rows = max(d for d in range(1, math.isqrt(block_size) + 1) if block_size % d == 0)
    return rows, block_size // rows


def window_video_order(frames, height, width, text_before, block_size: int, device=None) -> torch.Tensor:
    """int64 [frames*height*width]: frame-major video token ids in window order (see the module docstring)."""
    rows, cols = window_shape(block_size)
    frame_len = height * width
    video_len = frames * frame_len
    raster = torch.arange(video_len, device=device)
    t, y, x = raster // frame_len, raster % frame_len // width, raster % width
    tile_rows, tile_cols = height // rows, width // cols
    in_tile = (y < tile_rows * rows) & (x < tile_cols * cols)
    tile = (t * tile_rows + y // rows) * tile_cols + x // cols
    right_pieces = (height + rows - 1) // rows
    edge_piece = torch.where(x >= tile_cols * cols, y // rows, right_pieces + tile_cols - 1 - x // cols)
    unit = torch.where(in_tile, tile, frames * tile_rows * tile_cols + edge_piece)
    # Within a unit tokens go (t, y, x): rows of a tile, frame after frame of an edge piece. Odd pieces run their
    # frames backwards, so a block straddling two neighbouring pieces joins them in the same frame.
    frame = torch.where(in_tile | (edge_piece % 2 == 0), t, frames - 1 - t)
    base = torch.argsort(unit * video_len + frame * frame_len + raster % frame_len)
    shift = -text_before % block_size
    return base[(raster - shift) % video_len]


def window_permutation(frames, height, width, text_before, text_after, block_size: int, device=None):
    """(perm, inverse) int64 [S], S = text_before + frames*height*width + text_after, that put the video tokens
    in window order (each block of `block_size` tokens one compact frame patch) with text tokens in place.
    x[..., perm, :] is in window order; x_windowed[..., inverse, :] is x again."""
    common.check_sizes(1, frames=frames, height=height, width=width, block_size=block_size)
    common.check_sizes(0, text_before=text_before, text_after=text_after)
    order = window_video_order(frames, height, width, text_before, block_size, device)
    return common.sequence_permutation(order, text_before, text_after)


def pooled_attention_map(q: torch.Tensor, k: torch.Tensor, block_size: int, scale=None) -> torch.Tensor:
    """[B, H, nq, nkv] float32: the low-resolution attention map, softmax over key blocks of
    `pooled_attention_logits`."""
    return pooled_attention_logits(q, k, block_size, scale).softmax(dim=-1)


def pooled_attention_logits(q: torch.Tensor, k: torch.Tensor, block_size: int, scale=None) -> torch.Tensor:
    """[B, H, nq, nkv] float32: the scaled scores of block-averaged q and k (`pooled_logits`)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Our kernel, not Inductor's reduction of pad + sum: 101.1 against 144.0 µs a site (H100, kernels/NOTES.md).
    q_means, k_means = (torch.ops.vsparse.block_means(t, None, block_size) for t in (q, k))
    return pooled_logits(q_means, k_means, block_counts(k.shape[-2], block_size, k.device), scale)


def pooled_map(q_means: torch.Tensor, k_means: torch.Tensor, k_counts: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q̄ k̄ᵀ · scale) over key blocks from block means (`pooled_logits`)."""
    return pooled_logits(q_means, k_means, k_counts, scale).softmax(dim=-1)


def pooled_logits(q_means: torch.Tensor, k_means: torch.Tensor, k_counts: torch.Tensor, scale: float) -> torch.Tensor:
    """The pooled map's logits q̄ k̄ᵀ · scale. A key block's logit gains log(its token count), so a partial last block
    weighs what its tokens would (each of n equal keys adds exp(score) to the softmax sum)."""
    return q_means @ k_means.transpose(-1, -2) * scale + k_counts.float().log()


def draft_block_mask(q: torch.Tensor, k: torch.Tensor, *, block_size: int, density: float, text_before,
                     text_after, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """DraftAttention's per-head block mask for self-attention q, k [B, H, S, D] already in window order.

    Each query block visits the max(1, ceil(density * nkv)) key blocks with the highest pooled attention
    (`pooled_attention_map`); its own diagonal block and every text block (any block holding a text token) are
    always visited and count toward that budget, and text query blocks visit everything: text is few tokens and
    carries the prompt. density=1 visits every block. `scale` defaults to 1/sqrt(D), like SDPA.
    Returns (kv_num_blocks int32 [B, H, nq], kv_indices int32 [B, H, nq, nkv]), each row's visited blocks
    strongest first.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-2:] != k.shape[-2:]:
        raise ValueError(f"q and k must both be [B, H, S, D] self-attention inputs, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    seq_len = q.shape[-2]
    common.check_sizes(1, block_size=block_size)
    common.check_sizes(0, text_before=text_before, text_after=text_after)
    if text_before + text_after > seq_len:
        raise ValueError(f"text_before + text_after = {text_before + text_after} exceeds the sequence ({seq_len})")
    # Softmax keeps each row's order, so ranking the logits ranks the pooled map without computing it.
    scores = pooled_attention_logits(q, k, block_size, scale)
    text = common.text_blocks(seq_len, text_before, text_after, block_size, q.device)
    return common.strongest_blocks(scores, *common.block_budget(density, text))


class DraftPlanner:
    """The planner contract (passes/planners/__init__.py) for DraftAttention: a constant window order, a block mask
    from the pooled map of q and k in that order (`draft_block_mask`, its budget a constant)."""

    name = "draft"
    fixed_order = True

    def constants(self, layout, block_size: int, density: float, device) -> dict:
        perm, inverse = window_permutation(*layout, block_size, device=device)
        text = common.text_blocks(perm.shape[0], layout[3], layout[4], block_size, device)
        forced, kept = common.block_budget(density, text)
        # Every row keeps a count fixed by the layout, so the kernel's schedule is a constant too.
        return {"perm": perm, "inverse": inverse, "forced": forced, "kept": kept,
                "q_block_order": block_mask.heaviest_first(kept[None, None])}

    def plan(self, q, k, v, constants, layout, *, block_size: int, density: float, scale: float, dense=None):
        from dit_compiler.passes.planners import Plan

        return Plan(constants["perm"], constants["inverse"], q_block_order=constants["q_block_order"])

    def mask(self, q, k, plan, constants, layout, *, block_size: int, density: float, scale: float):
        scores = pooled_attention_logits(q, k, block_size, scale)
        return common.strongest_blocks(scores, constants["forced"], constants["kept"])
