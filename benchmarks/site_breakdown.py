"""One sparse-attention site taken apart, in µs: planning, permutation, kernel, against dense, in one run.

One layer of the Wan2.1-1.3B shape around self-attention (bf16, 12 heads x 128, grid 21x30x52 = 32,760 tokens, no
text), as diffusers' WanTransformerBlock has it up to its first residual add: latent [1, 16, F, 2H, 2W] -> patch
embedding -> h; x = LayerNorm(h, no affine) * (1 + scale) + shift (modulation [1, 1, 1536], float32) -> q, k, v
projections -> RMS norm of q and k across heads -> RoPE (float32 tables) -> attention -> output projection ->
h + gate * out. Compiled with Inductor (fullgraph) in this process with each attention variant:

  dense       F.scaled_dot_product_attention (PyTorch's backend choice for these shapes)
  site        the rewrite's `sparse_attention`: plan, permute, mask, kernel, restore the order
  kept        (planners that carry a choice: svg) the same with the head classes kept from an earlier call, as
              `plan_every` > 1 plans between samples (passes/plan_reuse.py): the sampled-row kernel skipped
  fixed       the same plan's order and mask computed once beforehand: permute, kernel, restore
  unpermuted  the same mask with tokens left in place: the kernel alone in the layer (timing only)

planning = site - fixed (kept planning = kept - fixed); permutation = fixed - unpermuted (a gather Inductor fuses
into the RoPE or the output's transpose is charged only what it adds to that kernel). kernel: the op alone on the planned inputs; FlexAttention
with the identical block mask as a peer. "site share" is (planning + permutation) / kernel, the figure the planning
target bounds (draft 10%, svg 15% at density 0.1). Op host cost: CPU µs per call of
`torch.ops.vsparse.block_sparse_attention` (with the query-block schedule given, as the rewrite calls it, without, and
as svg calls it, with a token order and reordered heads) and of SDPA on a tiny problem, enqueued back to back (no
syncs), so the GPU never limits them; also with the op's direct launches off (Triton's JITFunction.run / autotuner
binding every call, as before they existed). Medians of `triton.testing.do_bench`; random inputs (planning cost does not
depend on values, but svg's permutation cost depends on how many heads it classes temporal: `--temporal-heads N`
adds a fixed structure to q and k that makes the last N heads temporal, head_structure). `--device cpu` with a small
`--grid` is a smoke run (tests/test_site_breakdown.py): wall-clock medians, no FlexAttention, no op host cost.

    python benchmarks/site_breakdown.py --out site.json
    python benchmarks/site_breakdown.py --planners draft --densities 0.1
    python benchmarks/site_breakdown.py --host-only --out host.json   # the op host cost alone (seconds)
    python benchmarks/site_breakdown.py --planners svg --densities 0.1 --temporal-heads 6   # 6 of 12 heads moved
    python benchmarks/site_breakdown.py --planners draft --densities 0.1 --profile   # + each variant's kernels,
        # and planning / permutation from their GPU times
    TRITON_INTERPRET=1 python benchmarks/site_breakdown.py --device cpu --grid 1 16 32 --planners draft \\
        --densities 0.5 --budget-ms 1   # smoke run
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import platform
import pstats
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import dit_compiler.kernels  # noqa: F401  registers torch.ops.vsparse
from dit_compiler.kernels import attention_op, block_mask, triton_block_sparse
from dit_compiler.kernels.attention_op import head_orders
from dit_compiler.passes.planners import PLANNERS
from dit_compiler.passes.sparse_attention import _reorder, _to_plan_order, planner_kv_unit, sparse_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package: its siblings by name
from profiling import kernel_table  # noqa: E402

HEADS, HEAD_DIM, CHANNELS, BLOCK, GRID = 12, 128, 16, 128, (21, 30, 52)
STRENGTH = 8.0  # --temporal-heads: the logit a query gains on the keys of its own frame or position
ATTENTION_KERNELS = ("_block_sparse_attention_kernel", "vsparse::block_sparse_attention")  # CUDA, CPU profiles


class Attention(torch.nn.Module):
    """One attention variant over q, k, v [B, H, S, D]; plan tensors are buffers, so Inductor sees them as inputs."""

    def __init__(self, variant: str, planner: str, density: float, grid: tuple, constants: dict, plan: dict,
                 kv_unit=None):
        super().__init__()
        self.variant, self.planner, self.density, self.grid, self.kv_unit = variant, planner, density, grid, kv_unit
        self.constant_names = list(constants)
        for name, tensor in {**{f"c_{n}": t for n, t in constants.items()}, **plan}.items():
            self.register_buffer(name, tensor)

    def forward(self, q, k, v):
        scale = HEAD_DIM ** -0.5
        if self.variant == "dense":
            return F.scaled_dot_product_attention(q, k, v)
        if self.variant in ("site", "kept"):
            constants = {n: getattr(self, f"c_{n}") for n in self.constant_names}
            carried = (self.choice, torch.zeros((), dtype=torch.bool, device=q.device)) if self.variant == "kept" \
                else None
            return sparse_attention(q, k, v, None, None, constants, (*self.grid, 0, 0), planner=self.planner,
                                    density=self.density, block_size=BLOCK, scale=scale, carried=carried)[0]
        fixed = self.variant == "fixed"
        # A plan may leave tokens in place, or have the op move the heads it names (then the op's moves count as
        # permutation: fixed - unpermuted).
        reorders = fixed and self.perm is not None and self.reordered is None
        if reorders:
            q, k, v = (_to_plan_order(t, self.perm, self.inverse) for t in (q, k, v))
        moves = fixed and self.reordered is not None
        # The plan's query-block schedule too: without it the op would sort one (a ~17 µs sort on the H100) that
        # the site does not pay, and the baselines would flatter planning.
        out = torch.ops.vsparse.block_sparse_attention(q, k, v, self.num, self.idx, scale, BLOCK, None, self.order,
                                                       kv_unit=self.kv_unit, token_order=self.perm if moves else None,
                                                       reordered_heads=self.reordered if moves else None)
        return _reorder(out, self.inverse) if reorders else out


def head_structure(grid: tuple, temporal_heads: int, device: torch.device) -> torch.Tensor:
    """[1, S, HEADS, HEAD_DIM] added to q and k: the last `temporal_heads` heads attend to their own position in
    every frame, the others within their own frame. Random weights leave svg's classes near ties (the moved-head
    count, and the permutation's cost with it, flipped from 6 to 0 of 12 between two runs of one site); this fixes
    the count. A query's scaled logit gains STRENGTH on the keys sharing its position (or frame): 8 standard
    deviations of the random-weight logits (q and k are RMS-normed: q.k / sqrt(D) has a spread of about 1)."""
    frames, height, width = grid
    g = torch.Generator().manual_seed(1)
    amplitude = (STRENGTH * HEAD_DIM ** 0.5) ** 0.5  # q.k / sqrt(D) gains STRENGTH for unit vectors e: q, k += a e
    frame = torch.arange(frames).repeat_interleave(height * width)
    position = torch.arange(height * width).repeat(frames)
    heads = []
    for head in range(HEADS):
        temporal = head >= HEADS - temporal_heads
        keys = position if temporal else frame
        vectors = F.normalize(torch.randn(int(keys.max()) + 1, HEAD_DIM, generator=g), dim=-1)
        heads.append(amplitude * vectors[keys])
    return torch.stack(heads, 1)[None].to(device)


class Layer(torch.nn.Module):
    """Wan's block around self-attention (diffusers' WanTransformerBlock up to its first residual add): patch
    embedding, x = LayerNorm(h) * (1 + scale) + shift, q/k/v projections, RMS norm across heads, RoPE, attention,
    output projection, h + gate * out. The patch embedding gives the backend's recognizers the token grid."""

    def __init__(self, attention: torch.nn.Module, grid: tuple, device: torch.device, dtype: torch.dtype,
                 temporal_heads: Optional[int] = None):
        super().__init__()
        dim = HEADS * HEAD_DIM
        self.patch = torch.nn.Conv3d(CHANNELS, dim, (1, 2, 2), stride=(1, 2, 2))
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = torch.nn.RMSNorm(dim, eps=1e-6), torch.nn.RMSNorm(dim, eps=1e-6)
        self.to(device, dtype)
        # Wan keeps the modulation (shift, scale, gate [1, 1, C], broadcast over tokens) and RoPE tables in float32.
        for name in ("shift", "scale", "gate"):
            self.register_buffer(name, torch.randn(1, 1, dim, device=device) / dim ** 0.5)
        angles = torch.randn(1, math.prod(grid), 1, HEAD_DIM // 2, device=device)
        self.register_buffer("cos", angles.cos().repeat_interleave(2, -1))
        self.register_buffer("sin", angles.sin().repeat_interleave(2, -1))
        self.register_buffer("structure", None if temporal_heads is None
                             else head_structure(grid, temporal_heads, device).to(dtype))
        self.attention = attention

    def tokens(self, latent):
        return self.patch(latent).flatten(2).transpose(1, 2)

    def rope(self, x):  # diffusers' Wan apply_rotary_emb, on [B, S, H, D]
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = self.cos[..., 0::2], self.sin[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out

    def qkv_heads(self, h):
        x = (self.norm1(h.float()) * (1 + self.scale) + self.shift).type_as(h)
        q, k, v = self.norm_q(self.to_q(x)), self.norm_k(self.to_k(x)), self.to_v(x)
        q, k, v = (t.unflatten(2, (HEADS, HEAD_DIM)) for t in (q, k, v))
        q, k = self.rope(q), self.rope(k)
        if self.structure is not None:
            q, k = q + self.structure, k + self.structure
        return tuple(t.transpose(1, 2) for t in (q, k, v))

    def forward(self, latent):
        h = self.tokens(latent)
        out = self.attention(*self.qkv_heads(h))
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return (h.float() + out * self.gate).type_as(h)


def bench(fn, budget_ms: float, device: torch.device) -> float:
    """Median ms of `fn`: do_bench on a GPU; on a CPU (the smoke run) wall time of calls for `budget_ms`."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=max(25.0, budget_ms / 4), rep=budget_ms, return_mode="median")
    times, deadline = [], time.perf_counter() + budget_ms / 1e3
    while not times or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def compiled_layer(layer: torch.nn.Module, latent: torch.Tensor, **how):
    """`layer` compiled (fullgraph) and called once. Every variant recompiles Layer.forward: resetting Dynamo first
    keeps its recompile limit from sending a variant to eager."""
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, **how)
    with torch.no_grad():
        compiled(latent)
    return compiled


def host_us_per_call(fn, calls: int = 2000, batches: int = 5) -> float:
    """CPU µs a call of `fn` enqueued back to back: the median over `batches` batches (one host hiccup, which
    moved a single timing by 2x between two runs on one machine, stays out of it)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls // batches):
            fn()
        per_call.append((time.perf_counter() - start) / (calls // batches) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def op_host_cost() -> dict:
    """CPU µs per call of our op and of SDPA, and where our op's go (cProfile, the 15 costliest functions)."""
    q, k, v = (torch.randn(1, 1, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    num = torch.full((1, 1, 2), 2, dtype=torch.int32, device="cuda")
    idx = torch.arange(2, dtype=torch.int32, device="cuda").expand(1, 1, 2, 2).contiguous()
    order = block_mask.heaviest_first(num)
    op = torch.ops.vsparse.block_sparse_attention

    def ours():  # as the rewrite calls it: the planner gives the kernel's schedule
        return op(q, k, v, num, idx, 0.125, 128, None, order)

    # svg's call: one token order, the temporal heads' rows moved (two heads, one reordered)
    q2, k2, v2 = (torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    token_order = torch.randperm(256, device="cuda")
    reordered = torch.tensor([[True, False]], device="cuda")
    result = {"block_sparse_attention_us": round(host_us_per_call(ours), 1),
              "block_sparse_attention_sorting_us": round(host_us_per_call(
                  lambda: op(q, k, v, num, idx, 0.125, 128, None)), 1),
              "block_sparse_attention_reordering_us": round(host_us_per_call(
                  lambda: op(q2, k2, v2, num, idx, 0.125, 128, None, order, None, token_order, reordered)), 1),
              "sdpa_us": round(host_us_per_call(lambda: F.scaled_dot_product_attention(q, k, v)), 1),
              "direct_launches": len(triton_block_sparse._launches)}
    result["layers"] = host_layers(ours, (q, k, v, num, idx, 0.125, 128, None, order))
    direct = triton_block_sparse._direct_launch
    triton_block_sparse._direct_launch = False
    result["block_sparse_attention_normal_path_us"] = round(host_us_per_call(ours), 1)
    triton_block_sparse._direct_launch = direct
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [ours() for _ in range(500)])
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    result["profile"] = text.getvalue()
    return result


def host_layers(ours, args) -> dict:
    """Where the op's host time goes on the recorded path, each layer timed alone (µs a call): the whole op
    (dispatcher, autograd kernel, Dynamo guard, launch key, recorded launch), the CUDA key's kernel called directly,
    the launch key, the recorded launch, an output's allocation, and the recorded launch through Triton's runner
    (descriptors rebuilt, CUtensorMaps encoded per call: the path before triton_launch.Relaunch)."""
    q, k, v, num, idx, scale, block_size, kv_lengths, order = args
    key = triton_block_sparse.launch_key(q, k, v, num, idx, block_size, kv_lengths, order)
    recorded = triton_block_sparse.recorded_launch(key)
    if recorded is None:
        return {"recorded": False}
    out = ours()
    layers = {"recorded": True, "relaunch_direct": recorded.launch.direct,
              "op_us": host_us_per_call(ours),
              "cuda_kernel_us": host_us_per_call(lambda: attention_op._cuda_kernel(*args)),
              "launch_key_us": host_us_per_call(lambda: triton_block_sparse.launch_key(
                  q, k, v, num, idx, block_size, kv_lengths, order)),
              "recorded_launch_us": host_us_per_call(lambda: recorded(q, k, v, num, idx, scale, kv_lengths, order)),
              "empty_strided_us": host_us_per_call(lambda: torch.empty_strided(out.shape, out.stride(),
                                                                               dtype=out.dtype, device=out.device))}
    c_launch, recorded.launch.c_launch = recorded.launch.c_launch, None
    layers["op_through_runner_us"] = host_us_per_call(ours)
    recorded.launch.c_launch = c_launch
    return {name: round(x, 1) if isinstance(x, float) else x for name, x in layers.items()}


def _kernel_kind(name: str) -> str:
    """A kernel's name without the index Inductor appends (`..._view_2` in one compile is `..._view_5` in another)."""
    return re.sub(r"_\d+$", "", name)


def attributable_us(kernels: dict) -> dict:
    """Per variant, the GPU µs of its kernels that planning and permutation may have added: all but the attention
    kernel, whose time differs between the compiled variants by a few % (more than planning costs) though it runs the
    same mask, and but the kinds of kernel every variant runs (`_kernel_kind`): the layer's projections, norms and
    convolution, the same work in each, whose run-to-run spread (the projections' 801-816 µs between the variants of
    one H100 run at f902839) summed into the differences as if it were planning."""
    shared = set.intersection(*({_kernel_kind(name) for name, _, _ in table} for table in kernels.values()))
    return {variant: sum(us for name, _, us in table
                         if name not in ATTENTION_KERNELS and _kernel_kind(name) not in shared)
            for variant, table in kernels.items()}


def measure_site(planner: str, density: float, latent: torch.Tensor, grid: tuple, budget_ms: float,
                 dense_ms: float, profile: bool = False, temporal_heads: Optional[int] = None) -> dict:
    device, seq, layout = latent.device, math.prod(grid), (*grid, 0, 0)
    chosen = PLANNERS[planner]
    constants = chosen.constants(layout, BLOCK, density, device)
    torch.manual_seed(0)
    layer = Layer(Attention("dense", planner, density, grid, {}, {}), grid, device, latent.dtype, temporal_heads)
    with torch.no_grad():
        q, k, v = layer.qkv_heads(layer.tokens(latent))
        plan = chosen.plan(q, k, v, constants, layout, block_size=BLOCK, density=density, scale=HEAD_DIM ** -0.5)
        perm = plan.perm if plan.reordered_heads is None else head_orders(plan.perm, plan.reordered_heads)
        qp, kp, vp = (t if perm is None else _reorder(t, perm).contiguous() for t in (q, k, v))
        num, idx = chosen.mask(qp, kp, plan, constants, layout, block_size=BLOCK, density=density,
                               scale=HEAD_DIM ** -0.5)
    fixed = {"perm": plan.perm, "inverse": plan.inverse, "reordered": plan.reordered_heads, "num": num, "idx": idx,
             "order": plan.q_block_order, "choice": plan.choice}
    kv_unit = planner_kv_unit(planner)
    times, kernels = {}, {}
    kept = ("kept",) if getattr(chosen, "carries_choice", False) else ()
    for variant in ("site", *kept, "fixed", "unpermuted"):
        layer.attention = Attention(variant, planner, density, grid, constants, fixed, kv_unit)
        compiled = compiled_layer(layer, latent)
        with torch.no_grad():
            times[variant] = bench(lambda: compiled(latent), budget_ms, device)
        if profile:
            kernels[variant] = kernel_table(lambda: compiled(latent), device)
    op = torch.ops.vsparse.block_sparse_attention
    kernel = bench(lambda: op(qp, kp, vp, num, idx, HEAD_DIM ** -0.5, BLOCK, None, plan.q_block_order,
                              kv_unit=kv_unit), budget_ms, device)
    flex_ms = flex_error = None
    # GPU only: eager flex_attention computes dense attention, whatever the block indices say, and a CPU compile of
    # it would double the smoke run. A BlockMask holds block ids only: no peer for key blocks at other starts.
    if device.type == "cuda" and kv_unit is None:
        flex = torch.compile(flex_attention, dynamic=False)
        flex_num = num.expand(1, HEADS, -1).contiguous()
        flex_idx = idx.expand(1, HEADS, -1, -1).contiguous()
        mask = BlockMask.from_kv_blocks(torch.zeros_like(flex_num), flex_idx, flex_num, flex_idx, BLOCK_SIZE=BLOCK,
                                        seq_lengths=(seq, seq))
        flex_ms = bench(lambda: flex(qp, kp, vp, block_mask=mask), budget_ms, device)
        ours = op(qp, kp, vp, num, idx, HEAD_DIM ** -0.5, BLOCK, None).float()
        flex_error = round(float((flex(qp, kp, vp, block_mask=mask).float() - ours).norm() / ours.norm()), 5)
    planning, permutation = times["site"] - times["fixed"], times["fixed"] - times["unpermuted"]
    # Heads whose rows the plan moves: svg's count follows its classes, which on random weights are near ties that
    # a rounding difference can flip, and each moved head costs its copies (README, "End to end").
    moved = 0 if plan.perm is None else HEADS if plan.reordered_heads is None else int(plan.reordered_heads.sum())
    row = {"planner": planner, "density": density, "visited": round(float(num.float().mean()) / idx.shape[-1], 4),
           "temporal_heads": temporal_heads, "moved_heads": moved,
           "layer_dense_ms": round(dense_ms, 4), "layer_site_ms": round(times["site"], 4),
           **({"layer_kept_ms": round(times["kept"], 4)} if kept else {}),
           "layer_fixed_ms": round(times["fixed"], 4), "layer_unpermuted_ms": round(times["unpermuted"], 4),
           "planning_us": round(planning * 1e3, 1), "permutation_us": round(permutation * 1e3, 1),
           "kernel_us": round(kernel * 1e3, 1), "flex_us": flex_ms and round(flex_ms * 1e3, 1),
           "flex_vs_ours_rel_error": flex_error,
           "site_share": round((planning + permutation) / kernel, 3),
           # A fixed order (Draft's windows) is hoisted out of the sites in a whole model (stack_token_order.py: one
           # gather where the residual stream enters the stack): a site there pays its planning only.
           **({"site_share_hoisted": round(planning / kernel, 3)} if chosen.fixed_order else {}),
           **({"planning_kept_us": round((times["kept"] - times["fixed"]) * 1e3, 1),
               "site_share_kept": round((times["kept"] - times["unpermuted"]) / kernel, 3)} if kept else {}),
           "layer_speedup": round(dense_ms / times["site"], 3)}
    print(json.dumps(row), flush=True)
    if profile:
        others = attributable_us(kernels)
        row["planning_us_by_kernels"] = round(others["site"] - others["fixed"], 1)
        row["permutation_us_by_kernels"] = round(others["fixed"] - others["unpermuted"], 1)
        row["site_share_by_kernels"] = round((others["site"] - others["unpermuted"]) / (kernel * 1e3), 3)
        if chosen.fixed_order:
            row["site_share_hoisted_by_kernels"] = round((others["site"] - others["fixed"]) / (kernel * 1e3), 3)
        if kept:
            row["planning_kept_us_by_kernels"] = round(others["kept"] - others["fixed"], 1)
            row["site_share_kept_by_kernels"] = round((others["kept"] - others["unpermuted"]) / (kernel * 1e3), 3)
        # ...and the attention kernel's own time per variant: with moved heads it is another compile (svg's two
        # descriptor sets), whose extra time the shares above do not charge (kernels/NOTES.md, 77d4238).
        row["attention_us_by_kernels"] = {variant: round(sum(us for name, _, us in table if name in ATTENTION_KERNELS),
                                                         1) for variant, table in kernels.items()}
        row["kernels"] = kernels
        for variant, table in kernels.items():
            print(f"{planner} {density} {variant}: launches and µs per layer call", flush=True)
            for name, launches, us in table:
                print(f"  {us:9.1f} {launches:6.2f}  {name[:150]}", flush=True)
    return row


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--planners", nargs="+", default=sorted(PLANNERS))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.15, 0.1])
    parser.add_argument("--budget-ms", type=float, default=200.0)
    parser.add_argument("--host-only", action="store_true", help="only the op host cost (no layers, no compiles)")
    parser.add_argument("--grid", nargs=3, type=int, default=list(GRID), metavar=("F", "H", "W"),
                        help="token grid (the latent is [1, 16, F, 2H, 2W])")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (wall-clock timings, no op host cost)")
    parser.add_argument("--profile", action="store_true",
                        help="also record each layer variant's kernels (torch.profiler) in the report")
    parser.add_argument("--temporal-heads", type=int, metavar="N",
                        help="structured q and k: the last N heads temporal, the others spatial (head_structure); "
                             "default: the random layer's own, near-tie classes")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.temporal_heads is not None and not 0 <= args.temporal_heads <= HEADS:
        parser.error(f"--temporal-heads must be in 0..{HEADS}, got {args.temporal_heads}")
    device = torch.device(args.device)
    if args.host_only:
        host = op_host_cost()
        print(json.dumps({k: v for k, v in host.items() if k != "profile"}), flush=True)
        print(host["profile"], flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "op_host": host}, f, indent=2)
        return
    grid = tuple(args.grid)
    seq = math.prod(grid)
    latent = torch.randn(1, CHANNELS, grid[0], 2 * grid[1], 2 * grid[2], device=device, dtype=torch.bfloat16)
    torch.manual_seed(0)
    dense_layer = compiled_layer(Layer(Attention("dense", "", 1.0, grid, {}, {}), grid, device, latent.dtype,
                                       args.temporal_heads), latent)
    with torch.no_grad():
        dense_ms = bench(lambda: dense_layer(latent), args.budget_ms, device)
    print(f"dense layer {dense_ms:.3f} ms", flush=True)
    rows = [measure_site(p, d, latent, grid, args.budget_ms, dense_ms, args.profile, args.temporal_heads)
            for p in args.planners for d in args.densities]
    host = op_host_cost() if device.type == "cuda" else None
    if host:
        print(json.dumps({k: v for k, v in host.items() if k != "profile"}), flush=True)
        print(host["profile"], flush=True)
    print(f"\n{device_name(device)}, torch {torch.__version__}, triton {triton.__version__}; one layer "
          f"1x{seq}x{HEADS * HEAD_DIM}, dense {dense_ms * 1e3:.0f} µs\n")
    print("| planner | density | heads moved | planning µs | permutation µs | kernel µs | "
          "(planning + permutation) / kernel | FlexAttention µs | layer: sparse / dense µs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['planner']} | {r['density']} | {r['moved_heads']} of {HEADS} | {r['planning_us']} | "
              f"{r['permutation_us']} | {r['kernel_us']} | "
              f"{r['site_share']:.1%} | {r['flex_us']} | {r['layer_site_ms'] * 1e3:.0f} / {dense_ms * 1e3:.0f} |")
    for r in rows:
        if "site_share_hoisted" in r:
            by_kernels = r.get("site_share_hoisted_by_kernels")
            print(f"{r['planner']} {r['density']}: planning / kernel {r['site_share_hoisted']:.1%}"
                  + (f" ({by_kernels:.1%} from the kernel tables)" if by_kernels is not None else "")
                  + ", the share in a whole model, where its fixed order is hoisted out of the sites "
                    "(passes/stack_token_order.py)")
    if args.profile:
        print("\nFrom the kernel tables (GPU time of the kernels a variant does not share by name with every other, "
              "the attention kernel left out; then the attention kernel's own in each variant):\n")
        print("| planner | density | planning µs | permutation µs | (planning + permutation) / kernel | "
              "attention kernel µs: site / fixed / unpermuted |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            attention = r["attention_us_by_kernels"]
            print(f"| {r['planner']} | {r['density']} | {r['planning_us_by_kernels']} | "
                  f"{r['permutation_us_by_kernels']} | {r['site_share_by_kernels']:.1%} | {attention['site']} / "
                  f"{attention['fixed']} / {attention['unpermuted']} |")
    if host:
        print(f"\nop host cost per call: block_sparse_attention {host['block_sparse_attention_us']} µs with the "
              f"schedule given ({host['block_sparse_attention_sorting_us']} µs sorting it itself, "
              f"{host['block_sparse_attention_reordering_us']} µs with svg's reordered heads, "
              f"{host['block_sparse_attention_normal_path_us']} µs without direct launches), "
              f"SDPA {host['sdpa_us']} µs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
                       "grid": list(grid), "dense_layer_ms": dense_ms, "sites": rows, "op_host": host}, f, indent=2)


if __name__ == "__main__":
    main()
