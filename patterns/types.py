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
class VideoLayout:
    """The token grid of one self-attention site: `seq == text_before + frames*height*width + text_after`."""

    frames: Size
    height: Size
    width: Size
    text_before: Size
    text_after: Size
    # The identity sympy proved, e.g. "s0 == 5 + 3*4*5" (kept for the report).
    proof: str
    # Where each size can be read in the graph, for passes that must work with symbolic shapes; None where the
    # size is a constant or cannot be read off one dimension.
    refs: dict[str, Optional[DimRef]] = field(default_factory=dict)


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
