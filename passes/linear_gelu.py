"""A linear layer whose only reader is a tanh-GELU becomes one matrix product with the GELU in its epilogue.

Pattern: `gelu(linear(x, weight, bias), approximate="tanh")` (`torch._C._nn` or `torch.nn.functional`), the linear's
output read by nothing else, a bias given, x, weight, bias and the product all bfloat16 or all float16 (in float32
the epilogue's GELU measured less accurate than the pair's on the H100: tests/test_linear_gelu.py's GPU test failed
there; autocast's casts would show as mixed dtypes), in a graph that computes no gradient (`_addmm_activation` has no
derivative; the backend compiles grad-mode graphs before any rewrite, and a graph that turns grad mode on inside is
left alone).
Replacement: `linear_gelu(x, weight, bias)`: on CUDA `torch._addmm_activation(bias, x as [rows, in], weightᵀ,
use_gelu=True)` viewed back to x's leading dims, whose GELU is the tanh approximation there (cuBLASLt applies bias
and GELU to the accumulator before the store, where plain Inductor stores the product and runs GELU as its own
pointwise kernel; Inductor has no lowering for `_addmm_activation`, only a fallback to the ATen kernel, so nothing
splits it again); elsewhere the pair as it was (the CPU kernel's GELU is the exact one, not tanh).

Why: the feed-forward of Wan, HunyuanVideo, CogVideoX and LTX-Video is linear → tanh-GELU → linear, and the GELU
kernel reads and writes the whole hidden activation (Wan-1.3B 480p: 32,760 × 8,960 bf16, 12.6 ms a forward on the
H100 under Inductor, results/h100-2026-12-06/e2e-timeline-d476755.json); `benchmarks/linear_gelu.py` times the
two forms.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

LINEARS = (torch._C._nn.linear, F.linear)
GELUS = (torch._C._nn.gelu, F.gelu)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weightᵀ + bias, approximate="tanh"), on CUDA as one `_addmm_activation`."""
    if x.device.type != "cuda":
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    rows = x.reshape(-1, x.shape[-1])
    return torch._addmm_activation(bias, rows, weight.t(), use_gelu=True).view(*x.shape[:-1], weight.shape[0])


def _approximation(gelu: fx.Node) -> str:
    return gelu.kwargs.get("approximate", gelu.args[1] if len(gelu.args) > 1 else "none")


HALF_DTYPES = (torch.bfloat16, torch.float16)


def _dtype(value):
    example = value.meta.get("example_value") if isinstance(value, fx.Node) else None
    return example.dtype if isinstance(example, torch.Tensor) else None


def _fusable_linear(node) -> Optional[tuple]:
    """(input, weight, bias) of a half-precision linear with a bias and no other reader, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in LINEARS:
        return None
    args = {**dict(zip(("input", "weight", "bias"), node.args)), **node.kwargs}
    if args.get("bias") is None or len(node.users) != 1:
        return None
    operands = (args["input"], args["weight"], args["bias"])
    dtypes = {_dtype(node), *map(_dtype, operands)}
    return operands if len(dtypes) == 1 and dtypes.pop() in HALF_DTYPES else None


def fuse_linear_gelus(gm: fx.GraphModule) -> int:
    """Rewrite every linear + tanh-GELU pair of the pattern in place; returns how many."""
    if any(n.op == "call_function" and n.target is torch._C._set_grad_enabled and n.args[:1] == (True,)
           for n in gm.graph.nodes):
        return 0
    fused = 0
    for gelu in list(gm.graph.nodes):
        if gelu.op != "call_function" or gelu.target not in GELUS or _approximation(gelu) != "tanh":
            continue
        linear = gelu.args[0] if gelu.args else gelu.kwargs.get("input")
        operands = _fusable_linear(linear)
        if operands is None:
            continue
        with gm.graph.inserting_before(gelu):
            node = gm.graph.call_function(linear_gelu, operands)
        node.meta = dict(gelu.meta)
        gelu.replace_all_uses_with(node)
        gm.graph.erase_node(gelu)
        gm.graph.erase_node(linear)
        fused += 1
    if fused:
        gm.recompile()
    return fused
