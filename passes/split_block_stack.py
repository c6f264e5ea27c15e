"""Split the graph into head / stack / tail pieces around the transformer block stack.

Pattern: the partition that `dit_compiler.patterns.partition` derives from the recognized block stack(s).
Replacement: `split_module` with the original node order kept, so each piece computes exactly what the same
nodes computed before; the runtime can then skip the stack piece and reuse a cached result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.passes.split_module import split_module

PIECES = ("head", "stack", "tail")


@dataclass
class SplitGraph:
    parent: torch.fx.GraphModule  # calls submod_head, submod_stack, submod_tail in order
    pieces: dict[str, torch.fx.GraphModule]


def split_block_stack(gm: torch.fx.GraphModule, partition: dict[str, str]) -> SplitGraph:
    """Split `gm` by `partition` (node name -> "head" | "stack" | "tail"); nodes it omits go to the head."""
    bad = {p for p in partition.values() if p not in PIECES}
    if bad:
        raise ValueError(f"partition names unknown pieces {sorted(bad)}; allowed: {PIECES}")
    if "stack" not in partition.values():
        raise ValueError("partition has no 'stack' node: nothing to split")
    index = {name: i for i, name in enumerate(PIECES)}

    def piece_of(node: torch.fx.Node) -> int:
        return index[partition.get(node.name, "head")]

    parent = split_module(gm, gm, piece_of, keep_original_order=True)
    pieces = {}
    for node in parent.graph.nodes:
        if node.op != "call_module":
            continue
        piece = PIECES[int(node.target.rsplit("_", 1)[1])]
        new_name = f"submod_{piece}"
        sub = getattr(parent, node.target)
        delattr(parent, node.target)
        parent.add_submodule(new_name, sub)
        node.target = new_name
        pieces[piece] = sub
    parent.recompile()
    return SplitGraph(parent, pieces)

