"""The timestep input: the data placeholder that feeds a sinusoidal embedding.

A sinusoidal embedding is a `sin` and a `cos` of (input x frequency table), the table an `exp` of an `arange` that
no input changes. A placeholder is a candidate when it reaches both a sin and a cos of that form.

HunyuanVideo's `guidance` is embedded the same way. The denoising timestep conditions the whole network, text
refinement included, while guidance only conditions the main stack: so among candidates the one whose value reaches
the most nodes wins. Only when two candidates reach equally many nodes (a symmetric use, e.g. Flux-like
`t_emb + g_emb`) do names break the tie: a name containing "timestep", then "time", then the first placeholder.
"""
from __future__ import annotations

from typing import Optional

import networkx as nx
import torch.fx as fx

from .graph import dataflow_dag, depends_on, op_name


def find_timestep(gm: fx.GraphModule, data: list[fx.Node]) -> tuple[Optional[str], Optional[int], list[str]]:
    """(placeholder name, index among placeholders, notes); (None, None, []) when no input is embedded so."""
    dag = dataflow_dag(gm, tensors_only=True)
    nodes = {n.name: n for n in gm.graph.nodes}
    input_dependent = depends_on(gm, data)
    tables = {n.name for n in gm.graph.nodes if op_name(n) == "exp" and n not in input_dependent
              and any(op_name(nodes[a]) == "arange" for a in nx.ancestors(dag, n.name))}
    waves = {n.name for n in gm.graph.nodes if op_name(n) in ("sin", "cos") and tables & nx.ancestors(dag, n.name)}
    reached = {}
    for candidate in data:  # placeholder order, which the stable sort below keeps among equals
        downstream = nx.descendants(dag, candidate.name)
        if {"sin", "cos"} <= {op_name(nodes[n]) for n in downstream & waves}:
            reached[candidate.name] = downstream
    if not reached:
        return None, None, []
    ranked = sorted(reached, key=lambda name: (-len(reached[name]), _name_rank(name)))
    best = ranked[0]
    notes = [f"timestep: {best} and {other} reach equally many nodes; chose {best} by name"
             for other in ranked[1:] if len(reached[other]) == len(reached[best])]
    names = [p.name for p in gm.graph.find_nodes(op="placeholder")]
    return best, names.index(best), notes


def _name_rank(name: str) -> int:
    lowered = name.lower()
    return 0 if "timestep" in lowered else 1 if "time" in lowered else 2
