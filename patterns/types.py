"""What the recognizers report. Plain dataclasses: the passes read them, `analysis.json` is their `asdict`.

Sizes are ints when the graph's shapes are static and sympy expressions (as strings) when they are symbolic.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

Size = Union[int, str]


@dataclass
class DimRef:
    """A size read off a graph value at run time: `node.shape[dim]` (symbolic shapes need this, ints do not)."""

    node: str
    dim: int


@dataclass
class LayoutSegment:
    """One run of a site's token sequence, in sequence order: text (every token that is not a video grid: prompt,
    audio, image embeddings) or a whole F x H x W video grid (patch tokens in row-major frame, row, column order)."""

    kind: str  # "text" | "grid"
    length: Size
    source: str  # the node the tokens come from (origin of the token walk)
    frames: Optional[Size] = None  # grid segments only
    height: Optional[Size] = None
    width: Optional[Size] = None


@dataclass
class VideoLayout:
    """The token layout of one self-attention site.

    `segments` is the layout: ordered text and grid runs whose lengths sum to the sequence (`proof`). The single-grid
    fields below are what the planners (passes/planners) consume, `seq == text_before + frames*height*width +
    text_after`; they are set only when the segments are text, one grid, text (`single_grid`). Several grids in one
    sequence (FramePack's history latents at other scales, reference frames with their own patch embedding) keep them
    None and the site dense until a planner serves such layouts.

    `attention` says what attends to what: "full" (the sequence above), or factorized attention, where the site's
    sequence is one axis set of the F x H x W grid and the rest is folded into the batch: "spatial" (each frame
    attends within its H*W tokens) or "temporal" (each position attends over its F frames). The grid fields then
    give the whole grid and the site stays dense (the planners take one F x H x W sequence per batch row).
    """

    frames: Optional[Size]
    height: Optional[Size]
    width: Optional[Size]
    text_before: Optional[Size]
    text_after: Optional[Size]
    # The identity sympy proved, e.g. "s0 == 5 + 3*4*5" (kept for the report).
    proof: str
    # Where each size can be read in the graph, for passes that must work with symbolic shapes; None where the
    # size is a constant or cannot be read off one dimension.
    refs: dict[str, Optional[DimRef]] = field(default_factory=dict)
    segments: list[LayoutSegment] = field(default_factory=list)
    attention: str = "full"  # "full" | "spatial" | "temporal"

    @property
    def single_grid(self) -> bool:
        return self.attention == "full" and self.frames is not None


@dataclass
class AttentionSite:
    node: str  # the attention output node (SDPA call, or the final matmul of an explicit softmax(QK^T)V)
    kind: str  # "sdpa" | "explicit"
    module_path: str  # from nn_module_stack, e.g. "blocks.3.attn1"
    block: Optional[int]  # index in its block stack, None outside any
    stack: Optional[str]  # name of that stack, e.g. "blocks", "single_transformer_blocks"
    self_attention: bool
    query: str
    key: str
    value: str
    q_shape: list[Size]  # [B, H, Sq, D]
    kv_shape: list[Size]  # [B, H, Skv, D]
    head_dim: int
    dtype: str
    scale: Optional[float]  # None: 1/sqrt(head_dim)
    mask: str  # "none" | "key_padding" | "unsupported"
    mask_node: Optional[str] = None  # the attn_mask argument's node, when there is one
    layout: Optional[VideoLayout] = None  # self-attention sites only
    eligible: bool = False  # can be rewritten to block-sparse attention
    reason: str = ""  # why not, when not eligible; what was recognized otherwise
    # Position of its block across all main-stream stacks in graph order (HunyuanVideo: double blocks, then single
    # blocks), for options counted over the whole stack such as dense_layers; None outside them.
    layer: Optional[int] = None


@dataclass
class BlockStackInfo:
    name: str  # ModuleList attribute path, e.g. "blocks" or "single_transformer_blocks"
    blocks: list[list[str]]  # node names of block i, in graph order
    entry: list[str]  # residual-stream values entering block 0 (cut vertices of the dataflow DAG)
    exit: list[str]  # residual-stream values leaving the last block


@dataclass
class GraphAnalysis:
    model: str  # class name of the root module, from nn_module_stack
    sites: list[AttentionSite]
    stacks: list[BlockStackInfo]  # in graph order (HunyuanVideo has two)
    timestep_input: Optional[str]  # placeholder that feeds the timestep embedding, None when there is none
    timestep_index: Optional[int]  # its position among the graph's placeholders
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
