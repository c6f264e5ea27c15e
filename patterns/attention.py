"""Attention sites: SDPA calls and explicit softmax(q @ k^T * scale) @ v, with self/cross and mask kind.

Self-attention: Sq == Skv (sympy) and q, k and v hold the same tokens of the same hidden states: their token
provenance, walked back to the inputs of the q/k/v projections (tokens.TokenTracer with `stop_at_projections`),
is identical, segment by segment (joint text+video attention concatenates the same runs in q, k and v).
Cross-attention: anything else, e.g. keys and values projected from the text encoder's states.

Masks: none, or a key-padding mask: shaped [B|1, 1, 1, Skv] (so it cannot depend on query row or head) and built
so that its valid keys form a prefix of every batch row: a comparison of a key-position `arange` with a value
broadcast over keys (`arange >= length`), combined through not / and / or / masked_fill / where with constant
fills. Everything else is "unsupported".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from .block_stack import block_of
from .graph import PASSTHROUGH_OPS, Sizes, arg, einsum_spec, module_path, op_name, tensor_of
from .tokens import TokenTracer, TraceFailure
from .types import AttentionSite

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MATMULS = {"matmul", "bmm", "einsum"}
_MIRRORED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


@dataclass
class RawSite:
    """What a pattern match yields before the analysis: the nodes and the call's options."""

    node: fx.Node
    kind: str
    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: Optional[fx.Node]
    scale: Optional[float]
    dropout_p: float = 0.0
    is_causal: bool = False
    enable_gqa: bool = False
    graph_valued: tuple[str, ...] = ()  # options passed as graph values, unknown until run time


def find_attention(gm: fx.GraphModule) -> list[RawSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            options = {name: arg(node, i, name) for i, name in enumerate(_SDPA_ARGS)}
            graph_valued = tuple(name for name in _SDPA_ARGS[4:] if isinstance(options[name], fx.Node))
            sites.append(RawSite(node, "sdpa", options["query"], options["key"], options["value"],
                                 options["attn_mask"], _number(options["scale"]), _number(options["dropout_p"]) or 0.0,
                                 options["is_causal"] is True, options["enable_gqa"] is True, graph_valued))
        else:
            explicit = _match_explicit(node)
            if explicit is not None:
                sites.append(explicit)
    return sites


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _strip(node: Any) -> Any:
    while isinstance(node, fx.Node) and op_name(node) in PASSTHROUGH_OPS:
        node = node.args[0]
    return node


def _match_explicit(node: fx.Node) -> Optional[RawSite]:
    """out = softmax(scores, -1) @ v, scores = (q @ k^T) * c [+ mask], c on the scores or on q / k."""
    pair = _matmul_operands(node, transpose_right=False)
    if pair is None:
        return None
    probs, value = _strip(pair[0]), pair[1]
    if op_name(probs) != "softmax" or tensor_of(probs) is None:
        return None
    if arg(probs, 1, "dim") not in (-1, tensor_of(probs).dim() - 1):
        return None
    scale, scores = _unscaled(probs.args[0])
    mask = None
    if op_name(scores) == "add" and all(isinstance(a, fx.Node) for a in scores.args[:2]):
        left, right = scores.args[:2]
        chosen, mask = (left, right) if op_name(_unscaled(left)[1]) in _MATMULS else (right, left)
        factor, scores = _unscaled(chosen)
        scale *= factor
    qk = _matmul_operands(scores, transpose_right=True) if op_name(scores) in _MATMULS else None
    if qk is None:
        return None
    (q_factor, query), (k_factor, key) = _unscaled(qk[0]), _unscaled(qk[1])
    return RawSite(node, "explicit", query, key, value, mask, scale * q_factor * k_factor)


def _unscaled(node: Any) -> tuple[float, Any]:
    """(c, x) for x times constants c (through dtype conversions); (1.0, node) when there are none."""
    scale = 1.0
    node = _strip(node)
    while (factor := _constant_factor(node)) is not None:
        scale *= factor[0]
        node = _strip(factor[1])
    return scale, node


def _constant_factor(node: Any) -> Optional[tuple[float, fx.Node]]:
    """x * c, c * x or x / c with a constant c: (c or 1/c, x)."""
    name = op_name(node) if isinstance(node, fx.Node) else None
    if name not in ("mul", "truediv", "div") or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    if isinstance(a, fx.Node) and _number(b) is not None:
        return (_number(b) if name == "mul" else 1.0 / _number(b)), a
    if name == "mul" and isinstance(b, fx.Node) and _number(a) is not None:
        return _number(a), b
    return None


def _matmul_operands(node: fx.Node, transpose_right: bool) -> Optional[tuple[fx.Node, fx.Node]]:
    """(a, b) of a @ b; with `transpose_right`, b is returned untransposed (the k of q @ k^T)."""
    name = op_name(node)
    if name == "einsum":
        return _einsum_operands(node, transpose_right)
    if name not in ("matmul", "bmm") or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    a, b = node.args[:2]
    if not transpose_right:
        return a, b
    source = _untransposed(b)
    return (a, source) if source is not None else None


def _untransposed(node: fx.Node) -> Optional[fx.Node]:
    """k when node is k with its last two dims swapped."""
    value = tensor_of(node)
    if value is None or value.dim() < 2:
        return None
    ndim = value.dim()
    name = op_name(node)
    if name in ("transpose", "swapaxes") and {d % ndim for d in node.args[1:3]} == {ndim - 1, ndim - 2}:
        return node.args[0]
    if name == "permute":
        order = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        expected = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        return node.args[0] if [d % ndim for d in order] == expected else None
    return None


def _einsum_operands(node: fx.Node, scores: bool) -> Optional[tuple[fx.Node, fx.Node]]:
    """q, k of einsum("...id,...jd->...ij", q, k) (scores) or p, v of einsum("...ij,...jd->...id", p, v)."""
    spec = einsum_spec(node)
    if spec is None or len(spec[2]) != 2:
        return None
    (a, b), out, _ = spec
    if a[:-2] != b[:-2] or out[:-2] != a[:-2]:
        return None
    if scores:
        ok = a[-1] == b[-1] and a[-1] not in out and out[-2:] == a[-2] + b[-2]
    else:
        ok = a[-1] == b[-2] and a[-1] not in out and out[-2:] == a[-2] + b[-1]
    return (spec[2][0], spec[2][1]) if ok else None


# --- masks -------------------------------------------------------------------------------------------------------
# A key set says which key positions of a mask are valid (bool: True; float: adds 0): all, none, a prefix, a
# suffix, or unknown (None).
_NOT = {"all": "none", "none": "all", "prefix": "suffix", "suffix": "prefix"}


def _and(a: Optional[str], b: Optional[str]) -> Optional[str]:
    if a is None or b is None:
        return None
    if "all" in (a, b):
        return b if a == "all" else a
    if "none" in (a, b):
        return "none"
    return a if a == b else None


def _or(a: Optional[str], b: Optional[str]) -> Optional[str]:
    if a is None or b is None:
        return None
    neither = _and(_NOT[a], _NOT[b])  # De Morgan
    return None if neither is None else _NOT[neither]


def classify_mask(mask: Any, batch: sympy.Expr, kv_len: sympy.Expr) -> tuple[str, str]:
    """("none" | "key_padding" | "unsupported", reason)."""
    if mask is None:
        return "none", ""
    value = tensor_of(mask) if isinstance(mask, fx.Node) else None
    if value is None:
        return "unsupported", "attn_mask is not a graph tensor"
    shape = Sizes.shape(mask)
    if len(shape) != 4 or shape[1] != 1 or shape[2] != 1 or not Sizes.equal(shape[3], kv_len) or not (
            shape[0] == 1 or Sizes.equal(shape[0], batch)):
        return "unsupported", f"attn_mask shaped {[Sizes.report(s) for s in shape]}, not [B|1, 1, 1, Skv]: it can " \
                              f"vary with the query row or head"
    keys = _key_set(mask)
    if keys == "prefix":
        return "key_padding", ""
    return "unsupported", f"cannot show that the valid keys of attn_mask form a prefix (found: {keys or 'unknown'})"


def _key_set(node: Any) -> Optional[str]:
    value = tensor_of(node) if isinstance(node, fx.Node) else None
    if value is None:
        return None
    name = op_name(node)
    is_bool = value.dtype == torch.bool
    if name in PASSTHROUGH_OPS | {"bool", "unsqueeze", "view", "reshape", "expand", "repeat"}:
        source = tensor_of(node.args[0])
        if source is None or (source.dtype == torch.bool) != is_bool or source.dim() == 0 or \
                not Sizes.equal(Sizes.expr(source.shape[-1]), Sizes.expr(value.shape[-1])):
            return None  # bool <-> float changes the meaning; the key dim must stay the last one
        return _key_set(node.args[0])
    if _only_inserts_dims(node):
        return _key_set(node.args[0])
    if name in ("logical_not", "bitwise_not") and is_bool:
        return _NOT.get(_key_set(node.args[0]))
    if name in ("and", "logical_and", "bitwise_and", "or", "logical_or", "bitwise_or"):
        combine = _and if "and" in name else _or
        return combine(_key_set(node.args[0]), _key_set(node.args[1]))
    if name in _MIRRORED:
        return _comparison(node)
    if name == "masked_fill":
        base, condition, fill = (arg(node, i, n) for i, n in enumerate(("self", "mask", "value")))
        filled = _valid_constant(fill, is_bool)
        if filled is None:
            return None
        # Positions where the condition holds take `fill`; the others keep the base.
        return _or(_key_set(base), _key_set(condition)) if filled else _and(_key_set(base), _NOT.get(
            _key_set(condition)))
    if name == "where":
        condition, a, b = node.args[:3]
        sets = [_operand_set(x, is_bool) for x in (a, b)]
        cond = _key_set(condition)
        return _or(_and(cond, sets[0]), _and(_NOT.get(cond), sets[1])) if cond else None
    if name in ("ones", "zeros", "full", "ones_like", "zeros_like", "full_like", "new_ones", "new_zeros", "new_full"):
        fill = {"ones": 1, "zeros": 0}.get(name.replace("new_", "").replace("_like", ""))
        if fill is None:
            fill = arg(node, 1, "fill_value")
        valid = _valid_constant(fill, is_bool)
        return None if valid is None else ("all" if valid else "none")
    return None


def _only_inserts_dims(node: fx.Node) -> bool:
    """x[:, None, None, :] and the like: new unit dims, every existing dim kept whole."""
    if op_name(node) != "getitem" or tensor_of(node.args[0]) is None:
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in index)


def _operand_set(x: Any, is_bool: bool) -> Optional[str]:
    if isinstance(x, fx.Node):
        return _key_set(x)
    valid = _valid_constant(x, is_bool)
    return None if valid is None else ("all" if valid else "none")


def _valid_constant(fill: Any, is_bool: bool) -> Optional[bool]:
    """Whether a constant fill marks a key valid: True for bool masks; 0 (valid) or -inf / <= -1e4 (masked) for
    additive ones. Other values are biases, not padding."""
    if isinstance(fill, fx.Node) or fill is None:
        return None
    if is_bool:
        return bool(fill)
    fill = float(fill)
    if fill == 0.0:
        return True
    return False if fill == -math.inf or fill <= -1e4 else None


def _comparison(node: fx.Node) -> Optional[str]:
    """arange(S) < t -> prefix, arange(S) >= t -> suffix, t broadcast over keys (mirrored when swapped)."""
    name = op_name(node)
    a, b = node.args[:2]
    key_len = Sizes.expr(tensor_of(node).shape[-1])
    if _is_key_index(a, key_len) and _broadcast_over_keys(b):
        op = name
    elif _is_key_index(b, key_len) and _broadcast_over_keys(a):
        op = _MIRRORED[name]
    else:
        return None
    return "prefix" if op in ("lt", "le") else "suffix"


def _is_key_index(node: Any, key_len: sympy.Expr) -> bool:
    """An increasing arange along the last (key) dim, possibly unsqueezed, expanded or converted."""
    while isinstance(node, fx.Node) and (op_name(node) in PASSTHROUGH_OPS | {"unsqueeze", "view", "reshape",
                                                                             "expand"} or _only_inserts_dims(node)):
        node = node.args[0]
    if not isinstance(node, fx.Node) or op_name(node) != "arange":
        return False
    return arg(node, 2, "step", 1) == 1 and Sizes.equal(Sizes.expr(tensor_of(node).shape[-1]), key_len)


def _broadcast_over_keys(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return _number(node) is not None
    value = tensor_of(node)
    return value is not None and (value.dim() == 0 or Sizes.expr(value.shape[-1]) == 1)


def key_padding_lengths(mask: torch.Tensor, batch: Optional[int] = None) -> torch.Tensor:
    """Valid key count per batch element, int32 [B], of a key-padding mask whose valid keys form a prefix.

    `mask` is [B|1, 1, 1, S] or [B|1, S], bool (True = attend) or additive float (0 = attend). `batch` expands a
    mask shared by the whole batch. Traceable, no host sync: the rewrite feeds the result to the kernel's
    `kv_lengths`."""
    if mask.dim() == 4 and (mask.shape[1] != 1 or mask.shape[2] != 1) or mask.dim() not in (2, 4):
        raise ValueError(f"key_padding_lengths: expected a [B, 1, 1, S] or [B, S] mask, got {tuple(mask.shape)}")
    valid = mask if mask.dtype == torch.bool else mask == 0
    lengths = valid.sum(dim=-1, dtype=torch.int32).reshape(mask.shape[0])
    return lengths if batch is None else lengths.expand(batch)


# --- sites -------------------------------------------------------------------------------------------------------
def analyze_site(raw: RawSite, sizes: Sizes, projections: TokenTracer) -> tuple[AttentionSite, list[str]]:
    """One site without its layout, and what keeps it from block-sparse rewriting (empty: nothing so far)."""
    q, k = tensor_of(raw.query), tensor_of(raw.key)
    q_shape, kv_shape = Sizes.shape(raw.query), Sizes.shape(raw.key)
    seq = q.dim() - 2
    where = block_of(raw.node)
    self_attention, relation = _self_attention(raw, sizes, projections, seq)
    mask, mask_reason = ("unsupported", "is_causal") if raw.is_causal else classify_mask(raw.mask, q_shape[0],
                                                                                           kv_shape[seq])
    site = AttentionSite(
        node=raw.node.name, kind=raw.kind, module_path=module_path(raw.node), block=where and where[1],
        stack=where and where[0], self_attention=self_attention, query=raw.query.name, key=raw.key.name,
        value=raw.value.name, q_shape=[Sizes.report(s) for s in q_shape],
        kv_shape=[Sizes.report(s) for s in kv_shape], head_dim=Sizes.report(q_shape[-1]),
        dtype=str(q.dtype).replace("torch.", ""), scale=raw.scale, mask=mask,
        mask_node=raw.mask.name if isinstance(raw.mask, fx.Node) else None, reason=relation)
    blockers = [] if self_attention else [relation]
    if q.dim() != 4 or k.dim() != 4:
        blockers.append("operands are not [B, H, S, D]")
    if mask_reason:
        blockers.append(mask_reason)
    if raw.dropout_p:
        blockers.append(f"dropout_p={raw.dropout_p}")
    if raw.graph_valued:
        blockers.append(f"{', '.join(raw.graph_valued)} computed in the graph")
    if raw.enable_gqa and not Sizes.equal(q_shape[1], kv_shape[1]):
        blockers.append("grouped-query heads")
    return site, blockers


def _self_attention(raw: RawSite, sizes: Sizes, tracer: TokenTracer, seq: int) -> tuple[bool, str]:
    try:
        q, k, v = (tracer.trace(x, (seq,)) for x in (raw.query, raw.key, raw.value))
    except TraceFailure as failure:
        return False, f"cannot trace the tokens of q/k/v: {failure}"
    describe = lambda segments: " + ".join(_describe_segment(s, tracer) for s in segments)  # noqa: E731
    q_len, kv_len = sizes.shape(raw.query)[seq], sizes.shape(raw.key)[seq]
    if not Sizes.equal(q_len, kv_len):
        if sizes.hinted(q_len) and sizes.hinted(kv_len) and sizes.hint(q_len) != sizes.hint(kv_len):
            return False, f"cross-attention: queries from {describe(q)}, keys/values from {describe(k)}"
        # data-dependent lengths sympy cannot relate (FramePack's prompt, cut to a length computed from its mask)
        return False, f"cannot prove the query and key lengths equal ({q_len} vs {kv_len}): queries from " \
                      f"{describe(q)}, keys/values from {describe(k)}"
    if not (tracer.same(q, k) and tracer.same(q, v)):
        return False, f"not self-attention over one token stream: q from {describe(q)}, k from {describe(k)}, " \
                      f"v from {describe(v)}"
    return True, f"self-attention over {describe(q)}"


def _describe_segment(segment, tracer: TokenTracer) -> str:
    """What a run of tokens comes from: a graph input, positions (a value no input reaches), or an op's output."""
    origin = segment.origin
    if origin.op == "placeholder":
        what = f"input {origin.name}"
    elif origin not in tracer.data_dependent:
        what = f"positions ({origin.name}, computed from no floating-point input)"
    else:
        what = origin.name
    picked = f" picked by {segment.selected_by.name}" if segment.selected_by is not None else ""
    return f"{what}[{Sizes.report(segment.start)}:{Sizes.report(segment.stop)}]{picked}"
