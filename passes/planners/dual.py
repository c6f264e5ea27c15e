"""Dual-layout Draft: per head, Draft's pooled estimate in both token layouts, and the layout that keeps more mass.

Draft alone orders tokens frame-major in windows (draft.py): a spatial head's attention is a few blocks, but a
temporal head's (the same position across frames) is spread over every frame's copy of a window, and at low density
those copies compete for the budget. Sparse VideoGen's position-major order (svg.py) holds a temporal head's pattern
in a narrow band, but SVG picks among two fixed masks. This planner estimates each head in both layouts with
DraftAttention's pooled map (block-averaged q and k, softmax over key blocks) and its budgeted top-k
(`common.strongest_blocks`), sums the estimated attention mass the kept blocks hold, and gives each head the layout
where that sum is larger, with that layout's data-chosen mask. Cost: the pooled map twice, its block means read
straight from the frame-major tokens in each layout's order (`torch.ops.vsparse.block_means`: no gathered copy of q
or k), plus SVG's per-head gathers; the mask's counts are fixed by the layout, so the kernel's schedule is a
constant. Traces with symbolic sizes.
"""
from __future__ import annotations

import torch

from dit_compiler.kernels import block_mask
from dit_compiler.kernels.block_means import block_counts
from dit_compiler.passes.planners import common
from dit_compiler.passes.planners.draft import pooled_map, window_permutation
from dit_compiler.passes.planners.svg import position_major_permutation

LAYOUTS = ("window", "position_major")


def kept_mass(scores: torch.Tensor, kept_slots: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """[B, H] float: the pooled attention mass (rows of `scores` [B, H, n, n] sum to 1) the mask keeps, averaged over
    query blocks. `kept_slots` [n, n] bool: which of a row's kv_indices it keeps (the first kv_num_blocks)."""
    return (scores.gather(-1, kv_indices.long()) * kept_slots).sum(-1).mean(-1)


def dual_plan(q, k, constants: dict, *, block_size: int, scale=None):
    """(perm, inverse, kv_num_blocks, kv_indices) per head for q, k [B, H, S, D] in frame-major order: each head in
    the layout (window or position-major) whose pooled-map mask keeps more estimated mass."""
    masses, masks = [], []
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    counts = constants["block_counts"]
    for name in LAYOUTS:
        q_means, k_means = (torch.ops.vsparse.block_means(t, constants[name], block_size) for t in (q, k))
        scores = pooled_map(q_means, k_means, counts, scale)
        num, idx = common.strongest_blocks(scores, constants["forced"], constants["kept"])
        masses.append(kept_mass(scores, constants["kept_slots"], idx))
        masks.append((num, idx))
    temporal = masses[1] > masses[0]  # [B, H]: the position-major layout keeps more
    pick = temporal[..., None]
    perm = torch.where(pick, constants["position_major"], constants["window"])
    inverse = torch.where(pick, constants["position_major_inverse"], constants["window_inverse"])
    kv_num_blocks = torch.where(pick, masks[1][0], masks[0][0])
    kv_indices = torch.where(pick[..., None], masks[1][1], masks[0][1])
    return perm, inverse, kv_num_blocks, kv_indices


class DualPlanner:
    """The planner contract (passes/planners/__init__.py): both orders, the block budget and the kernel's schedule
    are constants of the layout; per call, each head takes the layout its
    pooled-map estimate favours."""

    name = "dual"
    fixed_order = False

    def constants(self, layout, block_size: int, density: float, device) -> dict:
        window, window_inverse = window_permutation(*layout, block_size, device=device)
        position_major, position_major_inverse = position_major_permutation(*layout, device=device)
        seq_len = window.shape[0]
        text = common.text_blocks(seq_len, layout[3], layout[4], block_size, device)
        forced, kept = common.block_budget(density, text)
        return {"window": window, "window_inverse": window_inverse, "position_major": position_major,
                "position_major_inverse": position_major_inverse,
                "block_counts": block_counts(seq_len, block_size, device), "forced": forced, "kept": kept,
                "kept_slots": torch.arange(kept.shape[0], device=device) < kept[:, None],
                "q_block_order": block_mask.heaviest_first(kept[None, None])}

    def plan(self, q, k, v, constants, layout, *, block_size: int, density: float, scale: float, dense=None):
        from dit_compiler.passes.planners import Plan

        plan = dual_plan(q, k, constants, block_size=block_size, scale=scale)
        return Plan(*plan, q_block_order=constants["q_block_order"])

    def mask(self, q, k, plan, constants, layout, *, block_size: int, density: float, scale: float):
        return plan.kv_num_blocks, plan.kv_indices
