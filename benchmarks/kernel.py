"""Block-sparse attention and token-permutation kernels against their peers, in one run (docs/DESIGN.md, "Measuring").

    python benchmarks/kernel.py --out results.json               # Wan-1.3B and Wan-14B, all densities and masks
    python benchmarks/kernel.py --shapes wan1.3b --sweep         # also time every fixed kernel config

Per shape (bf16, D=128, 128-token blocks): cuDNN and flash SDPA (dense), then for each mask family (random: every
row the same count; banded; optional ragged: per-pair coin flips, 10% empty rows) and density: ours (autotuned once,
cached) and FlexAttention (torch.compile) with the identical BlockMask (listed blocks passed as full blocks).
Effective TFLOP/s = 4 * sum over query rows of visible keys * D / time. A correctness line per case compares ours with
FlexAttention's output (and, at density 1, with cuDNN's). Then the permutation kernel's GB/s against a device copy,
and Sparse VideoGen's sampled-row measurement (`sampled_rows_attention`, svg's SAMPLE_ROWS rows under the full,
spatial and temporal masks) against the same arithmetic in torch compiled by Inductor (the formula svg used before
the op), and the planners' block ranking (`descending_order` over Draft's pooled logits, [H, n, n] with n the
shape's blocks) against Inductor's and ATen's stable sorts, and the block means of q (`block_means`: Draft's pooled
map in q's own order, dual's in a permutation) against Inductor's reduction of the same formula. Prints a table and
writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import dit_compiler.kernels  # noqa: F401  registers torch.ops.vsparse
from dit_compiler.kernels import row_order, triton_block_means, triton_block_sparse, triton_row_order, \
    triton_sampled_rows
from dit_compiler.kernels.block_means import consecutive_block_means, reference_block_means
from dit_compiler.passes.planners.svg import position_major_permutation, svg_constants
from dit_compiler.kernels.triton_permute import triton_permute_tokens
from dit_compiler.kernels import block_mask
from dit_compiler.kernels.masks.banded import banded_block_mask
from dit_compiler.kernels.masks.random import random_block_mask

SHAPES = {"wan1.3b": (1, 12, 32760, 128), "wan14b": (1, 40, 75600, 128)}
# Wan's token grids (frames, height, width) behind those lengths, for the permutation benchmark.
GRIDS = {"wan1.3b": (21, 30, 52), "wan14b": (21, 45, 80)}
SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in triton_block_sparse.CONFIGS]
# (BLOCK_M, BLOCK_N, warps, stages) of the sampled-row kernel tried with --sweep, the default first.
SAMPLED_ROWS_SWEEP = [triton_sampled_rows.CONFIG, (64, 64, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3), (64, 128, 8, 3),
                      (128, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 2)]
SAMPLED_ROWS_SPLITS = [4, 8, 12, 22, 33, 44, 66]  # key splits tried with --sweep (default: ~4 programs per SM)


def bench(fn, budget_ms: float) -> float:
    return triton.testing.do_bench(fn, warmup=max(25.0, budget_ms / 4), rep=budget_ms, return_mode="median")


def visible_pairs(num, idx, q_len, kv_len, block_size, batch, heads) -> int:
    """Sum over query rows of keys they attend (partial tail blocks counted exactly)."""
    nq = num.shape[-1]
    nkv = idx.shape[-1]
    num = num.expand(batch, heads, nq).long()
    idx = idx.expand(batch, heads, nq, nkv).long()
    listed = torch.arange(nkv, device=num.device) < num[..., None]
    key_sizes = torch.full((nkv,), block_size, device=num.device)
    key_sizes[-1] = kv_len - (nkv - 1) * block_size
    keys = (key_sizes[idx] * listed).sum(-1)  # [B, H, nq]
    q_sizes = torch.full((nq,), block_size, device=num.device)
    q_sizes[-1] = q_len - (nq - 1) * block_size
    return int((keys * q_sizes).sum())


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_attention(name, shape, densities, families, budget_ms, sweep, rows, checks):
    batch, heads, seq, dim = shape
    bs = 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    scale = dim ** -0.5
    dense_flops = 4 * batch * heads * seq * seq * dim

    def add(impl, family, density, ms, flops, note=""):
        rows.append(dict(shape=name, impl=impl, mask=family, density=density, ms=ms, tflops=flops / ms / 1e9,
                         note=note))
        print(f"{name:8s} {impl:22s} {family:7s} {density:5.2f} {ms:9.3f} ms {flops / ms / 1e9:7.1f} TF/s {note}",
              flush=True)

    outs = {}
    for impl, backend in (("cudnn_sdpa", SDPBackend.CUDNN_ATTENTION), ("flash_sdpa", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel([backend]):
            outs[impl] = F.scaled_dot_product_attention(q, k, v, scale=scale)
            add(impl, "dense", 1.0, bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), budget_ms),
                dense_flops)
    flex = torch.compile(flex_attention, dynamic=False)
    op = torch.ops.vsparse.block_sparse_attention
    for family in families:
        for density in densities:
            if family in ("random", "ragged"):  # ragged: rows of different lengths, 10% of them empty
                num, idx = random_block_mask(1, heads, seq, seq, bs, density, ragged=family == "ragged",
                                             empty_rows=0.1 if family == "ragged" else 0.0, generator=g,
                                             device="cuda")
            else:
                num, idx = banded_block_mask(1, heads, seq, seq, bs, density, device="cuda")
            flops = 4 * visible_pairs(num, idx, seq, seq, bs, batch, heads) * dim
            mask = BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=bs, seq_lengths=(seq, seq))
            ref = flex(q, k, v, block_mask=mask, scale=scale)
            add("flex", family, density, bench(lambda: flex(q, k, v, block_mask=mask, scale=scale), budget_ms), flops)
            if sweep and family == "random" and density in (1.0, 0.25):
                for cfg in sweep:
                    label = "m{BLOCK_M}n{BLOCK_N}w{num_warps}s{num_stages}".format(**cfg)
                    try:
                        fn = lambda: triton_block_sparse.triton_block_sparse_attention(  # noqa: E731
                            q, k, v, num, idx, scale, bs, config=cfg)
                        err = rel_err(fn(), ref)
                        add("ours:" + label, family, density, bench(fn, budget_ms), flops, f"vs flex {err:.1e}")
                    except Exception as exc:  # a config that does not compile on this triton is reported, not fatal
                        print(f"{label}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                if density == 1.0:  # the same kernel at a whole-block length: no tile takes the masking branch
                    even = seq // bs * bs
                    qe, ke, ve = q[:, :, :even], k[:, :, :even], v[:, :, :even]
                    full_num, full_idx = block_mask.full(1, heads, even, even, bs, device="cuda")
                    add("ours:even(S=%d)" % even, family, density,
                        bench(lambda: op(qe, ke, ve, full_num, full_idx, scale, bs), budget_ms),
                        4 * batch * heads * even * even * dim)
            ours = op(q, k, v, num, idx, scale, bs)
            add("ours", family, density, bench(lambda: op(q, k, v, num, idx, scale, bs), budget_ms), flops,
                triton_block_sparse.tuned_config(dim, bs, q.dtype) or "")
            if density == 1.0:  # the same call timed again: the spread between runs of one version
                add("ours(again)", family, density, bench(lambda: op(q, k, v, num, idx, scale, bs), budget_ms),
                    flops)
            checks.append(dict(shape=name, mask=family, density=density, ours_vs_flex=rel_err(ours, ref)))
            if density == 1.0:
                checks[-1]["ours_vs_cudnn"] = rel_err(ours, outs["cudnn_sdpa"])
                checks[-1]["flex_vs_cudnn"] = rel_err(ref, outs["cudnn_sdpa"])
            print("   check", checks[-1], flush=True)
            del ours, ref, mask
    del q, k, v, outs
    torch.cuda.empty_cache()


def run_permutation(name, shape, budget_ms, rows):
    batch, heads, seq, dim = shape
    frames, height, width = GRIDS[name]
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    moved = 2 * x.numel() * x.element_size()
    copy_into = torch.empty_like(x)
    cases = {"copy": None,
             "shared_fpm": position_major_permutation(frames, height, width, 0, seq - frames * height * width,
                                                     device="cuda")[0],
             "per_head_random": torch.stack([torch.randperm(seq, device="cuda") for _ in range(heads)])}
    for case, index in cases.items():
        if index is None:
            ms = bench(lambda: copy_into.copy_(x), budget_ms)
        else:
            index = index.to("cuda")
            out = triton_permute_tokens(x, index)
            expect = torch.gather(x, 2, index.expand(heads, seq)[None, :, :, None].expand_as(x))
            assert torch.equal(out, expect), case
            ms = bench(lambda: triton_permute_tokens(x, index), budget_ms)
        rows.append(dict(shape=name, impl="permute:" + case, ms=ms, gbps=moved / ms / 1e6))
        print(f"{name:8s} permute {case:16s} {ms:8.3f} ms {moved / ms / 1e6:8.0f} GB/s", flush=True)


def torch_sampled_rows(q, k, v, rows, masks, scale):
    """`sampled_rows_attention`'s arithmetic in torch (matrix products in the inputs' dtype over unnormalized
    exponentials, each mask's output divided by its own sum): the peer, compiled by Inductor."""
    scores = (q[:, :, rows] @ k.transpose(-1, -2)).float() * scale
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))[:, :, None] * masks  # [B, H, C, R, S]
    sums = weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (weights.to(v.dtype) @ v[:, :, None]).float() / sums


def run_sampled_rows(name, shape, budget_ms, sweep, rows):
    batch, heads, seq, dim = shape
    frames, height, width = GRIDS[name]
    constants = svg_constants((frames, height, width, 0, seq - frames * height * width), 128, 0.1, device="cuda")
    sample, masks = constants["sample_rows"], constants["sample_masks"]
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    scale = dim ** -0.5
    peer = torch.compile(torch_sampled_rows, dynamic=False)
    expect = peer(q, k, v, sample, masks, scale)
    cases = {"inductor_formula": lambda: peer(q, k, v, sample, masks, scale),
             "ours": lambda: torch.ops.vsparse.sampled_rows_attention(q, k, v, sample, masks, scale)}
    for config in sweep:
        cases[f"ours:{config}"] = (lambda c: lambda: triton_sampled_rows.triton_sampled_rows_attention(
            q, k, v, sample, masks, scale, config=c))(config)
    for splits in SAMPLED_ROWS_SPLITS if sweep else []:
        cases[f"ours:splits={splits}"] = (lambda n: lambda: triton_sampled_rows.triton_sampled_rows_attention(
            q, k, v, sample, masks, scale, splits=n))(splits)
    for case, fn in cases.items():
        error = rel_err(fn(), expect)
        ms = bench(fn, budget_ms)
        rows.append(dict(shape=name, impl="sampled_rows:" + case, ms=ms, rel_err_vs_formula=error))
        print(f"{name:8s} sampled rows {case:32s} {ms * 1000:8.1f} us  rel. error vs formula {error:.1e}", flush=True)
    del q, k, v
    torch.cuda.empty_cache()


ROW_ORDER_WARPS = [1, 2, 4, 8, 16]  # tried with --sweep


def run_row_order(name, shape, budget_ms, sweep, rows):
    batch, heads, seq, _ = shape
    n = block_mask.num_blocks(seq, 128)
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(batch, heads, n, n, device="cuda", generator=g)
    logits.diagonal(dim1=-2, dim2=-1).fill_(torch.finfo(torch.float32).max)  # forced blocks tie at the top
    expect = row_order.reference_descending_order(logits)
    cases = {"ours": lambda: torch.ops.vsparse.descending_order(logits),
             "inductor_sort": (lambda f: lambda: f(logits))(
                 torch.compile(row_order.reference_descending_order, dynamic=False)),
             "aten_sort": lambda: row_order.reference_descending_order(logits)}
    for warps in sweep:
        cases[f"ours:warps={warps}"] = (lambda w: lambda: triton_row_order.triton_descending_order(logits, w))(warps)
    for case, fn in cases.items():
        assert torch.equal(fn().to(torch.int32), expect), case
        ms = bench(fn, budget_ms)
        rows.append(dict(shape=name, impl="row_order:" + case, ms=ms, rows=batch * heads * n, n=n))
        print(f"{name:8s} row order {case:18s} {ms * 1000:8.1f} us  ({batch * heads * n} rows of {n})", flush=True)


BLOCK_MEANS_SWEEP = [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]  # (rows a step, warps) tried with --sweep


def run_block_means(name, shape, budget_ms, sweep, rows):
    """q's means over 128-token blocks: q [B, H, S, D] as a view of the projections' [B, S, H, D] output."""
    batch, heads, seq, dim = shape
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    order = torch.randperm(seq, device="cuda", generator=g)
    inductor = torch.compile(lambda x: consecutive_block_means(x, 128)[0], dynamic=False)
    cases = {"ours": (None, lambda: torch.ops.vsparse.block_means(q, None, 128)),
             "inductor": (None, lambda: inductor(q)),
             "ours:permutation": (order, lambda: torch.ops.vsparse.block_means(q, order, 128))}
    for rows_a_step, warps in sweep:
        cases[f"ours:rows={rows_a_step},warps={warps}"] = (None, (lambda r, w: lambda: triton_block_means.
                                                                  triton_block_means(q, None, 128, rows=r,
                                                                                     num_warps=w))(rows_a_step, warps))
    gb = q.numel() * q.element_size() / 1e9
    for case, (case_order, fn) in cases.items():
        error = rel_err(fn(), reference_block_means(q.float(), case_order, 128))
        ms = bench(fn, budget_ms)
        rows.append(dict(shape=name, impl="block_means:" + case, ms=ms, read_gb_s=gb / ms * 1e3, rel_err=error))
        print(f"{name:8s} block means {case:24s} {ms * 1000:8.1f} us  {gb / ms * 1e3:7.0f} GB/s read  "
              f"rel. error {error:.1e}", flush=True)
    del q
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.1, 0.05])
    parser.add_argument("--masks", nargs="+", default=["random", "banded"], choices=["random", "banded", "ragged"])
    parser.add_argument("--budget-ms", type=float, default=400.0, help="do_bench repetition time per case")
    parser.add_argument("--sweep", action="store_true",
                        help="also time each fixed config at densities 1 and 0.25 (first shape only)")
    parser.add_argument("--no-permute", action="store_true")
    parser.add_argument("--no-sampled-rows", action="store_true")
    parser.add_argument("--no-attention", action="store_true", help="skip the block-sparse attention cases")
    parser.add_argument("--no-row-order", action="store_true")
    parser.add_argument("--no-block-means", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, checks = [], []
    for name in args.shapes:
        sweep = SWEEP if args.sweep and name == args.shapes[0] else []  # configs rank alike on both shapes
        if not args.no_attention:
            run_attention(name, SHAPES[name], args.densities, args.masks, args.budget_ms, sweep, rows, checks)
        if not args.no_permute:
            run_permutation(name, SHAPES[name], args.budget_ms, rows)
        if not args.no_sampled_rows:
            run_sampled_rows(name, SHAPES[name], args.budget_ms,
                             SAMPLED_ROWS_SWEEP if args.sweep and name == args.shapes[0] else [], rows)
        if not args.no_row_order:
            run_row_order(name, SHAPES[name], args.budget_ms, ROW_ORDER_WARPS if args.sweep else [], rows)
        if not args.no_block_means:
            run_block_means(name, SHAPES[name], args.budget_ms, BLOCK_MEANS_SWEEP if args.sweep else [], rows)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host=platform.node())
    print(json.dumps(meta))
    print("\n| shape | mask | density | ours ms | ours TF/s | flex ms | flex TF/s | cuDNN dense ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("impl") != "ours":
            continue
        f = next(x for x in rows if x["impl"] == "flex" and x["shape"] == r["shape"] and x["mask"] == r["mask"]
                 and x["density"] == r["density"])
        c = next(x for x in rows if x["impl"] == "cudnn_sdpa" and x["shape"] == r["shape"])
        print(f"| {r['shape']} | {r['mask']} | {r['density']} | {r['ms']:.3f} | {r['tflops']:.0f} | {f['ms']:.3f} | "
              f"{f['tflops']:.0f} | {c['ms']:.2f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(meta=meta, rows=rows, checks=checks), fh, indent=1)


if __name__ == "__main__":
    main()
