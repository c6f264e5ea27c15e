"""Move a head-shared constant token permutation out of a sparse-attention site, to where Inductor fuses it.

Pattern: a `sparse_attention` call (passes/sparse_attention.py) whose planner's order is one constant [S] order for
every head and call (`constant_order`, passes/planners/: Draft's window order). Inside the site it gathers q, k, v by
`perm` and the output back by `inverse`. In Wan, q = RoPE(rms_norm(linear(x))): the norm reduces over all heads,
so Inductor cannot fuse the gather into the norm's kernel, and every gather is a full extra pass over q, k, v and
the output. Moved out, the gathers become indirect loads of kernels that run anyway (the norm / modulation kernel
that writes x, the residual add).

  pattern (Wan's self-attention)                       replacement
  x ─ to_q ─ rms_norm ─ unflatten ─ RoPE(cos, sin) ─ q   x' = x.index_select(1, perm) ─ to_q ─ rms_norm ─ unflatten
                                                             ─ RoPE(cos.index_select(1, perm), sin...) ─ q
  x ─ to_k ─ ... ─ k,  x ─ to_v ─ ... ─ v                x' ─ to_k ─ ... ─ k,  x' ─ to_v ─ ... ─ v
  sparse_attention(q, k, v): q, k, v gathered by perm,  sparse_attention(q, k, v, permute_inputs=False,
      kernel, output gathered by inverse                    restore_order=False): plan, mask, kernel
  out ─ permute ─ flatten ─ to_out ─ dropout ─ * gate    out ─ the same ops, in window order ─ y
  h + y                                                  h + y.index_select(1, inverse)

Inputs up: the anchor is the value q, k and v all come from as one whole token sequence (the token walk,
patterns/tokens.py, stopping at the projections' input: x). Every value on a path from x to q, k or v (the chains)
must act on each token alone: its token dim is the one dim whose tokens the walk traces back to x's whole sequence in
order, and its op is per token (layout ops, elementwise, norms and reductions over other dims, linear, in-place
writes that leave the token dim whole). Operands that carry the tokens unbroadcast (RoPE tables, position
embeddings) are gathered by `perm` along the dim that lines up with the token dim; those broadcast over tokens
(weights, [B, 1, C] modulation) are left alone. No chain value may be read outside the chains (a read of its dtype or
size only is fine).
Output down: from the attention output, while a value has a single user that acts on each token alone and meets
no operand holding tokens in the original order, that user stays in window order too; at the first user that does
(Wan: the residual add) or that cannot follow (a token reduction, a slice of the tokens, a second user, the graph
output), the value is gathered back by `inverse`.
Where nothing can move the site keeps its replacement exactly; `move_permutations` says per site what moved and why
the rest did not, and the backend appends it to the site's decision. Static layouts only: with symbolic sizes the
order is computed at the site, after the values it would have to reach.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import sympy
import torch
import torch.fx as fx

from dit_compiler.passes.planners import PLANNERS
from dit_compiler.passes.sparse_attention import sparse_attention
from dit_compiler.patterns import token_tracer
from dit_compiler.patterns.graph import (PASSTHROUGH_OPS, RESHAPE_OPS, Sizes, dataflow_dag, metadata_only_inputs,
                                         op_name, tensor_of)
from dit_compiler.patterns.tokens import (ELEMENTWISE_OPS, NORM_OPS, PROJECTION_OPS, REDUCE_OPS, Segment,
                                          TokenTracer, carried_dims, index_mapping, is_full_slice)

# Ops that act on each token alone as long as the token dim stays whole (which the token walk checks).
TOKENWISE_OPS = PASSTHROUGH_OPS | RESHAPE_OPS | ELEMENTWISE_OPS | NORM_OPS | REDUCE_OPS | PROJECTION_OPS | {
    "permute", "transpose", "swapaxes", "expand", "repeat", "repeat_interleave", "view_as_complex", "view_as_real",
    "getitem", "cat", "stack"}
# Ops whose tensor operands all line up with the output on the right (the others read only their first operand's
# tokens; their other tensors are weights).
BROADCASTING_OPS = ELEMENTWISE_OPS | {"cat"}
TUPLE_OPS = {"split", "chunk", "unbind", "split_with_sizes"}
SIZE_READS = {"size", "dim", "sym_size", "sym_size.int", "numel"}


def move_permutations(gm: fx.GraphModule, example_inputs: Optional[Iterable[Any]] = None,
                      timestep: Optional[str] = None) -> dict[str, str]:
    """Move the permutation of every `sparse_attention` call with a constant order, in place. Returns, per call node
    name, what moved and why the rest did not."""
    examples = list(example_inputs) if example_inputs is not None else None
    notes = {}
    for call in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is sparse_attention]:
        if not PLANNERS[call.kwargs["planner"]].constant_order:
            notes[call.name] = f"permutation: kept in the site ({call.kwargs['planner']} orders each call and head)"
            continue
        constants = call.args[5]
        if not isinstance(constants, dict):
            notes[call.name] = "permutation: kept in the site (symbolic layout: the order is computed there)"
            continue
        inputs = _move_inputs(gm, call, constants["perm"], token_tracer(gm, examples, timestep,
                                                                        stop_at_projections=True))
        output = _move_output(gm, call, constants["inverse"], token_tracer(gm, examples, timestep,
                                                                           stop_at_projections=False))
        notes[call.name] = f"permutation: {inputs}; {output}"
    gm.graph.lint()
    gm.recompile()
    return notes


def _whole(node: fx.Node, dim: int) -> tuple[Segment, ...]:
    return (Segment(node, (dim,), sympy.Integer(0), Sizes.shape(node)[dim]),)


def _token_dim(tracer: TokenTracer, node: fx.Node, anchor: tuple[Segment, ...]) -> Optional[int]:
    """The one dim of `node` holding the anchor's whole token sequence in order, else None."""
    value = tensor_of(node)
    if value is None:
        return None
    found = [d for d in range(value.dim()) if Sizes.equal(Sizes.shape(node)[d], anchor[0].length)
             and tracer.same(tracer.trace(node, (d,)), anchor)]
    return found[0] if len(found) == 1 else None


def _describe(node: fx.Node) -> str:
    return f"{node.name} ({op_name(node) or node.op})"


def _reads_metadata_only(user: fx.Node, value: fx.Node) -> bool:
    return value in metadata_only_inputs(user) or op_name(user) in SIZE_READS


def _value_operands(node: fx.Node) -> list[fx.Node]:
    """The operands whose tokens the op combines (all tensors of a broadcasting op, else the first)."""
    metadata = metadata_only_inputs(node)
    if op_name(node) in BROADCASTING_OPS | {"stack"}:
        return [a for a in node.all_input_nodes if a not in metadata]
    first = node.args[0] if node.args else None
    return [first] if isinstance(first, fx.Node) else []


def _gather(gm: fx.GraphModule, value: fx.Node, dim: int, index: fx.Node, before: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(before):
        index = gm.graph.get_attr(index.target)
        gathered = gm.graph.call_function(torch.index_select, (value, dim, index))
    gathered.meta = {key: item for key, item in value.meta.items() if key in ("example_value", "val", "stack_trace")}
    return gathered


# --- inputs up ----------------------------------------------------------------------------------------------------
def _move_inputs(gm: fx.GraphModule, call: fx.Node, perm: fx.Node, tracer: TokenTracer) -> str:
    q, k, v = call.args[:3]
    traced = [tracer.trace(t, (2,)) for t in (q, k, v)]
    (segment, *rest) = traced[0]
    if rest or segment.selected_by is not None or len(segment.dims) != 1 or not tracer.same(
            traced[0], _whole(segment.origin, segment.dims[0])) or not all(tracer.same(traced[0], t)
                                                                          for t in traced[1:]):
        origins = ", ".join(f"{s.origin.name}[{s.start}:{s.stop}]" for s in traced[0])
        return f"q, k, v gathered in the site (they are not one whole token sequence of one value: {origins})"
    anchor = traced[0]
    x = segment.origin
    chain = _chain(gm, x, (q, k, v))
    dims: dict[fx.Node, int] = {x: segment.dims[0]}
    carried: list[tuple[fx.Node, fx.Node, int]] = []  # (chain node, operand carrying tokens, its token dim)
    for node in chain:
        why = _why_not_up(node, chain, call, dims, carried, tracer, anchor)
        if why is not None:
            return f"q, k, v gathered in the site ({why})"
    first = min(chain, key=list(gm.graph.nodes).index)
    moved_x = _gather(gm, x, dims[x], perm, first)
    for node in chain:
        node.replace_input_with(x, moved_x)
    gathered: dict[tuple[fx.Node, int], fx.Node] = {}
    for node, operand, dim in carried:
        if (operand, dim) not in gathered:
            gathered[(operand, dim)] = _gather(gm, operand, dim, perm, node)
        node.replace_input_with(operand, gathered[(operand, dim)])
    call.kwargs = {**call.kwargs, "permute_inputs": False}
    tables = f", token operands gathered too: {', '.join(sorted({o.name for _, o, _ in carried}))}" if carried else ""
    return f"q, k, v inputs gathered once at {x.name}, the projections' input{tables}"


def _chain(gm: fx.GraphModule, x: fx.Node, ends: Iterable[fx.Node]) -> list[fx.Node]:
    """Nodes on a dataflow path from x to any of `ends` (in-place writes included), ends included, x not; graph
    order."""
    import networkx as nx

    dag = dataflow_dag(gm, tensors_only=True)
    below = nx.descendants(dag, x.name)
    above = set().union(*(nx.ancestors(dag, e.name) | {e.name} for e in ends))
    names = below & above
    return [n for n in gm.graph.nodes if n.name in names]


def _why_not_up(node, chain, call, dims, carried, tracer, anchor) -> Optional[str]:
    members = set(chain)
    outside = [u for u in node.users if u not in members and u is not call and not _reads_metadata_only(u, node)]
    if outside:
        return f"{node.name} is also read by {_describe(outside[0])} outside the q/k/v chains"
    name = op_name(node)
    if name == "setitem":
        return _why_not_setitem(node, members, dims, carried)
    if name in TUPLE_OPS:
        return None  # its pieces (getitem) are checked: one that cuts the tokens does not keep them whole
    if name not in TOKENWISE_OPS:
        return f"{_describe(node)} does not act on each token alone"
    if name == "stack" and any(a not in members and a not in dims for a in node.all_input_nodes):
        return f"{_describe(node)} stacks a value that is not on the q/k/v chains"
    dim = _token_dim(tracer, node, anchor)
    if dim is None:
        return f"{_describe(node)} does not keep the tokens of {anchor[0].origin.name} whole along one dim"
    dims[node] = dim
    out_shape = Sizes.shape(node)
    for operand in _value_operands(node):
        if operand in members or operand in dims:
            continue  # its own token dim was checked; the walk proved they line up
        mapped = carried_dims(operand, out_shape, (dim,)) if name in BROADCASTING_OPS else None
        if mapped is not None:
            carried.append((node, operand, mapped[0]))
    return None


def _why_not_setitem(node, members, dims, carried) -> Optional[str]:
    """`target[index] = value` into a chain buffer (Wan's RoPE): the index must leave the token dim whole."""
    target, index, value = node.args
    if target not in dims:
        return f"{_describe(node)} writes into {target.name}, which is not on the q/k/v chains"
    ndim = tensor_of(target).dim()
    mapping = index_mapping(index, ndim)
    token = dims[target]
    if mapping is None or token not in mapping[0] or not is_full_slice(mapping[1].get(token, slice(None))):
        return f"{_describe(node)} writes part of the tokens of {target.name}"
    position = mapping[0].index(token)  # the token dim in target[index]
    if isinstance(value, fx.Node) and tensor_of(value) is not None:
        offset = len(mapping[0]) - tensor_of(value).dim()
        if value in members:
            if dims.get(value) != position - offset:
                return f"{_describe(node)} writes {value.name} with its tokens along another dim"
        elif position - offset >= 0 and Sizes.equal(Sizes.shape(value)[position - offset],
                                                    Sizes.shape(target)[token]):
            carried.append((node, value, position - offset))
    return None


# --- output down --------------------------------------------------------------------------------------------------
def _move_output(gm: fx.GraphModule, call: fx.Node, inverse: fx.Node, tracer: TokenTracer) -> str:
    out = next((u for u in call.users if op_name(u) == "getitem" and u.args[1] == 0), None)
    if out is None:
        return "output unused"
    anchor = _whole(out, 2)
    moved, value, dim = [], out, 2
    while True:
        users = [u for u in value.users if not _reads_metadata_only(u, value)]
        if len(users) != 1:
            stop = f"{value.name} has {len(users)} users"
            break
        user = users[0]
        stop, user_dim = _why_not_down(user, value, dim, tracer, anchor)
        if stop is not None:
            break
        moved.append(user)
        value, dim = user, user_dim
    if not moved:
        return f"output restored in the site ({stop})"
    restored = _gather(gm, value, dim, inverse, value.next)
    value.replace_all_uses_with(restored, delete_user_cb=lambda user: user is not restored and not
                                _reads_metadata_only(user, value))
    call.kwargs = {**call.kwargs, "restore_order": False}
    return f"output kept in window order through {len(moved)} ops and restored at {value.name} ({stop})"


def _why_not_down(user: fx.Node, value: fx.Node, dim: int, tracer: TokenTracer, anchor) -> tuple[Optional[str], int]:
    name = op_name(user)
    if user.op == "output":
        return f"{value.name} is a graph output", -1
    if name not in TOKENWISE_OPS or name == "stack":
        return f"{_describe(user)} does not act on each token alone", -1
    if name in BROADCASTING_OPS and tensor_of(user) is not None:
        out_shape = Sizes.shape(user)
        aligned = dim + len(out_shape) - tensor_of(value).dim()
        for operand in _value_operands(user):
            if operand is not value and carried_dims(operand, out_shape, (aligned,)) is not None:
                return f"{_describe(user)} meets {operand.name} in the original token order", -1
    user_dim = _token_dim(tracer, user, anchor)
    if user_dim is None:
        return f"{_describe(user)} does not keep the tokens whole along one dim", -1
    return None, user_dim
