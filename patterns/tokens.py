"""Token provenance: which tokens of which earlier value sit at each position of a value's sequence.

`TokenTracer.trace(node, dims)` walks the graph backwards from the dims of `node` that index tokens (row-major) and
returns the sequence as an ordered list of `Segment`s, each a contiguous range of the tokens of an *origin*: a value
the walk could not see through (a graph input, a patch-embedding convolution, a reshape that splits a token dim, an
op it does not know), or with `stop_at_projections` the input of the first linear projection met.

The walk passes through ops that keep each token in its own row: layout ops (view, reshape, permute, transpose,
getitem, cat/split along the tokens), elementwise ops, reductions and norms over other dims, repeats along other
dims, linear layers, and attention (whose rows are the query's). Where several operands carry tokens (a residual
add), every operand that depends on a graph input must give the same tokens; operands computed from constants alone
(RoPE tables, position embeddings) are positional and do not count. A value no input reaches is walked through its
positional operands (they must agree), so a RoPE table leads back to the coordinates it was computed from; `aligned`
records, for the input-derived tokens, which positional tokens were combined elementwise with exactly the same
positions (packed video tokens times a RoPE table built from an F x H x W coordinate grid).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from .graph import PASSTHROUGH_OPS, RESHAPE_OPS, Sizes, arg, einsum_spec, op_name, tensor_of

ELEMENTWISE_OPS = {
    "add", "sub", "mul", "truediv", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "relu", "gelu",
    "silu", "mish", "abs", "square", "clamp", "where", "masked_fill", "sin", "cos", "erf",
    # Wan fills an empty_like(q) buffer with RoPE through setitem: the buffer has the tokens of its shape source.
    "empty_like",
}
# Ops that reduce or normalize over the dims given by their arguments; tokens survive when those dims are others.
NORM_OPS = {"layer_norm", "rms_norm"}
REDUCE_OPS = {"mean", "sum", "amax", "softmax", "log_softmax", "var"}
PROJECTION_OPS = {"linear"}
MATMUL_OPS = {"matmul", "bmm"}
# Values equal at every position (padding of RoPE tables): they carry no tokens.
CONSTANT_LIKE_OPS = {"ones_like", "zeros_like", "full_like", "new_ones", "new_zeros", "new_full"}


class TraceFailure(Exception):
    pass


@dataclass(frozen=True)
class Segment:
    """Tokens `start:stop` of `origin`, whose dims `dims` index tokens row-major."""

    origin: fx.Node
    dims: tuple[int, ...]
    start: sympy.Expr
    stop: sympy.Expr
    # The 1-D index tensor that picked these tokens out of the whole origin (Mochi keeps the valid prompt tokens of
    # q, k and v with one shared index): start/stop then count picked tokens.
    selected_by: Optional[fx.Node] = None

    @property
    def length(self) -> sympy.Expr:
        return self.stop - self.start


Segments = tuple[Segment, ...]


class TokenTracer:
    def __init__(self, sizes: Sizes, data_dependent: set[fx.Node], stop_at_projections: bool):
        self.sizes = sizes
        self.data_dependent = data_dependent
        self.stop_at_projections = stop_at_projections
        self.memo: dict[tuple[fx.Node, tuple[int, ...]], Segments] = {}
        # (origin, dims) of input-derived tokens -> positional segments met at exactly the same positions.
        self.aligned: dict[tuple[fx.Node, tuple[int, ...]], list[tuple[Segment, Segment]]] = {}

    # --- public -----------------------------------------------------------------------------------------------
    def trace(self, node: fx.Node, dims: tuple[int, ...]) -> Segments:
        key = (node, dims)
        if key not in self.memo:
            try:
                segments = self._trace(node, dims)
            except TraceFailure:
                segments = self._origin(node, dims)  # an op the walk cannot see through is where tokens start
            self.memo[key] = self._merge(segments)
        return self.memo[key]

    def same(self, a: Segments, b: Segments) -> bool:
        return len(a) == len(b) and all(
            x.origin is y.origin and x.dims == y.dims and Sizes.equal(x.start, y.start) and Sizes.equal(x.stop, y.stop)
            and x.selected_by is y.selected_by for x, y in zip(a, b)
        )

    # --- the walk -------------------------------------------------------------------------------------------------
    def _origin(self, node: fx.Node, dims: tuple[int, ...]) -> Segments:
        if tensor_of(node) is None:
            raise TraceFailure(f"{node.name} is not a tensor")
        shape = self.sizes.shape(node)
        return (Segment(node, dims, sympy.Integer(0), sympy.Mul(*[shape[d] for d in dims])),)

    def _trace(self, node: fx.Node, dims: tuple[int, ...]) -> Segments:
        name = op_name(node)
        value = tensor_of(node)
        if value is None:
            raise TraceFailure(f"{node.name} is not a tensor")
        if node.op not in ("call_function", "call_method"):
            return self._origin(node, dims)
        ndim = value.dim()
        dims = tuple(d % ndim for d in dims)
        if name in PASSTHROUGH_OPS:
            return self.trace(node.args[0], dims)
        if name in RESHAPE_OPS:
            return self._reshape(node, node.args[0], dims)
        if name in ("permute", "transpose", "swapaxes"):
            return self.trace(node.args[0], tuple(_permutation(node, ndim)[d] for d in dims))
        if name == "expand":
            return self._elementwise(node, [node.args[0]], dims)
        if name in ("view_as_complex", "view_as_real"):  # RoPE as complex products: only the last dims change
            if max(dims) >= min(ndim, tensor_of(node.args[0]).dim()) - 1:
                return self._origin(node, dims)
            return self.trace(node.args[0], dims)
        if name == "repeat":
            return self._repeat(node, dims, ndim)
        if name == "repeat_interleave":
            along = arg(node, 2, "dim")
            if along is None or along % ndim in dims:
                return self._origin(node, dims)
            return self.trace(node.args[0], dims)
        if name == "getitem":
            return self._getitem(node, dims)
        if name == "cat":
            return self._cat(node, dims)
        if name == "stack":
            return self._stack(node, dims, ndim)
        if name in ELEMENTWISE_OPS:
            return self._elementwise(node, [a for a in node.all_input_nodes], dims)
        if name in NORM_OPS:
            normalized = len(arg(node, 1, "normalized_shape"))
            return self._over_other_dims(node, dims, range(ndim - normalized, ndim))
        if name in REDUCE_OPS:
            return self._reduce(node, dims, ndim)
        if name in PROJECTION_OPS:
            if ndim - 1 in dims:
                return self._origin(node, dims)
            if self.stop_at_projections:
                return self._origin(node.args[0], dims)
            return self.trace(node.args[0], dims)
        if name in MATMUL_OPS:
            return self._matmul(node, dims, ndim)
        if name == "einsum":
            return self._einsum(node, dims)
        if name == "scaled_dot_product_attention":
            if dims != (ndim - 2,):
                return self._origin(node, dims)
            return self.trace(arg(node, 0, "query"), dims)
        return self._origin(node, dims)

    def _reshape(self, node: fx.Node, source: fx.Node, dims: tuple[int, ...]) -> Segments:
        groups = reshape_groups(self.sizes, self.sizes.shape(source), self.sizes.shape(node))
        mapped: list[int] = []
        for in_dims, out_dims in groups:
            wanted = [d for d in out_dims if d in dims]
            if not wanted:
                continue
            real_out = [d for d in out_dims if self.sizes.shape(node)[d] != 1]
            if set(real_out) - set(wanted):
                # A token dim split off a larger input dim (frames out of batch*frames): this is where tokens start.
                return self._origin(node, dims)
            mapped.extend(in_dims)
        return self.trace(source, tuple(mapped))

    def _elementwise(self, node: fx.Node, operands: list[Any], dims: tuple[int, ...]) -> Segments:
        """Follow the operands that carry the tokens: not broadcast in any token dim (shapes align on the right)."""
        out_shape = self.sizes.shape(node)
        carriers = []
        for operand in operands:
            if tensor_of(operand) is None:
                continue
            shape = self.sizes.shape(operand)
            offset = len(out_shape) - len(shape)
            if all(d - offset >= 0 and Sizes.equal(shape[d - offset], out_shape[d]) for d in dims):
                carriers.append((operand, tuple(d - offset for d in dims)))
        return self._agree(node, dims, carriers)

    def _agree(self, node: fx.Node, dims: tuple[int, ...], carriers: list[tuple[Any, tuple[int, ...]]]) -> Segments:
        """The tokens every input-dependent carrier gives; positional carriers (constant tables) do not count, unless
        no carrier depends on an input (then they must agree among themselves)."""
        carriers = [(x, mapped) for x, mapped in carriers if op_name(x) not in CONSTANT_LIKE_OPS]
        data = [(x, mapped) for x, mapped in carriers if x in self.data_dependent]
        positional = [(x, mapped) for x, mapped in carriers if x not in self.data_dependent]
        traced = [self.trace(operand, mapped) for operand, mapped in (data or positional)]
        agree = self._parallel if data else self.same
        if not traced or any(not agree(traced[0], t) for t in traced[1:]):
            return self._origin(node, dims)
        if data:
            for operand, mapped in positional:
                self._align(traced[0], self.trace(operand, mapped))
        return traced[0]

    def _parallel(self, a: Segments, b: Segments) -> bool:
        """Same tokens, or runs of equal lengths from different origins: a residual add of a hint computed from
        another input of the same layout (Wan VACE's control video, Wan Animate's face features) keeps each
        position where it is, and the first operand (the stream the hint is added to) names the tokens."""
        return self.same(a, b) or (len(a) == len(b) and all(Sizes.equal(x.length, y.length) for x, y in zip(a, b))
                                   and all(Sizes.equal(x.start, 0) for x in a + b))

    def _align(self, tokens: Segments, positions: Segments) -> None:
        """Record each positional segment that covers exactly the positions of one input-derived segment."""
        starts, offset = {}, sympy.Integer(0)
        for segment in tokens:
            starts[offset] = segment
            offset = offset + segment.length
        offset = sympy.Integer(0)
        for position in positions:
            match = next((t for start, t in starts.items() if Sizes.equal(start, offset) and
                          Sizes.equal(t.length, position.length)), None)
            if match is not None:
                pairs = self.aligned.setdefault((match.origin, match.dims), [])
                if not any(t == match and p == position for t, p in pairs):
                    pairs.append((match, position))
            offset = offset + position.length

    def _repeat(self, node: fx.Node, dims: tuple[int, ...], ndim: int) -> Segments:
        """x.repeat(...): tokens survive when the token dims are repeated once (copies along other dims)."""
        counts = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        source_ndim = tensor_of(node.args[0]).dim()
        offset = ndim - source_ndim  # repeat may add leading dims
        if len(counts) != ndim or any(d < offset or counts[d] != 1 for d in dims):
            return self._origin(node, dims)
        return self.trace(node.args[0], tuple(d - offset for d in dims))

    def _over_other_dims(self, node: fx.Node, dims: tuple[int, ...], reduced: Any) -> Segments:
        if set(dims) & set(reduced):
            return self._origin(node, dims)
        return self._elementwise(node, [node.args[0]], dims)

    def _reduce(self, node: fx.Node, dims: tuple[int, ...], ndim: int) -> Segments:
        reduced = arg(node, 1, "dim")
        if reduced is None:
            return self._origin(node, dims)
        in_ndim = tensor_of(node.args[0]).dim()
        reduced = {r % in_ndim for r in (reduced if isinstance(reduced, (list, tuple)) else [reduced])}
        if arg(node, 2, "keepdim", op_name(node) in ("softmax", "log_softmax")) is True:
            return self._over_other_dims(node, dims, reduced)
        kept = [d for d in range(in_ndim) if d not in reduced]  # output dim -> input dim
        return self.trace(node.args[0], tuple(kept[d] for d in dims))

    def _matmul(self, node: fx.Node, dims: tuple[int, ...], ndim: int) -> Segments:
        left, right = node.args[0], node.args[1]
        if self.stop_at_projections and (left not in self.data_dependent or right not in self.data_dependent):
            return self._origin(left if left in self.data_dependent else right, dims)
        if dims == (ndim - 2,):  # rows come from the left operand
            return self.trace(left, (tensor_of(left).dim() - 2,))
        if dims == (ndim - 1,):
            return self.trace(right, (tensor_of(right).dim() - 1,))
        if ndim - 1 in dims or ndim - 2 in dims:
            return self._origin(node, dims)
        return self._elementwise(node, [left, right], dims)

    def _einsum(self, node: fx.Node, dims: tuple[int, ...]) -> Segments:
        """Tokens follow their subscript letters into the operands that have all of them."""
        spec = einsum_spec(node)
        if spec is None:
            return self._origin(node, dims)
        inputs, out, operands = spec
        letters = [out[d] for d in dims]
        carriers = [(x, tuple(sub.index(c) for c in letters)) for sub, x in zip(inputs, operands)
                    if all(c in sub for c in letters)]
        if self.stop_at_projections and any(x not in self.data_dependent for x in operands):
            data = [(x, mapped) for x, mapped in carriers if x in self.data_dependent]
            return self._origin(*data[0]) if len(data) == 1 else self._origin(node, dims)
        return self._agree(node, dims, carriers)

    def _getitem(self, node: fx.Node, dims: tuple[int, ...]) -> Segments:
        source, index = node.args
        if op_name(source) in ("split", "chunk", "unbind", "split_with_sizes"):
            return self._piece(node, source, index, dims)
        if tensor_of(source) is None:
            return self._origin(node, dims)
        mapping = _index_mapping(index, tensor_of(source).dim())
        if mapping is None:
            return self._selection(node, source, index, dims)
        out_to_in, slices = mapping
        in_dims = tuple(out_to_in[d] for d in dims)
        if any(d is None for d in in_dims):
            return self._origin(node, dims)
        sliced = {d: s for d, s in slices.items() if not _is_full(s)}
        if not set(sliced) & set(in_dims):
            return self.trace(source, in_dims)
        if len(in_dims) != 1:
            return self._origin(node, dims)
        size = self.sizes.shape(source)[in_dims[0]]
        lo, hi = self._slice_bounds(sliced[in_dims[0]], size)
        return self._slice(self.trace(source, in_dims), lo, hi)

    def _selection(self, node: fx.Node, source: fx.Node, index: Any, dims: tuple[int, ...]) -> Segments:
        """x[..., idx, ...] with one 1-D integer index tensor on the token dim (slices elsewhere): the picked tokens
        of the source, when the source's tokens there are one whole run."""
        items = list(index) if isinstance(index, tuple) else [index]
        tensors = [i for i, item in enumerate(items) if isinstance(item, fx.Node)]
        if len(tensors) != 1 or any(not isinstance(item, slice) for i, item in enumerate(items) if i != tensors[0]):
            return self._origin(node, dims)
        picker = items[tensors[0]]
        value = tensor_of(picker)
        if value is None or value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool or \
                dims != (tensors[0],):
            return self._origin(node, dims)
        traced = self.trace(source, dims)
        whole = self.sizes.shape(source)[dims[0]]
        if len(traced) != 1 or traced[0].selected_by is not None or not Sizes.equal(traced[0].start, 0) or \
                not Sizes.equal(traced[0].stop, whole):
            return self._origin(node, dims)
        return (Segment(traced[0].origin, traced[0].dims, sympy.Integer(0), self.sizes.shape(picker)[0], picker),)

    def _piece(self, node: fx.Node, source: fx.Node, index: int, dims: tuple[int, ...]) -> Segments:
        tensor = source.args[0]
        ndim = tensor_of(tensor).dim()
        split_dim = arg(source, 2 if op_name(source) != "unbind" else 1, "dim", 0) % ndim
        if op_name(source) == "unbind":
            in_dims = tuple(d + (d >= split_dim) for d in dims)
            return self._origin(node, dims) if split_dim in in_dims else self.trace(tensor, in_dims)
        if split_dim not in dims:
            return self.trace(tensor, dims)
        if dims != (split_dim,):
            return self._origin(node, dims)
        pieces = source.meta["example_value"]
        lo = sympy.Add(*[self.sizes.expr(p.shape[split_dim]) for p in pieces[:index]])
        return self._slice(self.trace(tensor, dims), lo, lo + self.sizes.expr(pieces[index].shape[split_dim]))

    def _cat(self, node: fx.Node, dims: tuple[int, ...]) -> Segments:
        tensors = arg(node, 0, "tensors")
        ndim = tensor_of(node).dim()
        cat_dim = arg(node, 1, "dim", 0) % ndim
        if cat_dim not in dims:
            return self._elementwise(node, tensors, dims)
        if dims != (cat_dim,):
            return self._origin(node, dims)
        return tuple(segment for t in tensors for segment in self.trace(t, dims))

    def _stack(self, node: fx.Node, dims: tuple[int, ...], ndim: int) -> Segments:
        """stack adds a dim: tokens along other dims must agree across the stacked tensors (RoPE's (-x2, x1))."""
        new_dim = arg(node, 1, "dim", 0) % ndim
        if new_dim in dims:
            return self._origin(node, dims)
        in_dims = tuple(d - (d > new_dim) for d in dims)
        return self._agree(node, dims, [(t, in_dims) for t in arg(node, 0, "tensors")])

    def _slice_bounds(self, index: slice, size: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
        """Python slice bounds (None, negative, symbolic) as offsets in 0..size, clamped as the example sizes say."""
        if index.step not in (None, 1):
            raise TraceFailure("strided slice along the tokens")

        def bound(value: Any, default: sympy.Expr) -> sympy.Expr:
            if value is None:
                return default
            expr = self._ordered(self.sizes.expr(value))
            if self.sizes.hint(expr) < 0:
                expr = size + expr
            if self.sizes.hint(expr) < 0:
                return sympy.Integer(0)
            return size if self.sizes.hint(expr) > self.sizes.hint(size) else sympy.simplify(expr)

        return bound(index.start, sympy.Integer(0)), bound(index.stop, size)

    def _slice(self, segments: Segments, lo: sympy.Expr, hi: sympy.Expr) -> Segments:
        """Tokens lo:hi of a sequence made of `segments` (ordered by the example sizes, kept symbolic)."""
        out, offset = [], sympy.Integer(0)
        for s in segments:
            end = self._ordered(offset + s.length)
            start = lo if self.sizes.hint(lo) > self.sizes.hint(offset) else offset
            stop = hi if self.sizes.hint(hi) < self.sizes.hint(end) else end
            if self.sizes.hint(stop) > self.sizes.hint(start):
                out.append(Segment(s.origin, s.dims, sympy.simplify(s.start + start - offset),
                                   sympy.simplify(s.start + stop - offset), s.selected_by))
            offset = end
        return tuple(out)

    def _ordered(self, expr: sympy.Expr) -> sympy.Expr:
        """`expr`, when its example value can order it against others; a data-dependent size cannot (a slice up to
        a length computed from a mask, FramePack's prompt): the value sliced is then where its tokens start."""
        if not self.sizes.hinted(expr):
            raise TraceFailure(f"data-dependent size {expr} along the tokens")
        return expr

    def _merge(self, segments: Segments) -> Segments:
        merged: list[Segment] = []
        for s in segments:
            if Sizes.equal(s.length, 0):
                continue  # an empty run (Helios cats an empty history part) holds no tokens
            last = merged[-1] if merged else None
            if last is not None and last.origin is s.origin and last.dims == s.dims and Sizes.equal(last.stop, s.start) \
                    and last.selected_by is None and s.selected_by is None:
                merged[-1] = Segment(s.origin, s.dims, last.start, s.stop)
            else:
                merged.append(s)
        return tuple(merged)


def _is_full(index: slice) -> bool:
    return index.start is None and index.stop is None and index.step in (None, 1)


def _index_mapping(index: Any, ndim: int) -> Optional[tuple[list[Optional[int]], dict[int, slice]]]:
    """For `x[index]`: the input dim of each output dim (None for inserted ones) and the slice on each input dim."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not isinstance(i, (slice, int, type(None), type(Ellipsis))) for i in items):
        return None  # tensor (advanced) indexing: rows can move anywhere
    consumed = sum(1 for i in items if isinstance(i, (slice, int)))
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (ndim - consumed)
    else:
        items += [slice(None)] * (ndim - consumed)
    out_to_in: list[Optional[int]] = []
    slices: dict[int, slice] = {}
    in_dim = 0
    for i in items:
        if i is None:
            out_to_in.append(None)
            continue
        if isinstance(i, slice):
            out_to_in.append(in_dim)
            slices[in_dim] = i
        in_dim += 1
    return out_to_in, slices


def _permutation(node: fx.Node, ndim: int) -> list[int]:
    """perm[out_dim] = in_dim."""
    name = op_name(node)
    if name == "permute":
        order = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return [d % ndim for d in order]
    perm = list(range(ndim))
    a, b = (d % ndim for d in node.args[1:3])
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def reshape_groups(sizes: Sizes, a: list[sympy.Expr], b: list[sympy.Expr]) -> list[tuple[list[int], list[int]]]:
    """Groups (input dims, output dims) of a row-major reshape from shape `a` to `b`: each group covers the same
    elements on both sides. Size-1 dims form their own groups where they can (inserted or dropped unit dims)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        unit_a = i < len(a) and a[i] == 1
        unit_b = j < len(b) and b[j] == 1
        if unit_a and unit_b:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
        elif unit_a or j == len(b):
            groups.append(([i], []))
            i += 1
        elif unit_b or i == len(a):
            groups.append(([], [j]))
            j += 1
        else:
            gi, gj = [i], [j]
            pa, pb = a[i], b[j]
            i, j = i + 1, j + 1
            while not Sizes.equal(pa, pb):
                if sizes.hint(pa) < sizes.hint(pb) and i < len(a):
                    gi.append(i)
                    pa, i = pa * a[i], i + 1
                elif j < len(b):
                    gj.append(j)
                    pb, j = pb * b[j], j + 1
                else:
                    raise TraceFailure(f"reshape {a} -> {b} does not regroup")
            groups.append((gi, gj))
    return groups


