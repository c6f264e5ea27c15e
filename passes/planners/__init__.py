"""Planners: how a sparse-attention site chooses its token order and block mask. One family a file, one contract.

A planner is an object with a `name` (the `sparsity` option's value), a `fixed_order` flag and the methods the
rewrite (passes/sparse_attention.py) calls:

  constants(layout, block_size, density, device) -> dict[str, Tensor]
      Once per static layout, at compile time: whatever depends on the layout and options alone (Draft's window
      order and block budget; Sparse VideoGen's position-major order, both head masks and the sampled rows' masks).
      They live in the compiled module as buffers, so no call recomputes them; with symbolic sizes the graph
      computes them per call.
  plan(q, k, v, constants, layout, *, block_size, density, scale, dense) -> Plan
      Per call, traced into the graph (no host reads): the order of this call (shared [S], per-head [B|1, H, S]
      orders, or one [S] order for the heads `reordered_heads` [B|1, H] selects, the others staying in place), and
      whatever the order's choice already decided about the mask. `dense` is the dense phase (a 0-dim
      bool tensor, or None when no call is dense): the call then runs the full mask whatever the plan says, so a
      planner whose own op can read the flag on the device skips its work there (svg's `sampled_rows_attention`).
  mask(q, k, plan, constants, layout, *, block_size, density, scale) -> (kv_num_blocks, kv_indices)
      Per call: the block mask (kernels/block_mask.py's format, its key blocks stepped by `kv_unit`) for q, k
      already in the plan's order (as given when the plan has `reordered_heads`: the op moves them later).
  carries_choice (optional attribute, default False): `plan` also takes `carried`, a `Carried` (the choice it made on
      an earlier call and whether to choose anew), and returns the choice it used as `Plan.choice` [B, H]: a choice
      per head that may be kept between steps (passes/plan_reuse.py keeps it); svg's head classes.
  unsupported(layout, block_size) -> str | None (optional)
      At compile time: why this planner cannot serve the layout; the site then stays dense with that reason.

`kv_unit` (optional attribute, the op's argument; None: block ids) is the token step of the planner's kv_indices.

`fixed_order` True says `plan` always returns constants["perm"] / constants["inverse"], one order for every call
and head: passes/stack_token_order.py may then put the whole block stack in that order once instead of each site
permuting its q, k, v and output.

`layout` is (frames, height, width, text_before, text_after), ints or SymInts. The generic replacement permutes,
plans, falls back to the full mask in the dense phase, calls `torch.ops.vsparse.block_sparse_attention` and restores
the order; a plan with `reordered_heads` hands its order and heads to the op, which moves only those heads' rows.
tests/test_planners.py runs one conformance test over every registered planner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass
class Plan:
    # int64 [S] (shared) or [B|1, H, S] (per head): x[..., perm, :] is in the plan's order; None: tokens stay
    perm: Optional[torch.Tensor]
    inverse: Optional[torch.Tensor]  # the inverse permutation, same shape
    kv_num_blocks: Optional[torch.Tensor] = None  # the mask, when choosing the order decided it (svg)
    kv_indices: Optional[torch.Tensor] = None
    # int32 [B|1, H|1, nq]: the kernel's query-block schedule (block_mask.heaviest_first of the mask's counts),
    # when the counts are known without the data; else the op sorts them every call
    q_block_order: Optional[torch.Tensor] = None
    # bool [B|1, H]: `perm` ([S]) orders only these heads, the others keep the given order; the op then moves the
    # heads' rows itself (its token_order / reordered_heads), where a per-head perm is a gather of every head
    reordered_heads: Optional[torch.Tensor] = None
    choice: Optional[torch.Tensor] = None  # [B, H], what a `carries_choice` planner chose (see `Carried`)


@dataclass
class Carried:
    """What `plan` of a `carries_choice` planner is given: the choice an earlier call made ([B, H]) and whether to
    choose anew (0-dim bool, decided on the device). Not choosing anew skips the choice's work on the device."""
    choice: torch.Tensor
    resample: torch.Tensor


class Planner(Protocol):
    name: str
    fixed_order: bool

    def constants(self, layout, block_size: int, density: float, device) -> dict: ...

    def plan(self, q, k, v, constants: dict, layout, *, block_size: int, density: float, scale: float,
             dense: Optional[torch.Tensor] = None) -> Plan: ...

    def mask(self, q, k, plan: Plan, constants: dict, layout, *, block_size: int, density: float,
             scale: float): ...


def _registry() -> dict:
    from dit_compiler.passes.planners.draft import DraftPlanner
    from dit_compiler.passes.planners.dual import DualPlanner
    from dit_compiler.passes.planners.svg import SvgPlanner, SvgShiftPlanner

    return {planner.name: planner for planner in (DraftPlanner(), SvgPlanner(), DualPlanner(), SvgShiftPlanner())}


PLANNERS: dict = _registry()
