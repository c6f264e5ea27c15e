"""Video token layout of a self-attention site: which query positions are text, which are the F x H x W grid.

The query's token provenance (tokens.TokenTracer, walking through projections, residual adds and earlier attention)
ends in origins. An origin is the video grid when it is the output of the patch-embedding convolution, or a reshape
of it that splits frames out of the batch (CogVideoX runs a Conv2d over batch*frames): its token dims must be the
convolution's spatial dims in order, after at most one leading frames dim. Packed tokens (an input already shaped
[B, F*H*W, C]) are a grid when a positional table combined elementwise with exactly those positions (RoPE) is,
before its flattening, a value no input reaches whose three dims index those positions row-major (LTX's
`stack(meshgrid(f, h, w))`, Qwen-Image's per-axis tables expanded to [F, H, W, D]): token i then carries the
position of the i-th point of that grid (frames first, as every diffusers video RoPE orders its axes). Tokens
patchified by reshapes and a linear are a grid when their dims index three non-batch axes of one input, in order
(axes.py). Every other origin is text. The layout is accepted only when sympy proves that the segments' lengths sum
to S; the layout is then the ordered list of text and grid segments, and when there is exactly one grid also
`S == text_before + F*H*W + text_after` (the planners' form).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import sympy
import torch.fx as fx

from .graph import CONV_OPS, RESHAPE_OPS, Sizes, op_name
from .tokens import Segment, Segments, TokenTracer, reshape_groups
from .types import DimRef, LayoutSegment, VideoLayout


class LayoutError(Exception):
    """Why a site's layout could not be proven (the site stays dense)."""


@dataclass
class Grid:
    sizes: tuple[sympy.Expr, sympy.Expr, sympy.Expr]  # frames, height, width
    refs: tuple[Optional[DimRef], Optional[DimRef], Optional[DimRef]]


def video_grid(sizes: Sizes, segment: Segment) -> Optional[Grid]:
    """The F x H x W grid a segment's origin holds, or None when the origin is not a patch-embedding output."""
    origin = segment.origin
    conv = origin if op_name(origin) in CONV_OPS else None
    if conv is None and op_name(origin) in RESHAPE_OPS and op_name(origin.args[0]) in CONV_OPS:
        conv = origin.args[0]
    if conv is None or op_name(conv) == "conv1d":
        return None
    conv_shape, origin_shape = sizes.shape(conv), sizes.shape(origin)
    # The conv dim behind each token dim of the origin (the same dim when the origin is the conv itself).
    if origin is conv:
        source = {d: d for d in segment.dims}
    else:
        source = {}
        for in_dims, out_dims in reshape_groups(sizes, conv_shape, origin_shape):
            real_in = [d for d in in_dims if conv_shape[d] != 1]
            for d in out_dims:
                if d in segment.dims and len(real_in) == 1:
                    source[d] = real_in[0]
    token_dims = [d for d in segment.dims if origin_shape[d] != 1]
    if any(d not in source for d in token_dims):
        return None
    spatial = list(range(2, len(conv_shape)))
    real_spatial = [d for d in spatial if conv_shape[d] != 1]
    sources = [source[d] for d in token_dims]
    frames_dims = token_dims[: len(sources) - len(real_spatial)]
    if sources[len(frames_dims):] != real_spatial or len(frames_dims) > 1:
        return None
    if not Sizes.equal(segment.start, 0) or not Sizes.equal(segment.length, sympy.Mul(*[origin_shape[d] for d in
                                                                                         segment.dims])):
        return None  # only part of the grid
    if len(spatial) == 3:  # Conv3d: (B, C, F, H, W)
        if frames_dims:
            return None
        dims = [(conv, d) for d in spatial]
    else:  # Conv2d: frames, if any, folded into the batch dim
        if frames_dims and source[frames_dims[0]] != 0:
            return None
        frames = (origin, frames_dims[0]) if frames_dims else None
        dims = [frames] + [(conv, d) for d in spatial]
    exprs = tuple(sympy.Integer(1) if d is None else sizes.shape(d[0])[d[1]] for d in dims)
    refs = tuple(None if d is None else Sizes.ref(e, d[0], d[1]) for d, e in zip(dims, exprs))
    return Grid(exprs, refs)


def coordinate_grid(sizes: Sizes, tracer: TokenTracer, segment: Segment) -> Optional[Grid]:
    """The grid of packed tokens, from a positional table met at exactly their positions (tokens.TokenTracer.aligned)
    whose tokens are three dims of a value no input reaches, e.g. stack(meshgrid(f, h, w)) or Qwen-Image's
    per-axis frequency tables expanded to [F, H, W, D]."""
    for tokens, position in tracer.aligned.get((segment.origin, segment.dims), []):
        if Sizes.equal(tokens.start, segment.start) and Sizes.equal(tokens.stop, segment.stop):
            grid = _positional_axes(sizes, tracer, position)
            if grid is not None:
                return grid
    return None


def _positional_axes(sizes: Sizes, tracer: TokenTracer, position: Segment) -> Optional[Grid]:
    """F x H x W when `position` is the whole of three dims of a positional value (row-major, frames first); two
    dims right after a unit dim are one frame (the flatten dropped the unit frames dim)."""
    origin = position.origin
    if origin in tracer.data_dependent or not Sizes.equal(position.start, 0):
        return None
    shape = sizes.shape(origin)
    dims = position.dims
    if len(dims) == 2 and dims[0] > 0 and shape[dims[0] - 1] == 1 and dims[1] == dims[0] + 1:
        dims = (dims[0] - 1,) + dims
    if len(dims) != 3:
        return None
    exprs = tuple(shape[d] for d in dims)
    if not Sizes.equal(position.stop, sympy.Mul(*exprs)):
        return None
    return Grid(exprs, tuple(Sizes.ref(e, origin, d) for d, e in zip(dims, exprs)))


def label_grid(labels: dict, segment: Segment) -> Optional[Grid]:
    """Patch tokens made by reshapes (patchify with view / permute / flatten, then a linear: CogVideoX 1.5, Cosmos):
    the segment's dims index, row-major, three non-batch axes of one data input in their order (axes.py)."""
    if segment.origin not in labels:
        return None
    factors = [f for d in segment.dims for f in (labels[segment.origin][d] or (None,))]
    if len(factors) != 3 or None in factors or len({f.axis[0] for f in factors}) != 1:
        return None
    dims = [f.axis[1] for f in factors]
    if not 0 < dims[0] < dims[1] < dims[2] or not Sizes.equal(segment.start, 0) or \
            not Sizes.equal(segment.length, sympy.Mul(*[f.size for f in factors])):
        return None
    return Grid(tuple(f.size for f in factors), (None, None, None))


def video_layout(sizes: Sizes, tracer: TokenTracer, query: fx.Node, seq_dim: int,
                 labels: Optional[dict] = None) -> VideoLayout:
    """The layout of the query's sequence dim; raises LayoutError with the reason when it cannot be proven."""
    if tracer.stop_at_projections:
        raise ValueError("video_layout needs a tracer that walks through projections")
    segments = tracer.trace(query, (seq_dim,))
    grids = [video_grid(sizes, s) or coordinate_grid(sizes, tracer, s) or label_grid(labels or {}, s)
             for s in segments]
    found = [i for i, g in enumerate(grids) if g is not None]
    if not found:
        origins = ", ".join(f"{s.origin.name}[{s.start}:{s.stop}]" for s in segments)
        raise LayoutError(f"no patch-embedding grid among the query's tokens (token origins: {origins})")
    report = Sizes.report
    seq = sizes.shape(query)[seq_dim]
    runs = [LayoutSegment("text", report(s.length), s.origin.name) if g is None else
            LayoutSegment("grid", report(s.length), s.origin.name, *(report(e) for e in g.sizes))
            for s, g in zip(segments, grids)]
    terms = [s.length if g is None else sympy.Mul(*g.sizes) for s, g in zip(segments, grids)]
    if not Sizes.equal(seq, sympy.Add(*terms)):
        raise LayoutError(f"cannot prove {seq} == {' + '.join(map(str, terms))}")
    if len(found) > 1:
        return VideoLayout(None, None, None, None, None, f"{report(seq)} == " + " + ".join(
            str(report(t)) for t in terms), {}, runs)
    at, grid = found[0], grids[found[0]]
    before, after = segments[:at], segments[at + 1:]
    text_before = sympy.Add(*[s.length for s in before])
    text_after = sympy.Add(*[s.length for s in after])
    frames, height, width = grid.sizes
    proof = f"{report(seq)} == {report(text_before)} + {report(frames)}*{report(height)}*{report(width)} + " \
            f"{report(text_after)}"
    refs = dict(zip(("frames", "height", "width"), grid.refs))
    refs.update(text_before=_text_ref(before, text_before), text_after=_text_ref(after, text_after),
                seq=Sizes.ref(seq, query, seq_dim))
    return VideoLayout(report(frames), report(height), report(width), report(text_before), report(text_after),
                       proof, refs, runs)


def _text_ref(segments: Segments, length: sympy.Expr) -> Optional[DimRef]:
    """A text run readable off one dim: a single segment that is the whole of its origin's token dim."""
    if len(segments) != 1 or len(segments[0].dims) != 1:
        return None
    segment = segments[0]
    if segment.selected_by is not None:  # as many tokens as the index tensor picks
        return Sizes.ref(length, segment.selected_by, 0)
    whole = Sizes.expr(segment.origin.meta["example_value"].shape[segment.dims[0]])
    if not Sizes.equal(segment.start, 0) or not Sizes.equal(segment.stop, whole):
        return None
    return Sizes.ref(length, segment.origin, segment.dims[0])
