"""Recognizers over the Dynamo FX graph of a video DiT: `analyze(gm, example_inputs) -> GraphAnalysis`.

One file per recognizer (see README.md): attention.py (sites, self/cross, masks), video_layout.py (token grid),
block_stack.py (stacks, residual entry/exit, head/stack/tail partition), timestep.py; tokens.py is the token
provenance walk that attention and layout share, graph.py the helpers all share. None of them mutates the graph.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

import torch.fx as fx

from .attention import analyze_site, find_attention, key_padding_lengths
from .block_stack import find_stacks, latent_inputs, partition
from .graph import Sizes, data_inputs, depends_on, root_class_name
from .timestep import find_timestep
from .tokens import TokenTracer
from .types import AttentionSite, BlockStackInfo, DimRef, GraphAnalysis, VideoLayout
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
    # Token content comes from the data inputs other than the timestep: what only the timestep computes is
    # conditioning, like a RoPE table (Wan2.2 TI2V's per-token timesteps modulate every token differently).
    input_dependent = depends_on(gm, [d for d in data if d.name != timestep])
    projections = TokenTracer(sizes, input_dependent, stop_at_projections=True)
    tokens = TokenTracer(sizes, input_dependent, stop_at_projections=False)
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
            try:
                site.layout = video_layout(sizes, tokens, nodes[site.query], len(site.q_shape) - 2)
            except LayoutError as failure:
                blockers.append(f"layout: {failure}")
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


__all__ = ["analyze", "partition", "key_padding_lengths", "AttentionSite", "BlockStackInfo", "DimRef",
           "GraphAnalysis", "VideoLayout"]
