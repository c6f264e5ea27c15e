"""Rewrite eligible video self-attention into block-sparse attention.

Pattern: an attention site the recognizers marked eligible (self-attention over a proven video token grid, no
mask or a key-padding mask), outside the leading `dense_layers` blocks.
Replacement: one call of `sparse_attention` below with the planner the `sparsity` option names (passes/planners/),
traced into the graph by AOTAutograd when Inductor compiles it. It plans the token order and block mask in the graph
from q and k (no host sync), permutes tokens so the pattern is contiguous, calls
`torch.ops.vsparse.block_sparse_attention` and restores token order. A planner's constants (what depends on the
layout alone: Draft's window order; Sparse VideoGen's orders and head masks) are computed here, once per static
layout, and kept as module buffers. The dense phase
(a 0-dim bool computed in the graph from the timestep, passes/call_record.py) chooses the full mask at run time, so
the leading dense steps need neither a host read nor a second compiled graph.
Every site not rewritten keeps its dense SDPA call and gets a reason in the report.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch

from dit_compiler.kernels import block_mask  # importing the package registers torch.ops.vsparse
from dit_compiler.passes.planners import PLANNERS, Carried
from dit_compiler.options import Options
from dit_compiler.passes.cost_model import why_sparse_does_not_pay
from dit_compiler.patterns import key_padding_lengths
from dit_compiler.patterns.types import AttentionSite, GraphAnalysis


def _with_dense_fallback(dense: Optional[torch.Tensor], kv_num_blocks, kv_indices, seq_len, block_size: int,
                         kv_unit: Optional[int] = None):
    """The planned mask, or every block when `dense` (a 0-dim bool tensor) is set; None: never dense."""
    if dense is None:
        return kv_num_blocks, kv_indices
    full_num, full_idx = block_mask.full(1, 1, seq_len, seq_len, block_size, device=kv_indices.device)
    full_idx = full_idx * (block_size // block_mask.key_unit(kv_unit, block_size))
    return torch.where(dense, full_num, kv_num_blocks), torch.where(dense, full_idx, kv_indices)


def _reorder(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] gathered along S by a shared [S] or per-head [B|1, H, S] index: x[..., index, :]."""
    if index.dim() == 1:
        return x.index_select(2, index)
    return torch.gather(x, 2, index.unsqueeze(-1).expand(x.shape))


def _to_plan_order(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`_reorder(x, perm)`. A shared order is written as a scatter of x's rows to `inverse`: a store at indexed rows
    fuses into the kernel that produces x (for q and k: the RMS norm and RoPE), where a gather needs x written out
    first and copied again. Per-head orders are `permute_tokens`, an opaque gather that reads x once as written:
    their scatter, fused there, more than doubled that kernel's time (H100,
    results/h100-2026-11-24/site-profile-e60ab47.txt), and Inductor's own gather recomputed RoPE's last step at the
    gathered rows (H200, results/h200-2026-12-04/svg-fused-gather-kernel-72160ab.txt)."""
    if perm.dim() != 1:  # [H, S] (shared by every batch element) or [B, H, S]
        return torch.ops.vsparse.permute_tokens(x, perm)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).index_copy(2, inverse, x)


def sparse_attention(q, k, v, dense, kv_lengths, constants, layout, *, planner: str, density: float, block_size: int,
                     scale: float, in_plan_order: bool = False, carried=None):
    """The one replacement of every planner: plan, permute, mask, fall back to the full mask in the dense phase,
    block-sparse attention, restore the order. Returns (output, kv_num_blocks, kv_indices), and the plan's choice
    after them when `carried` ((choice, resample), passes/plan_reuse.py) is given. `in_plan_order`: q, k, v come in
    the planner's fixed order and the output stays in it (passes/stack_token_order.py)."""
    chosen = PLANNERS[planner]
    extra = {} if carried is None else {"carried": Carried(*carried)}
    plan = chosen.plan(q, k, v, constants, layout, block_size=block_size, density=density, scale=scale,
                       dense=dense, **extra)
    if in_plan_order and not chosen.fixed_order:
        raise ValueError(f"planner {planner!r} has no fixed order for q, k, v to come in")
    reorders = not in_plan_order and plan.perm is not None and plan.reordered_heads is None
    if reorders:
        # A per-head order's batch dim of 1 dropped once: one index node for q, k and v, not a view each.
        perm = plan.perm[0] if plan.perm.dim() == 3 and plan.perm.shape[0] == 1 else plan.perm
        q, k, v = (_to_plan_order(t, perm, plan.inverse) for t in (q, k, v))
    kv_num_blocks, kv_indices = chosen.mask(q, k, plan, constants, layout, block_size=block_size, density=density,
                                           scale=scale)
    kv_unit = planner_kv_unit(planner)
    kv_num_blocks, kv_indices = _with_dense_fallback(dense, kv_num_blocks, kv_indices, q.shape[2], block_size,
                                                     kv_unit)
    token_order = None if plan.reordered_heads is None else plan.perm
    out = torch.ops.vsparse.block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, scale, block_size, kv_lengths,
                                                   plan.q_block_order, kv_unit=kv_unit, token_order=token_order,
                                                   reordered_heads=plan.reordered_heads)
    out = _reorder(out, plan.inverse) if reorders else out
    return (out, kv_num_blocks, kv_indices) if carried is None else (out, kv_num_blocks, kv_indices, plan.choice)


@dataclass
class SiteDecision:
    node: str
    module_path: str
    rewritten: bool
    reason: str


def _why_dense(site: AttentionSite, opts: Options) -> Optional[str]:
    if not site.eligible:  # the reason names what q, k and v come from when it is not self-attention
        return site.reason or "not eligible"
    if site.layer is not None and site.layer < opts.dense_layers:
        return f"layer {site.layer} < dense_layers={opts.dense_layers}"
    if site.head_dim not in (64, 128):
        return f"head dim {site.head_dim} not supported by the block-sparse kernel (64, 128)"
    if opts.dense_steps >= 1:
        return "dense_steps=1: every step is dense"
    return None


def _cost_verdict(q_value, opts: Options, cuda_graphs: bool) -> tuple[Optional[str], str]:
    """(reason to stay dense, estimate in words): the cost model's, unless `force_sparse`."""
    reason, words = why_sparse_does_not_pay(q_value.shape, opts.density, opts.sparsity, q_value.device, cuda_graphs)
    return (None, words or "forced") if opts.force_sparse else (reason, words)


def _planner_refuses(planner: str, site: AttentionSite, nodes: dict, block_size: int) -> Optional[str]:
    """The planner's own reason it cannot serve the site's layout (`unsupported`, optional in the contract). A
    symbolic size is read as the SymInt Dynamo traced, so the verdict becomes a shape guard: a later size on the
    other side of it compiles again and is judged again."""
    unsupported = getattr(PLANNERS[planner], "unsupported", None)
    if unsupported is None or site.layout is None:
        return None
    sizes = []
    for key in ("frames", "height", "width", "text_before", "text_after"):
        value, ref = getattr(site.layout, key), site.layout.refs.get(key)
        if not isinstance(value, int):
            if ref is None:
                return None  # stays dense anyway: no graph value to read the size from
            value = nodes[ref.node].meta["example_value"].shape[ref.dim]
        sizes.append(value)
    return unsupported(tuple(sizes), block_size)


def planner_kv_unit(planner: str) -> Optional[int]:
    """The token step of the planner's kv_indices (its optional `kv_unit`; None: block ids)."""
    return getattr(PLANNERS[planner], "kv_unit", None)


def _planner_constants(planner: str, layout, block_size: int, density: float, device) -> dict:
    return PLANNERS[planner].constants(layout, block_size, density, device)


def _constant_nodes(gm: torch.fx.GraphModule, planner: str, layout: list, block_size: int, density: float, device,
                    constants: dict):
    """The planner's constants as graph values: with a static layout computed once here and kept in the module as
    buffers shared by every site of that layout; with symbolic sizes computed by the graph."""
    if all(isinstance(size, int) for size in layout):
        key = tuple(layout)
        if key not in constants:
            names = {}
            for name, tensor in _planner_constants(planner, key, block_size, density, device).items():
                names[name] = f"vsparse_{planner}_{len(constants)}_{name}"
                gm.register_buffer(names[name], tensor)
            constants[key] = names
        return {name: gm.graph.get_attr(buffer) for name, buffer in constants[key].items()}
    return gm.graph.call_function(_planner_constants, (planner, tuple(layout), block_size, density, device))


def rewrite_sparse_attention(gm: torch.fx.GraphModule, analysis: GraphAnalysis, opts: Options,
                             dense_flag: Optional[torch.fx.Node], device: torch.device, collect_masks: bool = False,
                             cuda_graphs: bool = False):
    """Rewrite every eligible site where the cost model says sparse pays (every eligible site with `force_sparse`)
    in place; `dense_flag` None when no call is ever dense (dense_steps=0).

    Returns the decision per site and, per rewritten site, the node of its visited block fraction (for the call
    record) and, with `collect_masks` (dumping), of its block-bool mask.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    decisions, densities, masks, constants = [], [], [], {}
    for site in analysis.sites:
        reason = _why_dense(site, opts) or _planner_refuses(opts.sparsity, site, nodes, opts.block_size)
        estimate = ""
        if reason is None:
            reason, estimate = _cost_verdict(nodes[site.query].meta["example_value"], opts, cuda_graphs)
        if reason is not None:
            decisions.append(SiteDecision(site.node, site.module_path, False, reason))
            continue
        node = nodes[site.node]
        with gm.graph.inserting_before(node):
            sizes = [_size_arg(gm.graph, nodes, site, key)
                     for key in ("frames", "height", "width", "text_before", "text_after")]
            if any(s is None for s in sizes):
                decisions.append(SiteDecision(site.node, site.module_path, False,
                                              "symbolic layout size with no graph value to read it from"))
                continue
            kv_lengths = None
            if site.mask == "key_padding":
                kv_lengths = gm.graph.call_function(key_padding_lengths, (nodes[site.mask_node],))
            scale = site.scale if site.scale is not None else 1.0 / math.sqrt(site.head_dim)
            constants_node = _constant_nodes(gm, opts.sparsity, sizes, opts.block_size, opts.density, device, constants)
            call = gm.graph.call_function(
                sparse_attention,
                (nodes[site.query], nodes[site.key], nodes[site.value], dense_flag, kv_lengths, constants_node,
                 tuple(sizes)),
                {"planner": opts.sparsity, "density": opts.density, "block_size": opts.block_size, "scale": scale})
            out = gm.graph.call_function(operator.getitem, (call, 0))
            count, indices = (gm.graph.call_function(operator.getitem, (call, i)) for i in (1, 2))
            densities.append(gm.graph.call_function(block_mask.visited_fraction, (count, indices)))
            if collect_masks:
                masks.append(gm.graph.call_function(block_mask.to_block_bool, (count, indices, opts.block_size,
                                                                               planner_kv_unit(opts.sparsity))))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        decisions.append(SiteDecision(site.node, site.module_path, True,
                                      f"{opts.sparsity} block-sparse, density {opts.density}, block {opts.block_size}"
                                      f" ({estimate})"))
    gm.graph.lint()
    gm.recompile()
    return decisions, densities, masks


def _size_arg(graph: torch.fx.Graph, nodes, site: AttentionSite, key: str):
    """An int, or a node reading the size off a graph value when it is symbolic."""
    value = getattr(site.layout, key)
    if isinstance(value, int):
        return value
    ref = site.layout.refs.get(key)
    if ref is None:
        return None
    return graph.call_function(torch.ops.aten.sym_size.int, (nodes[ref.node], ref.dim))
