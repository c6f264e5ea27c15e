"""Run the block stack in the planner's token order: one gather where the residual stream enters, none per site.

Pattern: a rewritten graph whose sparse sites use a planner with one fixed token order (`fixed_order`: Draft's
window order), reached from the first block stack's residual entry through ops that keep every token in its own
row. Each such site gathers q, k and v into that order and gathers its output back (four full copies a layer, about
0.2 ms a layer on Wan-1.3B 480p), although every op between two sites (norms, modulation, linear layers, RoPE, the
FFN, cross-attention to the prompt, the residual adds) treats tokens one row at a time.
Replacement: the entry is gathered once (`gather_rows`: written out, not fused into its readers); every value
derived from it through such ops is then in that order; other token-indexed operands they meet (RoPE tables,
per-token modulation) are gathered once at their root; the sites skip their own permutations
(`sparse_attention(..., in_plan_order=True)`), and a value leaving the region (the output, an op with no rule below)
is gathered back right before its consumer.

Soundness rests on per-op rules, each a statement that op(x[P]) == op(x)[P] along a tracked dim:
elementwise ops with their operands broadcast or permuted alike; dtype / layout ops; reshapes that keep the token
dim whole; permutes; linear layers and norms over other dims; reductions over other dims; basic indexing, split,
chunk, unbind, cat and stack along other dims; SDPA with permuted queries and keys / values that are both permuted
or both not (attention is invariant to the order of the key-value pairs), no mask over query rows, not causal; and
the sparse sites whose order is the hoisted one. Any other consumer gets the natural order back. In-place writes are
allowed only as `setitem` into a permuted buffer that is filled before it is read (Wan's RoPE); any other mutation
after the entry, or a write that indexes the token dim, leaves the graph as it was.

The pass is taken only where it pays: the boundary gathers (entry, roots, exits) move fewer bytes than the sites'
own permutations would. With the block stack split for the cache the stack's exits must stay in the order its
entry has (the cache adds a residual of the two), and gathers back go to their consumer's piece.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from dit_compiler.passes.planners import PLANNERS
from dit_compiler.passes.sparse_attention import sparse_attention
from dit_compiler.patterns.graph import PASSTHROUGH_OPS, RESHAPE_OPS, Sizes, arg, op_name, tensor_of
from dit_compiler.patterns.tokens import ELEMENTWISE_OPS, TraceFailure, _permutation, reshape_groups
from dit_compiler.patterns.types import GraphAnalysis

PIECE_OF = "vsparse_piece_of"  # node meta: the node (name) whose piece a gather back joins when the stack is split
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul}
_SIZE_READS = {"size", "dim", "numel"}
_LIKE_OPS = {"empty_like", "zeros_like", "ones_like", "full_like"}
_REDUCE_OPS = {"mean", "sum", "amax", "amin", "var", "std", "softmax", "log_softmax"}
_SPLIT_OPS = {"split", "chunk", "unbind"}
_SDPA = "scaled_dot_product_attention"


class _Decline(Exception):
    """The pass does not apply; the message says why (it goes into the report)."""


@dataclass
class TokenOrderResult:
    note: str
    entry: Optional[str] = None  # the stack piece's residual entry after the pass (the gathered value); None: declined


def hoist_token_order(gm: fx.GraphModule, analysis: GraphAnalysis,
                      partition: Optional[dict[str, str]] = None) -> TokenOrderResult:
    """Apply the pass to `gm` in place where it is sound and pays; otherwise leave `gm` untouched and say why.
    `partition` (node name -> head / stack / tail) when the block stack is split for the cache."""
    try:
        plan = _Planner(gm, analysis, partition).run()
    except _Decline as why:
        return TokenOrderResult(f"token order per site: {why}")
    plan.apply()
    gm.graph.lint()
    gm.recompile()
    return TokenOrderResult(plan.describe(), plan.new_entry.name)


def _site_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is sparse_attention]


def _order_buffers(call: fx.Node) -> Optional[tuple[str, str]]:
    """(perm, inverse) buffer names of a sparse site whose planner has one fixed order and a static layout."""
    if not PLANNERS[call.kwargs["planner"]].fixed_order:
        return None
    constants = call.args[5]
    if not isinstance(constants, dict) or not all(
            isinstance(constants.get(k), fx.Node) and constants[k].op == "get_attr" for k in ("perm", "inverse")):
        return None  # symbolic layout: the order is computed per call
    return constants["perm"].target, constants["inverse"].target


def _is_mutating(node: fx.Node) -> bool:
    name = op_name(node) or ""
    return (node.target is operator.setitem or node.target in _INPLACE_OPERATORS
            or (name.endswith("_") and not name.endswith("__"))
            or "out" in node.kwargs or node.kwargs.get("inplace") is True)


def gather_rows(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x reordered along `dim` by `index`, written out once (`permute_tokens`, an opaque gather): as `index_select`
    Inductor fused the entry's and the RoPE tables' gathers into every consumer, which then read them at gathered
    rows (the entry's LayerNorm +355 µs, each layer's RoPE kernel +53 µs on the H200, Wan-1.3B 480p)."""
    shape = x.shape
    rows = x.contiguous().view(math.prod(shape[:dim]), 1, shape[dim], math.prod(shape[dim + 1:]))
    return torch.ops.vsparse.permute_tokens(rows, index).view(shape)


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _writes_to(node: fx.Node) -> Optional[fx.Node]:
    """The tensor a mutating op writes (its first operand)."""
    return node.args[0] if _is_mutating(node) and node.args and isinstance(node.args[0], fx.Node) else None


def _index_items(index, ndim: int) -> Optional[list]:
    """Basic indexing (ints, slices, None, Ellipsis) spelled out over every dim, or None."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (ndim - consumed)
    return items + [slice(None)] * (ndim - sum(1 for i in items if i is not None))

def _indexed_dim(index, ndim: int, d: int) -> Optional[int]:
    """Where dim d of x lands in x[index], when the index takes all of it."""
    items = _index_items(index, ndim)
    if items is None:
        return None
    in_dim = out_dim = 0
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if in_dim == d:
            return out_dim if item == slice(None) else None
        in_dim += 1
        out_dim += not isinstance(item, int)
    return None


class _Planner:
    """Phase 1 (`run`) decides every edit without touching the graph, so a decline leaves it as it was; `apply`
    makes them."""

    def __init__(self, gm: fx.GraphModule, analysis: GraphAnalysis, partition: Optional[dict[str, str]]):
        self.gm, self.analysis, self.partition = gm, analysis, partition
        self.sizes = Sizes(gm)
        self.layout: dict[fx.Node, object] = {}  # values in the stack's order: their token dim, {item: dim} (tuples)
        # consumer -> {input: the dim along which it must be in the stack's order, or None: in natural order}
        self.wanted: dict[fx.Node, dict[fx.Node, Optional[int]]] = {}
        self.sites: list[fx.Node] = []
        self.written: set[fx.Node] = set()  # setitem targets in the stack's order

    # --- phase 1 --------------------------------------------------------------------------------------------------
    def run(self) -> "_Planner":
        calls = _site_calls(self.gm)
        orders = {_order_buffers(c) for c in calls} - {None}
        if not orders:
            raise _Decline("no sparse site whose planner keeps one fixed order (Draft's windows) at a static layout")
        if len(orders) > 1:
            raise _Decline("sites use different orders (several layouts)")
        self.perm_name, self.inverse_name = orders.pop()
        if not self.analysis.stacks:
            raise _Decline("no block stack recognized")
        nodes = {n.name: n for n in self.gm.graph.nodes}
        self.entry = nodes[self.analysis.stacks[0].entry[0]]
        self.seq_len = getattr(self.gm, self.perm_name).shape[0]
        shape = list(tensor_of(self.entry).shape)
        token_dims = [d for d, s in enumerate(shape) if self._tokens(s)]
        if len(token_dims) != 1:
            raise _Decline(f"the stack entry {self.entry.name} {shape} has no single dim of the sites' "
                           f"{self.seq_len} tokens (text joins the sequence inside the blocks)")
        self.layout[self.entry] = token_dims[0]
        after_entry = False
        for node in self.gm.graph.nodes:
            if after_entry and node.op in ("call_function", "call_method", "output"):
                self._visit(node)
            after_entry = after_entry or node is self.entry
        if not self.sites:
            raise _Decline("no sparse site is reached from the stack entry through row-wise ops")
        self._check_writes()
        self._check_stack_outputs()
        self.roots = {}
        for node, wanted in self.wanted.items():
            for x, dim in wanted.items():
                if dim is not None and x not in self.layout:
                    self.roots[self._root(x, dim)] = None
        exits = {(x, self._piece(node)) for node, wanted in self.wanted.items() for x, dim in wanted.items()
                 if dim is None and x in self.layout and x is not self.entry}
        gathered = [self.entry, *(root for root, _ in self.roots), *(x for x, _ in exits)]
        self.boundary = len(gathered)
        self.boundary_bytes = sum(self._nbytes(x) for x in gathered)
        # What the sites stop moving: each gathered q, k and v and gathered its output back.
        self.saved_bytes = sum(4 * self._nbytes(site.args[0]) for site in self.sites)
        if self.boundary_bytes >= self.saved_bytes:
            raise _Decline(f"{self.boundary} boundary gathers move {self.boundary_bytes} bytes, the {len(self.sites)} "
                           f"sites' own permutations {self.saved_bytes}: does not pay")
        return self

    def _visit(self, node: fx.Node) -> None:
        permuted = [x for x in node.all_input_nodes if x in self.layout]
        if not permuted:
            if _is_mutating(node):
                raise _Decline(f"in-place op {node.name} ({op_name(node)}) after the stack entry")
            return
        result = None
        if node.op != "output":
            try:
                result = self._rule(node)
            except TraceFailure:
                result = None
        if result is not None:
            out, wanted = result
            if all(self.layout.get(x, dim) == dim for x, dim in wanted.items() if x in self.layout):
                self.wanted[node] = wanted
                if out is not None:
                    self.layout[node] = out
                return
        if _is_mutating(node):
            raise _Decline(f"in-place op {node.name} ({op_name(node)}) on a value in the stack's order")
        if any(isinstance(self.layout[x], dict) for x in permuted):
            raise _Decline(f"{node.name} ({op_name(node)}) takes a tuple of values in the stack's order whole")
        self.wanted[node] = {x: None for x in permuted}  # it reads them in natural order

    def _rule(self, node: fx.Node):
        """(layout of the result or None, {tensor input: dim it must be permuted along, or None for natural})."""
        if node.target is sparse_attention:
            return self._site(node)
        if node.target is operator.setitem:
            return self._setitem(node)
        name = op_name(node)
        if name == _SDPA:  # Dynamo passes its operands by keyword
            return self._attention(node)
        if name in ("cat", "stack"):
            return self._join(node, name)
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return None
        if isinstance(self.layout.get(source), dict):  # an item of a split or of a site's result
            return (self.layout[source].get(node.args[1]), {}) if node.target is operator.getitem else None
        if name in ELEMENTWISE_OPS or name in _LIKE_OPS:
            return self._broadcast(node)
        d = self.layout.get(source)
        if d is None:  # the value in the stack's order is not the op's main operand
            # type_as / to read only dtype and device of their other operand
            return (None, {}) if name in PASSTHROUGH_OPS else None
        ndim = tensor_of(source).dim()
        if name in _SIZE_READS:
            return None, {}
        if name in PASSTHROUGH_OPS:
            return d, {source: d}
        if name in RESHAPE_OPS or name == "expand":
            return self._reshape(node, source, d)
        if name in ("permute", "transpose", "swapaxes"):
            return _permutation(node, ndim).index(d), {source: d}
        if name == "linear":
            return (d, {source: d}) if d != ndim - 1 and not self._any_permuted(node, skip=source) else None
        if name in ("layer_norm", "rms_norm"):
            shape = arg(node, 1, "normalized_shape")
            count = 1 if isinstance(shape, int) else len(shape)
            return (d, {source: d}) if d < ndim - count and not self._any_permuted(node, skip=source) else None
        if name in _REDUCE_OPS:
            return self._reduce(node, source, d, ndim)
        if name in _SPLIT_OPS:
            along = arg(node, 1 if name == "unbind" else 2, "dim", 0) % ndim
            items = node.meta.get("example_value")
            if along == d or not isinstance(items, (list, tuple)):
                return None
            return {i: d - 1 if name == "unbind" and along < d else d for i in range(len(items))}, {source: d}
        if node.target is operator.getitem:
            out = _indexed_dim(node.args[1], ndim, d)
            return None if out is None else (out, {source: d})
        return None

    def _nbytes(self, node: fx.Node) -> int:
        """Bytes of a value at its example sizes (hints: comparing symbolic sizes would add guards)."""
        value = tensor_of(node)
        return math.prod(self.sizes.hint(Sizes.expr(d)) for d in value.shape) * value.element_size()

    def _tokens(self, size) -> bool:
        """A dim of the sites' token count. Symbolic sizes are never it (the layout is static here), and are not
        compared: a comparison would add a guard to the captured graph."""
        return isinstance(size, int) and size == self.seq_len

    def _any_permuted(self, node: fx.Node, skip: fx.Node) -> bool:
        return any(x in self.layout for x in node.all_input_nodes if x is not skip)

    def _broadcast(self, node: fx.Node):
        """Elementwise: operands broadcast along the token dim stay, the others must all be in the stack's order."""
        if tensor_of(node) is None or any(x in self.layout and tensor_of(x) is None for x in node.all_input_nodes):
            return None
        rank = tensor_of(node).dim()
        if op_name(node) in _LIKE_OPS:  # only the shape (and dtype) of the first operand counts
            source = node.args[0]
            return (self.layout[source] + rank - tensor_of(source).dim(), {source: self.layout[source]}) \
                if source in self.layout else None
        dims = {self.layout[x] + rank - tensor_of(x).dim() for x in node.all_input_nodes if x in self.layout}
        if len(dims) != 1:
            return None
        out = dims.pop()
        wanted = {}
        for x in node.all_input_nodes:
            value = tensor_of(x)
            if value is None:
                continue
            at = out - (rank - value.dim())
            wanted[x] = at if at >= 0 and not _is_one(value.shape[at]) else None
            if wanted[x] is not None and not self._tokens(value.shape[at]):
                return None
        return out, wanted

    def _join(self, node: fx.Node, name: str):
        """cat / stack along another dim than the tokens: every operand in the stack's order along the same dim."""
        tensors = arg(node, 0, "tensors")
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            return None
        dims = {self.layout[t] for t in tensors if t in self.layout}
        if len(dims) != 1 or any(isinstance(d, dict) for d in dims):
            return None
        d = dims.pop()
        ndim = tensor_of(tensors[0]).dim()
        along = arg(node, 1, "dim", 0) % (ndim + (name == "stack"))
        if name == "cat" and along == d:
            return None
        if any(t not in self.layout and not self._tokens(tensor_of(t).shape[d]) for t in tensors):
            return None
        return (d + (name == "stack" and along <= d)), {t: d for t in tensors}

    def _reshape(self, node: fx.Node, source: fx.Node, d: int):
        if op_name(node) == "view" and any(isinstance(a, torch.dtype) for a in node.args[1:]):
            return None
        a, b = Sizes.shape(source), Sizes.shape(node)
        if op_name(node) == "expand":
            out = d + len(b) - len(a)
            return (out, {source: d}) if Sizes.equal(a[d], b[out]) else None
        for in_dims, out_dims in reshape_groups(self.sizes, a, b):
            if d in in_dims:
                return (out_dims[0], {source: d}) if in_dims == [d] and len(out_dims) == 1 else None
        return None

    def _reduce(self, node: fx.Node, source: fx.Node, d: int, ndim: int):
        dims = arg(node, 1, "dim")
        if dims is None:
            return None
        dims = [x % ndim for x in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if d in dims:
            return None
        keep = op_name(node) in ("softmax", "log_softmax") or arg(node, 2, "keepdim", False)
        return (d if keep else d - sum(x < d for x in dims)), {source: d}

    def _setitem(self, node: fx.Node):
        target, index, value = node.args
        if target is self.entry:
            raise _Decline(f"{node.name} writes into the stack entry")
        if target not in self.layout:
            raise _Decline(f"{node.name} writes a value in the stack's order into a buffer in natural order")
        d = self.layout[target]
        ndim = tensor_of(target).dim()
        view_dim = _indexed_dim(index, ndim, d)
        if view_dim is None:
            raise _Decline(f"{node.name} writes into a value in the stack's order at indexed tokens")
        self.written.add(target)
        if not isinstance(value, fx.Node) or tensor_of(value) is None:
            return None, {target: d}
        items = _index_items(index, ndim)
        view_rank = sum(1 for i in items if not isinstance(i, int))
        at = view_dim - (view_rank - tensor_of(value).dim())
        wanted = at if at >= 0 and not _is_one(tensor_of(value).shape[at]) else None
        if value in self.layout and self.layout[value] != wanted:
            raise _Decline(f"{node.name} writes a value in another order")
        return None, {target: d, value: wanted}

    def _attention(self, node: fx.Node):
        """SDPA: queries in the stack's order give rows in it; keys and values both in it or both not."""
        q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        mask = arg(node, 3, "attn_mask")
        if arg(node, 5, "is_causal", False) or any(not isinstance(x, fx.Node) for x in (q, k, v)):
            return None
        rows = tensor_of(q).dim() - 2
        if self.layout.get(q) != rows:
            return None
        kv = [self.layout.get(x) == tensor_of(x).dim() - 2 for x in (k, v)]
        if kv[0] != kv[1] or any(x in self.layout and not ok for x, ok in zip((k, v), kv)):
            return None
        if isinstance(mask, fx.Node) and (kv[0] or mask in self.layout or not _is_one(tensor_of(mask).shape[-2])):
            return None  # a mask over keys in natural order, broadcast over query rows, is all we keep
        return rows, {q: rows, k: rows if kv[0] else None, v: rows if kv[0] else None}

    def _site(self, node: fx.Node):
        q, k, v = node.args[:3]
        if _order_buffers(node) != (self.perm_name, self.inverse_name) or \
                any(self.layout.get(x) != 2 for x in (q, k, v)):
            return None
        self.sites.append(node)
        return {0: 2}, {q: 2, k: 2, v: 2}

    def _check_writes(self) -> None:
        """A buffer in the stack's order written in place is read only after its last write, so one gather of it
        serves every reader."""
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        for target in self.written:
            writes = [u for u in target.users if _writes_to(u) is target]
            reads = [u for u in target.users if u not in writes]
            if reads and min(order[r] for r in reads) < max(order[w] for w in writes):
                raise _Decline(f"{target.name} is read before its last in-place write")

    def _check_stack_outputs(self) -> None:
        """The cache adds a residual of the stack's outputs shaped like its entry to the entry: both must be in the
        same order."""
        if self.partition is None:
            return
        shape = tensor_of(self.entry).shape
        for node in self.gm.graph.nodes:
            if self.partition.get(node.name) != "stack" or tensor_of(node) is None or tensor_of(node).shape != shape:
                continue
            if any(self.partition.get(u.name, "tail") != "stack" for u in node.users) and \
                    self.layout.get(node) != self.layout[self.entry]:
                raise _Decline(f"stack output {node.name} is shaped like the entry but not in its order (the cache "
                               f"adds their residual)")

    def _piece(self, consumer: fx.Node) -> Optional[str]:
        return None if self.partition is None else self.partition.get(consumer.name)

    def _root(self, x: fx.Node, dim: int) -> tuple[fx.Node, int]:
        """Where a token-indexed operand's gather goes: back through its chain of single-operand row-keeping ops
        (indexing, views, dtype changes), so every block's slice of one RoPE table shares one gather. The root must
        not be written in place (its gather is taken once, right after it or the entry)."""
        parent = self._chain_parent(x, dim)
        if parent is not None:
            return self._root(*parent)
        if any(_writes_to(u) is x for u in x.users):
            raise _Decline(f"{x.name}, token-indexed and read in the stack's order, is written in place")
        return x, dim

    def _chain_parent(self, x: fx.Node, dim: int) -> Optional[tuple[fx.Node, int]]:
        """(operand, dim) when x is a row-keeping op of one tensor operand that maps the operand's `dim` to x's."""
        if x.op not in ("call_function", "call_method") or _is_mutating(x) or len(x.all_input_nodes) != 1:
            return None
        source, name = x.args[0] if x.args else None, op_name(x)
        if not isinstance(source, fx.Node) or tensor_of(source) is None or not (
                name in PASSTHROUGH_OPS or name in RESHAPE_OPS or x.target is operator.getitem
                or name in ("permute", "transpose", "expand")):
            return None
        for d, size in enumerate(tensor_of(source).shape):
            if not self._tokens(size):
                continue
            self.layout[source] = d  # probe the forward rule from this dim
            try:
                result = self._rule(x)
            except TraceFailure:
                result = None
            finally:
                del self.layout[source]
            if result is not None and result[0] == dim:
                return source, d
        return None

    def describe(self) -> str:
        return (f"token order hoisted to the block stack: {len(self.sites)} sparse sites run in the planner's order "
                f"without their own permutations ({self.saved_bytes / 1e6:.1f} MB a call); {self.boundary} boundary "
                f"gathers instead ({self.boundary_bytes / 1e6:.1f} MB: the entry {self.entry.name}, token-indexed "
                f"operands at their roots, values leaving the order)")

    # --- phase 2 --------------------------------------------------------------------------------------------------
    def apply(self) -> None:
        graph = self.gm.graph
        self.new_entry = self._gather(self.entry, self.layout[self.entry], self.perm_name, gather_rows,
                                      after=self.entry)
        inverses: dict = {}
        permuted: dict = {(self.entry, self.layout[self.entry]): self.new_entry}
        self.replayed: list[fx.Node] = []
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node, wanted in list(self.wanted.items()):
            replace = {}
            for x, dim in wanted.items():
                if dim is None and x in self.layout and x is not self.entry:
                    key = (x, self._piece(node))
                    if key not in inverses:
                        inverses[key] = self._gather(x, self.layout[x], self.inverse_name, torch.index_select,
                                                     before=node)
                        inverses[key].meta[PIECE_OF] = node.name
                    replace[x] = inverses[key]
                elif dim is not None and (x is self.entry or x not in self.layout):
                    replace[x] = self._permuted(x, dim, permuted, order)
            if replace:
                node.args = fx.map_arg(node.args, lambda n: replace.get(n, n))
                node.kwargs = fx.map_arg(node.kwargs, lambda n: replace.get(n, n))
        for site in self.sites:
            site.kwargs = {**site.kwargs, "in_plan_order": True}
        for node in reversed(self.replayed):  # the natural-order chains the replays replaced, where now unused
            if not node.users:
                graph.erase_node(node)

    def _permuted(self, x: fx.Node, dim: int, done: dict, order: dict) -> fx.Node:
        """x in the stack's order: its root gathered once (after the root, or after the entry when the root comes
        first), then its chain replayed on that."""
        if (x, dim) not in done:
            parent = self._chain_parent(x, dim)
            if parent is None:
                after = x if order[x] > order[self.entry] else self.new_entry
                done[(x, dim)] = self._gather(x, dim, self.perm_name, gather_rows, after=after)
            else:
                source = self._permuted(*parent, done, order)
                with self.gm.graph.inserting_after(source):
                    done[(x, dim)] = self.gm.graph.node_copy(x, lambda n: source if n is parent[0] else n)
                self.replayed.append(x)
        return done[(x, dim)]

    def _gather(self, x: fx.Node, dim: int, index: str, how, after: Optional[fx.Node] = None,
                before: Optional[fx.Node] = None) -> fx.Node:
        """`how(x, dim, index buffer)`: `gather_rows` where the gathered value has many readers (the entry, roots),
        `index_select`, which Inductor fuses into its one reader, for a value leaving the order."""
        graph = self.gm.graph
        with graph.inserting_after(after) if after is not None else graph.inserting_before(before):
            buffer = graph.get_attr(index)
        with graph.inserting_after(buffer):
            node = graph.call_function(how, (x, dim, buffer))
        node.meta = {k: v for k, v in x.meta.items() if k in ("example_value", "val", "nn_module_stack", "stack_trace")}
        return node
