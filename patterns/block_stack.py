"""Transformer block stacks, their residual-stream entry and exit, and the head / stack / tail partition.

A stack is a ModuleList whose indexed children own graph nodes (`blocks.3`, `transformer_blocks.0`): a node belongs
to the outermost indexed module in its nn_module_stack, so `blocks.0.attn1.to_out.0` is in block `blocks.0`.
Only stacks on the denoiser's main residual stream count: removing the stack's nodes from the dataflow DAG must cut
every path from the latent input (the data input shaped like the output: what a denoiser predicts) to the output.
HunyuanVideo's text `refiner_blocks` fail that test (the latent reaches the output without them) and are left out.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from .graph import PASSTHROUGH_OPS, RESHAPE_OPS, Sizes, dataflow_dag, module_entries, op_name, tensor_of
from .types import BlockStackInfo, GraphAnalysis

# Ops that read a size of a tensor, not its values: Dynamo emits one right after an op with a data-dependent size
# (a slice to a length read with .item()) to bind the new size symbol.
_SIZE_READS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_storage_offset.default,
               torch.ops.aten.sym_numel.default}
# Dynamo's markers of a vmap level (flex attention's block-mask helpers run under vmap): the batched values made
# between them exist only inside the level.
_VMAP_LEVEL = (torch._functorch.predispatch._vmap_increment_nesting,
               torch._functorch.predispatch._vmap_decrement_nesting)
_INDEXED = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")
# Ops on the residual stream's identity path: the skip connection carries the value through them unchanged
# (adds of same-shaped values, token concatenation and slicing, dtype and layout changes).
_IDENTITY_OPS = PASSTHROUGH_OPS | RESHAPE_OPS | {"add", "sub", "cat", "getitem", "split", "chunk", "permute",
                                                 "transpose"}


def block_of(node: fx.Node) -> Optional[tuple[str, int]]:
    """(stack path, index) of the outermost ModuleList-indexed module the node runs in."""
    for path, _ in module_entries(node):
        match = _INDEXED.match(path)
        if match:
            return match.group(1), int(match.group(2))
    return None


def latent_inputs(gm: fx.GraphModule, sizes: Sizes, data: list[fx.Node]) -> list[fx.Node]:
    """Data inputs shaped like the graph's first tensor output: a denoiser predicts a tensor shaped like its latent.
    Compared on the example sizes: with symbolic shapes the output's height is 2*(h//2), equal only in fact."""
    outputs = next(iter(gm.graph.find_nodes(op="output"))).args
    flat = [n for n in _flatten(outputs) if isinstance(n, fx.Node) and tensor_of(n) is not None]
    if not flat:
        return []
    shape = [sizes.hint(s) for s in Sizes.shape(flat[0])]
    return [d for d in data if [sizes.hint(s) for s in Sizes.shape(d)] == shape]


def _flatten(value) -> list:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    return [value]


def find_stacks(gm: fx.GraphModule, latents: list[fx.Node], attention: set[str]) -> tuple[list[BlockStackInfo],
                                                                                         list[str]]:
    """The main-stream stacks in graph order, and notes on what was left out or looked odd. Only ModuleLists
    whose blocks run attention (nodes named in `attention`) are transformer stacks; an nn.Sequential of layers
    is not."""
    notes: list[str] = []
    members: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for node in gm.graph.nodes:
        found = block_of(node) if node.op not in ("placeholder", "output") else None
        if found:
            members[found[0]][found[1]].append(node.name)
    dag = dataflow_dag(gm, tensors_only=True)
    output = next(iter(gm.graph.find_nodes(op="output"))).name
    reaching = [x.name for x in latents if nx.has_path(dag, x.name, output)]
    if not reaching:
        notes.append("no latent input (a data input shaped like the output) reaches the output: every stack counts")
    stacks = []
    for name, blocks in members.items():
        nodes = {n for names in blocks.values() for n in names}
        if not nodes & attention:
            continue
        cut = dag.subgraph(n for n in dag if n not in nodes)
        if reaching and any(nx.has_path(cut, x, output) for x in reaching):
            notes.append(f"{name}: not on the main residual stream (the latent reaches the output without it)")
            continue
        if sorted(blocks) != list(range(len(blocks))):
            notes.append(f"{name}: block indices {sorted(blocks)} are not 0..n-1")
        ordered = [blocks[i] for i in sorted(blocks)]
        entry, exit_ = _residual_ends(gm, dag, nodes, ordered, notes, name, reaching)
        stacks.append(BlockStackInfo(name, ordered, entry, exit_))
    return stacks, notes


def _residual_ends(gm: fx.GraphModule, dag: nx.DiGraph, nodes: set[str], blocks: list[list[str]],
                   notes: list[str], name: str, latents: list[str]) -> tuple[list[str], list[str]]:
    """Entry: values from outside that block 0 reads and that the identity path (the skip connection) carries
    through block 0 and on, so conditioning, text context, RoPE tables and masks are not entries.
    Exit: every stack value read outside the stack, which is by construction the cut through which all of the
    stack's effect reaches the output."""
    by_name = {n.name: n for n in gm.graph.nodes}
    first = set(blocks[0])
    exit_ = [n for n in by_name if n in nodes and tensor_of(by_name[n]) is not None
             and any(u not in nodes for u in dag.successors(n))]
    identity = nx.DiGraph()
    for n in nodes:
        node = by_name[n]
        if op_name(node) not in _IDENTITY_OPS:
            continue
        for source in _identity_sources(node):
            identity.add_edge(source.name, n)
    candidates = []
    for n in blocks[0]:
        for source in by_name[n].all_input_nodes:
            if source.name not in first and source.name not in candidates and tensor_of(source) is not None:
                candidates.append(source.name)
    # The stream runs through block 0 and on: into a later block, or out of the stack (a text stream may end inside
    # it). Values every block reads (conditioning, RoPE tables) reach later blocks too, but not through block 0.
    onward = set(exit_).union(*blocks[1:])
    entry = [c for c in candidates if c in identity and any(
        step in first and (step in onward or nx.descendants(identity, step) & onward)
        for step in identity.successors(c))]
    if not entry:
        notes.append(f"{name}: no residual-stream value enters block 0 along an identity path")
    # The brief's dominance property: every path from the latent into the stack passes through the entry.
    if entry and latents:
        cut = dag.subgraph(n for n in dag if n not in entry)
        bypass = sorted(nodes & set().union(*(nx.descendants(cut, x) for x in latents)))
        if bypass:
            notes.append(f"{name}: the latent reaches {bypass[0]} without passing through the entry {entry}")
    return entry, exit_


def _identity_sources(node: fx.Node) -> list[fx.Node]:
    """Inputs whose value flows unchanged (up to dtype and layout) into `node`."""
    name = op_name(node)
    if name in ("add", "sub"):
        if tensor_of(node) is None:
            return []
        shape = Sizes.shape(node)  # sympy: comparing torch sizes would guard on data-dependent ones (FramePack)
        return [a for a in node.args[:2] if isinstance(a, fx.Node) and tensor_of(a) is not None
                and len(Sizes.shape(a)) == len(shape) and all(map(Sizes.equal, Sizes.shape(a), shape))]
    if name == "cat":
        return [t for t in node.args[0] if isinstance(t, fx.Node)]
    first = node.args[0] if node.args else None
    return [first] if isinstance(first, fx.Node) else []


def _vmap_levels(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """The nodes of each outermost vmap level, from its increment to its decrement in graph order."""
    levels, depth = [], 0
    for node in gm.graph.nodes:
        if node.target is _VMAP_LEVEL[0]:
            if depth == 0:
                levels.append([])
            depth += 1
        if depth:
            levels[-1].append(node)
        if node.target is _VMAP_LEVEL[1]:
            depth -= 1
    return levels


def partition(gm: fx.GraphModule, analysis: GraphAnalysis) -> dict[str, str]:
    """Every node's piece for `split_module`: "head" (does not depend on the stack entry; placeholders too),
    "stack" (the blocks of all main stacks and whatever lies between the entry and them) or "tail" (the rest,
    the output node included). Raises ValueError if a value would flow backwards between pieces."""
    if not analysis.stacks:
        raise ValueError("partition: the analysis found no block stack on the main residual stream")
    entry = analysis.stacks[0].entry
    if not entry:
        raise ValueError(f"partition: stack {analysis.stacks[0].name} has no recognized entry")
    dag = dataflow_dag(gm)
    blocks = {n for stack in analysis.stacks for block in stack.blocks for n in block}
    after_entry = set().union(*(nx.descendants(dag, e) for e in entry))
    feeds_blocks: set[str] = set()
    for node in reversed(gm.graph.nodes):  # graph order is topological (in-place writes only add forward edges)
        if any(u in blocks or u in feeds_blocks for u in dag.successors(node.name)):
            feeds_blocks.add(node.name)
    stack = blocks | (after_entry & feeds_blocks)
    pieces = {}
    for node in gm.graph.nodes:
        if node.name in stack:
            pieces[node.name] = "stack"
        elif node.name in after_entry or node.op == "output":
            pieces[node.name] = "tail"
        else:
            pieces[node.name] = "head"
    for node in gm.graph.nodes:
        # A size read goes with the value it reads: split_module passes a data-dependent size between pieces as
        # the node that first bound it, so a value that crosses pieces needs that node in its own piece or an
        # earlier one (FramePack's prompt, cut to a length read from its mask, enters the stack as a head value).
        if node.target in _SIZE_READS:
            pieces[node.name] = pieces[node.args[0].name]
    rank = {"head": 0, "stack": 1, "tail": 2}
    for level in _vmap_levels(gm):  # a level runs whole in one piece, the latest any of its nodes needs
        piece = max((pieces[n.name] for n in level), key=rank.__getitem__)
        pieces.update((n.name, piece) for n in level)
    for source, target in dag.edges:
        if rank[pieces[source]] > rank[pieces[target]]:
            raise ValueError(f"partition is not acyclic: {source} ({pieces[source]}) feeds {target} "
                             f"({pieces[target]}); the {pieces[source]} piece would have to run before itself")
    return pieces

