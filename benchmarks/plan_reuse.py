"""What `plan_refresh` saves a forward: vsparse with a fresh plan every call against one reused between refreshes,
and Inductor dense, in one process, calls interleaved.

Separate processes differ by a few % between runs (two generations of the same settings differed by 2.4% even in
their dense-phase calls, which plan nothing), more than reusing svg's head classes saves a forward, so this compares
the variants call by call: round after round, each variant makes one denoising call at the round's timestep
(descending, one CFG branch), and the medians are over rounds. The sparse variants run svg at `--density` with
`dense_steps=0` (every call sparse) and the cache on at a threshold no call meets (the block stack is split, which
the plan states need, and always computed). With `plan_refresh=R` a call classifies when its states are R computed
steps old: the report gives that variant's median over its classifying calls and over its reusing calls.

    python benchmarks/plan_reuse.py --out plan_reuse.json                  # Wan2.1-1.3B on the GPU
    python benchmarks/plan_reuse.py --config small --rounds 2 --refresh 2   # CPU smoke run (no speed claim)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package: its siblings by name
from end_to_end import CONFIGS, build_wan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="wan-1.3b")
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--refresh", type=int, default=2, help="plan_refresh of the reusing variant")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--profile", action="store_true",
                        help="also each vsparse variant's kernel table over two further calls (for plan_refresh=2: "
                             "one classifying, one reusing)")
    parser.add_argument("--out")
    args = parser.parse_args()

    import torch

    from dit_compiler.runtime.runner import runners

    model_args, (frames, height, width), text, device = CONFIGS[args.config]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_wan(model_args, device, dtype)
    inputs = dict(hidden_states=torch.randn(1, 16, frames, height, width, device=device, dtype=dtype),
                  encoder_hidden_states=torch.randn(1, text, model_args["text_dim"], device=device, dtype=dtype),
                  return_dict=False)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sparse = dict(sparsity="svg", density=args.density, dense_steps=0.0, cache="easycache", cache_threshold=1e-9,
                  force_sparse=device == "cpu", force_cache=device == "cpu")
    variants = {"inductor": torch.compile(model, fullgraph=True),
                "vsparse plan_refresh=1": torch.compile(model, backend="vsparse", fullgraph=True,
                                                        options=dict(sparse, plan_refresh=1)),
                f"vsparse plan_refresh={args.refresh}": torch.compile(model, backend="vsparse", fullgraph=True,
                                                                      options=dict(sparse, plan_refresh=args.refresh))}
    compile_s, times = {}, {name: [] for name in variants}
    classified = {name: [] for name in variants}
    timesteps = torch.linspace(900, 100, args.rounds + 1).tolist()  # the first call of each compiles
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            for name, fn in variants.items():
                sync()
                start = time.perf_counter()
                fn(**inputs, timestep=torch.tensor([t], device=device))
                sync()
                seconds = time.perf_counter() - start
                if i == 0:
                    compile_s[name] = round(seconds, 1)
                    continue
                times[name].append(seconds * 1e3)
                classified[name].append(name != "inductor" and (name == "vsparse plan_refresh=1"
                                                               or _classified(runners(), model)))
    rows = []
    dense_ms = statistics.median(times["inductor"])
    for name in variants:
        row = {"variant": name, "compile_and_first_call_s": compile_s[name],
               "forward_ms": round(statistics.median(times[name]), 2), "calls": len(times[name])}
        if name != "inductor":
            fresh = [ms for ms, c in zip(times[name], classified[name]) if c]
            reused = [ms for ms, c in zip(times[name], classified[name]) if not c]
            row.update(classifying_calls=len(fresh), reusing_calls=len(reused),
                       classifying_ms=round(statistics.median(fresh), 2) if fresh else None,
                       reusing_ms=round(statistics.median(reused), 2) if reused else None)
        row["speedup_vs_inductor"] = round(dense_ms / row["forward_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    kernels = {}
    if args.profile:
        from profiling import kernel_table

        later = iter(torch.linspace(timesteps[-1] - 1, 1, 16).tolist())
        for name, fn in variants.items():
            if name != "inductor":
                with torch.no_grad():
                    kernels[name] = kernel_table(lambda: fn(**inputs, timestep=torch.tensor([next(later)],
                                                                                         device=device)),
                                                 torch.device(device), iterations=2, top=60)
    report = {"config": args.config, "density": args.density, "refresh": args.refresh, "rounds": args.rounds,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "rows": rows, "kernels": kernels}
    print(f"\n{report['device']}, torch {report['torch']}, {args.config}, svg density {args.density}, "
          f"{args.rounds} interleaved rounds\n")
    print("| variant | forward ms (median) | vs Inductor | classifying calls: ms | reusing calls: ms | "
          "compile + first call s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['forward_ms']} | {r['speedup_vs_inductor']:.3f}x | "
              f"{_cell(r, 'classifying')} | {_cell(r, 'reusing')} | {r['compile_and_first_call_s']} |")
    for name, table in kernels.items():
        print(f"\n{name}: launches and µs per call (two calls)")
        for kernel, launches, us in table:
            print(f"  {us:9.1f} {launches:6.2f}  {kernel[:150]}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def _cell(row: dict, kind: str) -> str:
    return "" if f"{kind}_calls" not in row else f"{row[f'{kind}_calls']}: {row[f'{kind}_ms']}"


def _classified(all_runners, model) -> bool:
    """Whether the reusing variant's last call chose afresh: its plan states (the only ones kept: plan_refresh=1
    keeps none) are one computed step old."""
    keys = list(model.parameters())
    (state,) = [s for runner in all_runners for s in runner.states.find(keys) if s.plans]
    return bool((state.plans[0] // 2 == 1).all())


if __name__ == "__main__":
    main()
