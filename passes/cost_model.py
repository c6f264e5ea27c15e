"""Whether block-sparse attention pays at a site: one attention call, dense against sparse, estimated.

    dense  = attention FLOPs / dense rate
    sparse = attention FLOPs * density / sparse rate + planning + host

Attention FLOPs are 4·B·H·S²·D. Planning (block means, pooled map, top-k, mask, the q/k/v and output gathers) is a
fixed cost per site plus a cost per token and head; `host` is the CPU time of launching the planner and the op,
which a launch-bound forward pays in full and CUDA graphs (`mode="reduce-overhead"`) do not. A site is rewritten
when sparse is estimated at most `PAYS_BELOW` of dense; the report gives both estimates either way.

The rates are H100 measurements (2026-11-23, README "Results"): cuDNN dense 580 TF/s at head dim 128 (Wan-1.3B,
32,760 tokens) and 350 at 64; our kernel ~500 TF/s per visited block at 128 (benchmarks/kernel.py) and ~235 at head
dim 64 and 9,216 tokens (the small model of benchmarks/runtime_overhead.py: 93 µs a site at density 0.25);
planning plus permutation 400–630 µs (draft) and 700–800 µs (svg) per Wan-1.3B site, ~70 µs per small-model site
(benchmarks/site_breakdown.py, runtime_overhead.py). A sparse site's host time outside CUDA graphs: 0.86 ms (Draft)
to 1.0 ms (svg) a call on the small model (H100, c16d962: forced sparse 10.32 / 11.16 ms a forward against 5.19 with
its six sites dense, host-bound; README "The runtime's own overhead"), although the op alone costs 48 µs since its
direct launches (270–370 µs before). On the small model draft 0.25 ran at 1.24x of Inductor under CUDA graphs
(923fef8) and 0.52x without them (c16d962), and this model says so.
They are coarse on purpose and erring dense: a wrong "dense" costs the speedup the user asked for, a wrong "sparse"
makes the model slower than without us. `force_sparse=True` rewrites every eligible site whatever the estimate
(tests, CPU runs, the quality harness, whose model is small). On a CPU the op runs its pure-torch reference, so
sparse never pays there.

Whether the cache pays, the same way: a call whose block stack runs costs more with the cache on (the host reads the
timestep and the policy's probe in one transfer, and the graph runs as three pieces), measured on the small model
above when it skipped nothing: 3,149 µs a forward outside CUDA graphs (8,418 against Inductor's 5,269 in one run)
and 375 µs under them (2,877 against 2,502, two runs of that day). The cache is kept where the stack's estimated
time, its matrix products and attention (dense, as captured) at `MATMUL_TFLOPS`, is at least `CACHE_PAYS_ABOVE` times that: a generation
that skips nothing then loses at most 1 / CACHE_PAYS_ABOVE. The rate is a fast one, so the estimate errs towards no
cache. On a CPU the host read stalls no device and the cache is kept; `force_cache=True` keeps it anywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.fx as fx

from dit_compiler.patterns.graph import arg, op_name, tensor_of

PAYS_BELOW = 0.8  # sparse must be estimated at most this share of dense


@dataclass(frozen=True)
class CudaCosts:
    dense_tflops: dict  # head dim -> cuDNN rate at long sequences
    sparse_tflops: dict  # head dim -> our kernel's rate per visited block
    short_sequence: int  # below this many tokens our kernel's rate falls in proportion (few CTAs to fill the GPU)
    site_fixed_us: float  # planning kernels' latency per site, whatever the size
    planning_ns_per_token_head: dict  # planner -> GPU time per token and head
    host_us: float  # CPU time of one site's planning and op launches, outside CUDA graphs


H100 = CudaCosts(dense_tflops={64: 350.0, 128: 580.0}, sparse_tflops={64: 300.0, 128: 500.0}, short_sequence=12000,
                 site_fixed_us=30.0, host_us=900.0,
                 # dual: 589 µs planning + 107 µs permutation a Wan-1.3B site (2a62592, before its block means
                 # stopped gathering q and k), ~1.8 ns a token-head; rounded up (erring dense)
                 # svg-shift: svg's until measured (it drops svg's four gathers, 284 of ~523 µs a site on the H100,
                 # results/h100-2026-12-05/e2e-svg-profile-9b6ede9.json), erring dense
                 planning_ns_per_token_head={"draft": 1.2, "svg": 1.8, "dual": 2.4, "svg-shift": 1.8})


@dataclass(frozen=True)
class Estimate:
    dense_us: float
    sparse_us: float

    @property
    def pays(self) -> bool:
        return self.sparse_us <= PAYS_BELOW * self.dense_us


def _traced_size(size) -> int:
    """A size as traced: a symbolic size's hint (the size Dynamo saw), 0 without one (then nothing pays)."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return 0 if hint is None else int(hint)
    return int(size)


def estimate(shape, density: float, planner: str, cuda_graphs: bool, costs: CudaCosts = H100) -> Estimate:
    """Dense and sparse time of one attention call with q [B, H, S, D] on a CUDA device."""
    batch, heads, seq, head_dim = (_traced_size(s) for s in shape)
    flops = 4.0 * batch * heads * seq * seq * head_dim
    if flops == 0:
        return Estimate(0.0, 1.0)
    dense = flops / (costs.dense_tflops[head_dim] * 1e12) * 1e6
    kernel = flops * density / (costs.sparse_tflops[head_dim] * 1e12 * min(1.0, seq / costs.short_sequence)) * 1e6
    planning = costs.site_fixed_us + batch * heads * seq * costs.planning_ns_per_token_head[planner] * 1e-3
    return Estimate(dense, kernel + planning + (0.0 if cuda_graphs else costs.host_us))


def why_sparse_does_not_pay(shape, density: float, planner: str, device: torch.device, cuda_graphs: bool
                            ) -> tuple[Optional[str], str]:
    """(reason to stay dense or None, the estimate in words for the report)."""
    if device.type != "cuda":
        return (f"on {device.type} the block-sparse op runs its pure-torch reference, slower than dense SDPA "
                "(force_sparse=True rewrites anyway)"), ""
    guess = estimate(shape, density, planner, cuda_graphs)
    words = f"estimated {guess.sparse_us:.0f} µs sparse vs {guess.dense_us:.0f} µs dense a call"
    if guess.pays:
        return None, words
    return f"sparse does not pay at this size: {words} (force_sparse=True rewrites anyway)", words


MATMUL_TFLOPS = 600.0  # bf16 matrix products and attention on an H100, a fast rate (erring towards no cache)
CACHE_COST_US = {False: 3149.0, True: 375.0}  # CUDA graphs? -> the cache's cost a computed call (docstring)
CACHE_PAYS_ABOVE = 20.0

_PRODUCTS = {"matmul": ("input", 0), "bmm": ("input", 0), "mm": ("input", 0),  # (name, position) of the left
             "addmm": ("mat1", 1), "baddbmm": ("batch1", 1)}                     # factor, whose last dim is summed


def _numel(t: torch.Tensor) -> int:
    return math.prod(_traced_size(s) for s in t.shape)


def node_flops(node: fx.Node) -> float:
    """FLOPs (2 per multiply-add) of one matrix product or attention call, from its traced shapes; 0 for others."""
    out, op = tensor_of(node), op_name(node)
    if out is None:
        return 0.0
    if op == "linear":
        weight = tensor_of(arg(node, 1, "weight"))
        return 0.0 if weight is None else 2.0 * _numel(out) * _traced_size(weight.shape[-1])
    if op in _PRODUCTS:
        name, position = _PRODUCTS[op]
        left = tensor_of(arg(node, position, name))
        return 0.0 if left is None else 2.0 * _numel(out) * _traced_size(left.shape[-1])
    if op == "scaled_dot_product_attention":
        query, key = tensor_of(arg(node, 0, "query")), tensor_of(arg(node, 1, "key"))
        if query is None or key is None:
            return 0.0
        return 2.0 * (_numel(query) + _numel(out)) * _traced_size(key.shape[-2])
    return 0.0


def why_cache_does_not_pay(stack: Iterable[fx.Node], device: torch.device, cuda_graphs: bool
                           ) -> tuple[Optional[str], str]:
    """(reason to run without the cache or None, the estimate in words for the report) for the block stack's nodes."""
    if device.type != "cuda":
        return None, ""
    stack_us = sum(node_flops(n) for n in stack) / (MATMUL_TFLOPS * 1e12) * 1e6
    cost_us = CACHE_COST_US[cuda_graphs]
    words = (f"block stack estimated at {stack_us:.0f} µs a call, the cache's cost {cost_us:.0f} µs a computed call "
             f"{'under' if cuda_graphs else 'outside'} CUDA graphs")
    if stack_us >= CACHE_PAYS_ABOVE * cost_us:
        return None, words
    return (f"cache does not pay at this size: {words}, under {CACHE_PAYS_ABOVE:.0f}x (force_cache=True caches "
            "anyway)"), words
