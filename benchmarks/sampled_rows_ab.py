"""A/B of svg's sampled-row kernels: this checkout's `triton_sampled_rows` against another checkout's (a version kept
for comparison, e.g. `git worktree add ../base <commit>`), on the same inputs in one process, with a sweep of this
checkout's tile configs and key splits. Wan-1.3B's shape, svg's SAMPLE_ROWS rows under the full, spatial and temporal
masks of density 0.1, bf16; µs are `do_bench` medians, errors against the float64 formula. A case's do_bench time
can also count the launcher's host work where that outlasts the GPU's (README "End to end", dabcf1c), so each case
also reports its GPU time per call from torch.profiler (every kernel it launches), which ranks the tiles.

    TRITON_INTERPRET=0 python3 benchmarks/sampled_rows_ab.py --base ../base --out ab.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
from kernel import GRIDS, SHAPES, torch_sampled_rows  # noqa: E402
from profiling import kernel_table  # noqa: E402

from dit_compiler.kernels import triton_sampled_rows as ours  # noqa: E402
from dit_compiler.passes.planners.svg import svg_constants  # noqa: E402

CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 4, 3),
           (64, 128, 8, 2), (64, 32, 4, 3), (64, 32, 4, 4), (32, 64, 4, 2), (32, 64, 4, 3), (16, 64, 4, 2)]
SPLITS = [11, 18, 24, 36, 48, 66, 88, 132]


def load_base(checkout: str):
    spec = importlib.util.spec_from_file_location("base_sampled_rows",
                                                  os.path.join(checkout, "kernels", "triton_sampled_rows.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the other checkout's root")
    parser.add_argument("--out")
    args = parser.parse_args()
    base = load_base(args.base)
    batch, heads, seq, dim = SHAPES["wan1.3b"]
    frames, height, width = GRIDS["wan1.3b"]
    constants = svg_constants((frames, height, width, 0, seq - frames * height * width), 128, 0.1, device="cuda")
    rows, masks = constants["sample_rows"], constants["sample_masks"]
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(SHAPES["wan1.3b"], device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    scale = dim ** -0.5
    exact = torch_sampled_rows(q.double(), k.double(), v.double(), rows, masks, scale)
    # The base's masks as its planner stored them (contiguous), so neither side copies them per call.
    base_masks = masks.contiguous()
    cases = {"base": lambda: base.triton_sampled_rows_attention(q, k, v, rows, base_masks, scale),
             "ours": lambda: ours.triton_sampled_rows_attention(q, k, v, rows, masks, scale)}
    for config in CONFIGS:
        cases[f"ours {config}"] = (lambda c: lambda: ours.triton_sampled_rows_attention(
            q, k, v, rows, masks, scale, config=c))(config)
    for splits in SPLITS:
        cases[f"ours splits={splits}"] = (lambda n: lambda: ours.triton_sampled_rows_attention(
            q, k, v, rows, masks, scale, splits=n))(splits)
    results = []
    for name, fn in cases.items():
        try:
            error = float((fn().double() - exact).norm() / exact.norm())
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            gpu_us = sum(us for _, _, us in kernel_table(fn, q.device, iterations=20))
        except Exception as e:  # a config that does not compile on this device
            print(f"{name:28s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        results.append(dict(case=name, us=round(ms * 1e3, 1), gpu_us=round(gpu_us, 1), rel_err_vs_float64=error))
        print(f"{name:28s} {ms * 1e3:8.1f} us  GPU {gpu_us:7.1f} us  rel. error vs float64 {error:.2e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=results), f, indent=1)


if __name__ == "__main__":
    main()
