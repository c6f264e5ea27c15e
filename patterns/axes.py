"""Axis labels: which axes of which data input each dim of each value indexes, propagated forward through the graph.

Token provenance (tokens.py) follows one sequence dim backwards and stops where a reshape splits a token dim out of
a larger one; factorized attention is made of exactly such splits (Latte, OpenSora v1: frames folded into the batch
for spatial attention, positions folded into the batch for temporal attention). Here every dim of a data input is an
axis, and each dim of a value gets its *factors*, row-major: `Factor(axis, size, inner)` covers the indices
`(i // inner) % size` of that axis. Reshapes merge and split factors (a split inside one axis makes sub-axes, e.g. a
patch-embedding's token index is the outer factor of a pixel axis), permutes reorder them, patch convolutions
(kernel == stride, no padding) keep the batch dim and split each spatial axis by the stride, and ops that keep
positions (elementwise, norms, linear on the last dim, attention rows) keep them. Operands must agree; anything
else loses its labels (None). Nothing here looks at names: only ops, shapes and the data inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import sympy
import torch.fx as fx

from .graph import CONV_OPS, PASSTHROUGH_OPS, RESHAPE_OPS, Sizes, arg, op_name, tensor_of
from .tokens import ELEMENTWISE_OPS, NORM_OPS, TraceFailure, _permutation, reshape_groups


@dataclass(frozen=True)
class Factor:
    axis: tuple[str, int]  # (data input, dim)
    size: sympy.Expr
    inner: sympy.Expr


Labels = tuple[Optional[tuple[Factor, ...]], ...]  # per dim of a value: its factors, or None when unknown
_KEEP_POSITIONS = ELEMENTWISE_OPS | NORM_OPS | PASSTHROUGH_OPS | {"softmax", "log_softmax", "expand"}


def axis_labels(gm: fx.GraphModule, sizes: Sizes, data: list[fx.Node]) -> dict[fx.Node, Labels]:
    """Labels of every tensor value that indexes some data-input axis."""
    labels: dict[fx.Node, Labels] = {}
    for node in data:
        shape = sizes.shape(node)
        labels[node] = tuple((Factor((node.name, d), s, sympy.Integer(1)),) if s != 1 else () for d, s in
                             enumerate(shape))
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and tensor_of(node) is not None:
            try:
                result = _labels(node, sizes, labels)
            except TraceFailure:
                result = None
            if result is not None and any(r for r in result):
                labels[node] = result
    return labels


def _labels(node: fx.Node, sizes: Sizes, labels: dict) -> Optional[Labels]:
    name = op_name(node)
    ndim = tensor_of(node).dim()
    source = node.args[0] if node.args else None
    if name in RESHAPE_OPS:
        return _reshape(sizes, labels.get(source), sizes.shape(source), sizes.shape(node))
    if name in ("permute", "transpose", "swapaxes"):
        if source not in labels:
            return None
        return tuple(labels[source][d] for d in _permutation(node, ndim))
    if name in _KEEP_POSITIONS or name == "cat":
        operands = arg(node, 0, "tensors") if name == "cat" else node.all_input_nodes
        merged = _broadcast(node, sizes, labels, operands)
        if name == "cat":
            merged = list(merged)
            merged[arg(node, 1, "dim", 0) % ndim] = None
        return tuple(merged)
    if name == "linear":
        return None if source not in labels else labels[source][:-1] + (None,)
    if name == "scaled_dot_product_attention":
        query = arg(node, 0, "query")
        return None if query not in labels else labels[query][:-1] + (None,)
    if name in ("matmul", "bmm"):
        a, b = node.args[:2]
        rows = labels[a][-2] if a in labels else None
        cols = labels[b][-1] if b in labels else None
        return _broadcast(node, sizes, labels, [a, b], skip_last=2) + (rows, cols)
    if name in CONV_OPS:
        return _patch_conv(node, sizes, labels.get(source))
    return None


def _broadcast(node: fx.Node, sizes: Sizes, labels: dict, operands, skip_last: int = 0) -> tuple:
    """Per output dim, the labels every operand that is not broadcast there agrees on (unknown ones abstain)."""
    out = sizes.shape(node)
    result = []
    for d in range(len(out) - skip_last):
        found = set()
        for x in operands:
            if not isinstance(x, fx.Node) or x not in labels:
                continue
            shape = sizes.shape(x)
            at = d - (len(out) - len(shape))
            if at >= 0 and Sizes.equal(shape[at], out[d]) and labels[x][at] is not None:
                found.add(labels[x][at])
        result.append(found.pop() if len(found) == 1 else None)
    return tuple(result)


def _reshape(sizes: Sizes, source: Optional[Labels], a: list, b: list) -> Optional[Labels]:
    if source is None:
        return None
    out: list = [None] * len(b)
    for in_dims, out_dims in reshape_groups(sizes, a, b):
        factors = [f for d in in_dims for f in (source[d] or ())] if all(source[d] is not None for d in in_dims) \
            else None
        for d, piece in zip(out_dims, _split(factors, [b[d] for d in out_dims])):
            out[d] = piece
    return tuple(out)


def _split(factors: Optional[list[Factor]], sizes: list) -> list:
    """Cut a row-major list of factors into consecutive pieces of the given sizes (splitting a factor if needed)."""
    if factors is None:
        return [None] * len(sizes)
    pieces, queue = [], list(factors)
    for size in sizes:
        piece, remaining = [], sympy.sympify(size)
        while not Sizes.equal(remaining, 1):
            if not queue:
                return [None] * len(sizes)
            f = queue.pop(0)
            ratio = sympy.simplify(f.size / remaining)
            if Sizes.equal(ratio, 1) or Sizes.equal(f.size, remaining):
                piece.append(f)
                remaining = sympy.Integer(1)
            elif sympy.simplify(remaining / f.size).is_integer:
                piece.append(f)
                remaining = sympy.simplify(remaining / f.size)
            elif ratio.is_integer:  # the piece ends inside f: its outer part here, the rest next
                piece.append(Factor(f.axis, remaining, f.inner * ratio))
                queue.insert(0, Factor(f.axis, ratio, f.inner))
                remaining = sympy.Integer(1)
            else:
                return [None] * len(sizes)
        pieces.append(tuple(piece))
    return pieces


def _patch_conv(node: fx.Node, sizes: Sizes, source: Optional[Labels]) -> Optional[Labels]:
    """A patch embedding (kernel == stride, no padding): batch kept, each spatial axis split by the stride."""
    if source is None:
        return None
    weight = node.args[1]
    spatial = len(sizes.shape(node)) - 2
    kernel = sizes.shape(weight)[2:]
    stride = arg(node, 3, "stride", 1)
    stride = list(stride) if isinstance(stride, (list, tuple)) else [stride] * spatial
    padding = arg(node, 4, "padding", 0)
    if any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding])) or \
            [sympy.sympify(s) for s in stride] != list(kernel):
        return None
    out = [source[0], None]
    for d, (size, step) in enumerate(zip(sizes.shape(node)[2:], stride)):
        factors = source[2 + d]
        # Output index o covers input pixels o*step ... o*step + step - 1: the outer factor of the axis (also when
        # a symbolic size is not provably a multiple of the stride: the remainder is dropped).
        if factors is not None and len(factors) == 1:
            out.append((Factor(factors[0].axis, size, factors[0].inner * step),))
        else:
            out.append(_split(list(factors) if factors is not None else None, [size, step])[0])
    return tuple(out)


@dataclass
class Factorized:
    attention: str  # "spatial": each frame attends within itself; "temporal": each position attends over frames
    grid: tuple[sympy.Expr, sympy.Expr, sympy.Expr]  # frames, height, width


def factorized(labels: dict, query: fx.Node, batch_dim: int, seq_dim: int) -> Optional[Factorized]:
    """Spatial attention (tokens: two axes of one input, the batch holds an earlier axis of it) or temporal
    attention (tokens: one axis, the batch holds two later axes of it) of a site whose query is `query`."""
    if query not in labels:
        return None
    seq, batch = labels[query][seq_dim], labels[query][batch_dim]
    if not seq or not batch:
        return None
    inputs = {f.axis[0] for f in seq}
    if len(inputs) != 1:
        return None
    others = [f for f in batch if f.axis[0] in inputs and f.axis[1] != 0]  # dim 0 of an input is its batch
    axes = lambda factors: [f.axis[1] for f in factors]  # noqa: E731
    if len(seq) == 2 and len(others) == 1 and axes(others)[0] < axes(seq)[0] < axes(seq)[1]:
        return Factorized("spatial", (others[0].size, seq[0].size, seq[1].size))
    if len(seq) == 1 and len(others) == 2 and axes(seq)[0] < axes(others)[0] < axes(others)[1]:
        return Factorized("temporal", (seq[0].size, others[0].size, others[1].size))
    return None
