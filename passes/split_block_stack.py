"""Split the graph into head / stack / tail pieces around the transformer block stack.

Pattern: the partition that `dit_compiler.patterns.partition` derives from the recognized block stack(s), taken
before the other passes run; nodes those passes add go to the latest piece among their inputs.
Replacement: `split_module` with the original node order kept within each piece, so each piece computes exactly what
the same nodes computed before; the runtime can then skip the stack piece and reuse a cached result. Autocast
regions and grad-mode changes are rebuilt per piece (`order_by_piece`): every node runs under the same autocast and
grad mode as before, and every piece opens and closes its own. `stack_interface` tells the runtime where the
stack's residual entry is among the piece's inputs, which outputs are provably shaped like it and which are state
that a skipped call passes through.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx.passes.split_module import split_module

from dit_compiler.passes.call_record import CALL_RECORD, EXTRA_OUTPUT
from dit_compiler.passes.plan_reuse import STATE_INPUT
from dit_compiler.passes.stack_token_order import PIECE_OF

PIECES = ("head", "stack", "tail")
# Nodes whose effect is global state that later nodes run under, not a value they read.
GLOBAL_STATE = (torch.amp._enter_autocast, torch.amp._exit_autocast, torch._C._set_grad_enabled)


@dataclass
class SplitGraph:
    parent: torch.fx.GraphModule  # calls submod_head, submod_stack, submod_tail in order
    pieces: dict[str, torch.fx.GraphModule]


@dataclass
class StackInterface:
    entry_index: int  # position of the residual entry among the stack piece's inputs
    like_entry: list[bool]  # per stack output: shaped like the entry (a residual can be added to it)
    single_output: bool  # the piece returns one value, not a tuple
    notes: list[str] = field(default_factory=list)
    # output index -> input index: state that a skipped call passes through unchanged (passes/plan_reuse.py)
    passed_through: dict = field(default_factory=dict)


def complete_partition(gm: torch.fx.GraphModule, partition: dict[str, str]) -> dict[str, str]:
    """Place nodes added after the partition was taken: each goes to the latest piece among its inputs, which keeps
    the split acyclic; a gather back to natural order goes to its consumer's piece (passes/stack_token_order.py: the
    stack's outputs stay in the order its entry has). The call record goes to the tail, which runs on every call: in
    the stack (where the sparse sites' densities are) a reused call would return the last computed call's record,
    timestep and dense phase included."""
    rank = {p: i for i, p in enumerate(PIECES)}
    complete = dict(partition)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node.name in complete:
            continue
        if node.meta.get(CALL_RECORD):
            complete[node.name] = "tail"
            continue
        if node.meta.get(PIECE_OF) in complete:  # a gather back to natural order joins its consumer
            complete[node.name] = complete[node.meta[PIECE_OF]]
            continue
        inputs = [complete.get(a.name, "head") for a in node.all_input_nodes if a.op != "placeholder"]
        complete[node.name] = max(inputs, key=rank.__getitem__, default="head")
    return complete


def weight_placeholders(gm: torch.fx.GraphModule) -> set[str]:
    """Placeholders Dynamo lifted from module state (parameters and buffers), by their Dynamo source."""
    names = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node, "_dynamo_source", None)
        name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", "")
        if "._parameters[" in str(name) or "._buffers[" in str(name):
            names.add(node.name)
    return names


def sink_weight_only_nodes(gm: torch.fx.GraphModule, partition: dict[str, str], weights: set[str]) -> dict[str, str]:
    """Move into the stack the head nodes computed from weights and sizes alone (RoPE tables, position ids) whose
    every user is in the stack. The whole graph fuses them into their consumers; passed between pieces as inputs
    they change Inductor's fusion there (on an H100 the small Wan model's q/k norm + RoPE became one kernel 20x
    slower: GPU time per forward 3.97 ms with the cache against Inductor's 2.41; 2.47 ms after this move). They are
    cheap, and the stack's result still depends on its inputs alone, which the cache relies on."""
    weight_only = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val", node.meta.get("example_value"))
        if node.op == "placeholder":
            weight_only[node.name] = node.name in weights or isinstance(value, (int, torch.SymInt))
        elif node.op == "get_attr" or isinstance(value, (int, torch.SymInt)):
            weight_only[node.name] = True
        elif node.op != "output":
            weight_only[node.name] = all(weight_only[a.name] for a in node.all_input_nodes)
    moved = dict(partition)
    for node in reversed(gm.graph.nodes):
        if (node.op in ("call_function", "call_method") and weight_only[node.name]
                and moved.get(node.name) == "head" and node.users
                and all(moved.get(user.name) == "stack" for user in node.users)):
            moved[node.name] = "stack"
    return moved


def order_by_piece(gm: torch.fx.GraphModule, partition: dict[str, str]) -> dict[str, str]:
    """Reorder `gm` in place piece by piece (head, stack, tail; graph order within a piece) and return the partition
    with the rebuilt global-state nodes added.

    The parent runs the pieces in that order, but split_module emits them in the order each piece first appears in
    the graph and accepts autocast or grad-mode nodes only in a graph whose order visits the pieces in order, while
    Dynamo places nodes where the source computes them: Mochi's and Helios' output modulation (head: it reads only
    the timestep embedding) comes after the blocks, so a RoPE autocast region wholly inside the head failed the
    split. Moving nodes changes which regions enclose them, so the autocast enter / exit and set_grad_enabled nodes
    are rebuilt from each node's state: a region that several pieces need is closed at the end of one and opened
    again, with the same arguments, in the next. The partition is acyclic (patterns.partition checks every dataflow
    edge), so the order stays topological.
    """
    state_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in GLOBAL_STATE]
    # Dynamo guards the grad mode, so the mode the graph is compiled under is the mode it runs under.
    ambient_grad = torch.is_grad_enabled()
    regions: list[torch.fx.Node] = []  # open autocast enters, outermost first
    grad = ambient_grad
    state = {}  # node -> (autocast enters enclosing it, grad mode)
    for node in gm.graph.nodes:
        if node.target is torch.amp._enter_autocast:
            regions.append(node)
        elif node.target is torch.amp._exit_autocast:
            regions.remove(node.args[0])
        elif node.target is torch._C._set_grad_enabled:
            grad = node.args[0]
        elif node.op not in ("placeholder", "output"):
            state[node] = (tuple(regions), grad)
    for node in reversed(state_nodes):
        gm.graph.erase_node(node)

    rank = {p: i for i, p in enumerate(PIECES)}
    ordered = sorted(state, key=lambda n: -1 if n.op == "get_attr" else rank[partition[n.name]])  # stable
    partition = dict(partition)
    output = gm.graph.output_node()
    piece, opened, mode = None, [], ambient_grad  # opened: (original enter, its copy here), outermost first

    def emit(target, args, like=None):
        with gm.graph.inserting_before(output):
            node = gm.graph.call_function(target, args)
        node.meta = dict(like.meta) if like is not None else {}
        partition[node.name] = piece
        return node

    def move_to(target_regions, target_grad):
        nonlocal mode
        keep = 0
        while keep < min(len(opened), len(target_regions)) and opened[keep][0] is target_regions[keep]:
            keep += 1
        while len(opened) > keep:
            emit(torch.amp._exit_autocast, (opened.pop()[1],))
        for enter in target_regions[keep:]:
            opened.append((enter, emit(torch.amp._enter_autocast, enter.args, enter)))
        if mode != target_grad:
            mode = target_grad
            emit(torch._C._set_grad_enabled, (target_grad,))

    for node in ordered:  # each moves to the end, just before the output
        if node.op != "get_attr":
            if partition[node.name] != piece:
                move_to((), ambient_grad)  # the previous piece closes what it opened
                piece = partition[node.name]
            move_to(*state[node])
        output.prepend(node)
    move_to((), ambient_grad)
    gm.graph.lint()
    gm.recompile()
    return partition


def split_block_stack(gm: torch.fx.GraphModule, partition: dict[str, str]) -> SplitGraph:
    """Split `gm` by `partition` (node name -> "head" | "stack" | "tail"), completed for nodes it omits; head nodes
    computed from weights alone that only the stack uses move into it (`sink_weight_only_nodes`), and `gm` is
    reordered piece by piece (`order_by_piece`)."""
    bad = {p for p in partition.values() if p not in PIECES}
    if bad:
        raise ValueError(f"partition names unknown pieces {sorted(bad)}; allowed: {PIECES}")
    if "stack" not in partition.values():
        raise ValueError("partition has no 'stack' node: nothing to split")
    partition = sink_weight_only_nodes(gm, complete_partition(gm, partition), weight_placeholders(gm))
    partition = order_by_piece(gm, partition)
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


def piece_example_inputs(parent: torch.fx.GraphModule, example_inputs: list) -> dict[str, list]:
    """Fake example values for each piece, propagated through the parent graph.

    Uses the fake mode Dynamo gives the backend (not the one of the captured nodes' example values) and keeps each
    input's symbolic sizes, as Dynamo's DDP optimizer does when it compiles split pieces.
    """
    from torch._dispatch.python import enable_python_dispatcher
    from torch._dynamo.utils import to_fake_tensor
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class Propagate(FakeTensorProp):
        def get_attr(self, target, args, kwargs):  # our constant buffers (e.g. window permutations) are real
            return fake_mode.from_tensor(super().get_attr(target, args, kwargs), static_shapes=True)

        def run_node(self, node):
            # A piece may make data-dependent sizes (Mochi's valid prompt tokens) that it uses inside only: they
            # are bound in the piece's own graph, not in the parent's.
            if node.op == "call_module" and fake_mode.shape_env is not None:
                with fake_mode.shape_env.ignore_fresh_unbacked_symbols():
                    return super().run_node(node)
            return super().run_node(node)

    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    fake_args = [to_fake_tensor(x, fake_mode) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    with enable_python_dispatcher():  # as Dynamo traces: ops on data-dependent sizes need the Python kernels
        Propagate(parent, fake_mode).propagate_dont_convert_inputs(*fake_args)
    return {node.target.removeprefix("submod_"): [a.meta["val"] for a in node.args]
            for node in parent.graph.nodes if node.op == "call_module"}


def stack_interface(stack: torch.fx.GraphModule, entry: str, stack_inputs: list) -> StackInterface:
    """Where the residual `entry` (a node name of the original graph) enters the stack piece, and which outputs
    are shaped like it. Read before compiling: Inductor rewrites a single output into a tuple."""
    names = [n.name for n in stack.graph.nodes if n.op == "placeholder"]
    if entry not in names:
        raise RuntimeError(f"stack entry {entry} is not an input of the stack piece ({names[:8]}...)")
    entry_index = names.index(entry)
    entry_shape = stack_inputs[entry_index].shape
    outputs = next(n for n in stack.graph.nodes if n.op == "output").args[0]
    single_output = not isinstance(outputs, (tuple, list))
    outputs = [outputs] if single_output else list(outputs)
    shapes = [getattr(o.meta.get("val", o.meta.get("example_value")), "shape", None) for o in outputs]
    like_entry = [shape is not None and _provably_equal(shape, entry_shape) for shape in shapes]
    # Sizes the tail needs (data-dependent ones bound in the stack) are reused as they are, without a note.
    notes = [f"cache: stack output {o.name} {_shape_text(shape)} is not provably shaped like the entry {entry} "
             f"{_shape_text(entry_shape)}: a skipped step reuses it as last computed"
             for o, shape, like in zip(outputs, shapes, like_entry)
             if shape is not None and not like and not o.meta.get(EXTRA_OUTPUT)]
    passed_through = {i: names.index(o.meta[STATE_INPUT]) for i, o in enumerate(outputs) if STATE_INPUT in o.meta}
    return StackInterface(entry_index, like_entry, single_output, notes, passed_through)


def _provably_equal(shape, other) -> bool:
    """Equal in every dim for every value of the sizes: a data-dependent size (FramePack's tokens after the prompt
    cut to its mask's length) that the shape environment cannot relate to the entry's counts as different."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return len(shape) == len(other) and all(statically_known_true(a == b) for a, b in zip(shape, other))


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
