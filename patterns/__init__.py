"""Recognizers over the Dynamo FX graph of a video DiT: `analyze(gm, example_inputs) -> GraphAnalysis`.

One file per recognizer (see README.md): attention.py (sites, self/cross, masks), video_layout.py (token layout),
axes.py (axis labels, factorized attention), block_stack.py (stacks, residual entry/exit, head/stack/tail
partition), timestep.py; tokens.py is the token provenance walk that attention and layout share, graph.py the
helpers all share. None of them mutates the graph.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

import torch.fx as fx

from .attention import analyze_site, find_attention, key_padding_lengths
from .axes import axis_labels, factorized
from .block_stack import find_stacks, latent_inputs, partition
from .graph import Sizes, data_inputs, depends_on, root_class_name
from .timestep import find_timestep
from .tokens import TokenTracer
from .types import AttentionSite, BlockStackInfo, DimRef, GraphAnalysis, LayoutSegment, VideoLayout
from .video_layout import LayoutError, video_layout

# The token walk recurses along the residual stream; deep stacks need more than Python's default 1000 frames.
_RECURSION_LIMIT = 20000


def analyze(gm: fx.GraphModule, example_inputs: Optional[Iterable[Any]] = None) -> GraphAnalysis:
    """Recognize attention sites, their video layouts, the block stacks and the timestep input of `gm`."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"analyze expects a torch.fx.GraphModule, got {type(gm).__name__}")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, _RECURSION_LIMIT))
    try:
        return _analyze(gm, example_inputs)
    finally:
        sys.setrecursionlimit(limit)


def _analyze(gm: fx.GraphModule, example_inputs: Optional[Iterable[Any]]) -> GraphAnalysis:
    sizes = Sizes(gm)
    data = data_inputs(gm, example_inputs)
    timestep, timestep_index, timestep_notes = find_timestep(gm, data)
    # Token content comes from floating-point data inputs other than the timestep. Integer inputs are positions,
    # indices or masks, and what is computed from them alone (Kandinsky's RoPE from position ids) is positional, like
    # a constant table; what only the timestep computes is conditioning (Wan2.2 TI2V's per-token timesteps modulate
    # every token differently).
    input_dependent = depends_on(gm, [d for d in data if d.name != timestep
                                      and d.meta["example_value"].dtype.is_floating_point])
    projections = TokenTracer(sizes, input_dependent, stop_at_projections=True)
    tokens = TokenTracer(sizes, input_dependent, stop_at_projections=False)
    labels = axis_labels(gm, sizes, data)
    raw_sites = find_attention(gm)
    stacks, notes = find_stacks(gm, latent_inputs(gm, sizes, data), {raw.node.name for raw in raw_sites})
    layer_of = {}
    for stack in stacks:
        for index in range(len(stack.blocks)):
            layer_of[(stack.name, index)] = len(layer_of)
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = []
    for raw in raw_sites:
        site, blockers = analyze_site(raw, sizes, projections)
        site.layer = layer_of.get((site.stack, site.block))
        if site.self_attention:
            seq_dim = len(site.q_shape) - 2
            split = factorized(labels, nodes[site.query], 0, seq_dim)
            if split is not None:
                site.layout = _factorized_layout(split, site.query, site.q_shape[0], site.q_shape[seq_dim])
                blockers.append(_factorized_reason(site.layout))
            else:
                try:
                    site.layout = video_layout(sizes, tokens, nodes[site.query], seq_dim, labels)
                except LayoutError as failure:
                    blockers.append(f"layout: {failure}")
                if site.layout is not None and not site.layout.single_grid:
                    blockers.append(f"{sum(s.kind == 'grid' for s in site.layout.segments)} video grids in one "
                                    f"sequence ({site.layout.proof}): the planners take one text + F*H*W + text "
                                    f"sequence")
        site.eligible = not blockers
        if blockers:
            site.reason = "; ".join(blockers)
        else:
            layout = site.layout
            site.reason = f"{site.reason}: {layout.text_before} text + {layout.frames}x{layout.height}x" \
                          f"{layout.width} video + {layout.text_after} text tokens, mask {site.mask}"
        sites.append(site)
    return GraphAnalysis(model=root_class_name(gm) or "", sites=sites, stacks=stacks, timestep_input=timestep,
                         timestep_index=timestep_index, notes=notes + timestep_notes)


def _factorized_layout(split, query: str, batch, seq) -> VideoLayout:
    """The whole grid of a factorized site; its sequence is one axis set of it (axis labels, not a sum)."""
    frames, height, width = (Sizes.report(e) for e in split.grid)
    per_row = "frames" if split.attention == "temporal" else "height*width"
    proof = f"{Sizes.report(seq)} == {per_row} of the {frames}x{height}x{width} grid, the rest in batch " \
            f"{Sizes.report(batch)}"
    grid = LayoutSegment("grid", Sizes.report(seq), query, frames, height, width)
    return VideoLayout(frames, height, width, 0, 0, proof, {}, [grid], split.attention)


def _factorized_reason(layout: VideoLayout) -> str:
    grid = f"{layout.frames}x{layout.height}x{layout.width}"
    what = "each frame attends within its own tokens, frames folded into the batch" if \
        layout.attention == "spatial" else "each position attends over the frames, positions folded into the batch"
    return f"factorized {layout.attention} attention over a {grid} grid ({what}): kept dense, the planners take " \
           f"one text + F*H*W + text sequence per batch row"


__all__ = ["analyze", "partition", "key_padding_lengths", "AttentionSite", "BlockStackInfo", "DimRef",
           "GraphAnalysis", "LayoutSegment", "VideoLayout"]
