"""The runtime's own overhead on a small Wan model: time per forward and host syncs per forward, against Inductor.

Wan architecture, 6 layers, 4 heads x 64, latent 1x16x9x64x64 (9,216 tokens), text 1x64x256, bf16, on CUDA. Every
variant is compiled in this process on its own copy of the model and runs a sampling-like loop: 10 steps of falling
timesteps, two calls per step (CFG: the second with other text states). The loops are timed round-robin over the
variants, `--repeats` rounds (these forwards are launch-bound, and the lent machine's host speed drifts between
runs). Per forward: median of the loop's wall time / calls (CUDA-synchronized at loop ends only); host syncs, CPU
launches and GPU busy time counted with the torch profiler over one more loop.

    python benchmarks/runtime_overhead.py --out results.json
    python benchmarks/runtime_overhead.py --variants inductor,vsparse-none
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

# Forced: the cost model keeps this small model dense and uncached (the "vsparse-defaults" variant shows that choice);
# the forced variants measure what sparse attention and the cache cost here.
SPARSE = {"sparsity": "draft", "density": 0.25, "dense_steps": 0.0, "dense_layers": 0, "force_sparse": True}
CACHE = {"sparsity": "none", "cache": "easycache", "cache_threshold": 0.05, "force_cache": True}
VARIANTS = {
    "inductor": ("inductor", None),
    "inductor-reduce-overhead": ("inductor", "reduce-overhead"),
    "vsparse-defaults": ({}, None),
    "vsparse-defaults-reduce-overhead": ({}, "reduce-overhead"),
    # The default options with the cost model's "dense" overruled: what that choice saves outside CUDA graphs.
    "vsparse-defaults-forced": ({"force_sparse": True}, None),
    "vsparse-none": ({"sparsity": "none"}, None),
    "vsparse-none-reduce-overhead": ({"sparsity": "none"}, "reduce-overhead"),
    "vsparse-draft-0.25": (SPARSE, None),
    "vsparse-draft-0.25-reduce-overhead": (SPARSE, "reduce-overhead"),
    "vsparse-cache": (CACHE, None),
    "vsparse-cache-reduce-overhead": (CACHE, "reduce-overhead"),
}
def inductor_forward_ms(results: list, variant: str):
    """Plain Inductor's forward in `variant`'s Inductor mode (the ratio's base), or None where it has none."""
    mode = VARIANTS[variant][1]
    base = next(name for name, (backend, m) in VARIANTS.items() if backend == "inductor" and m == mode)
    return next((r["forward_ms"] for r in results if r["variant"] == base and "forward_ms" in r), None)


SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")
COUNTED_CPU_OPS = ("aten::copy_", "cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaMemcpyAsync")


def build(device="cuda"):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=256, freq_dim=256, ffn_dim=1024, num_layers=6, cross_attn_norm=True, rope_max_seq_len=1024,
    ).to(device, torch.bfloat16).eval()
    latents = torch.randn(1, 16, 9, 64, 64, device=device, dtype=torch.bfloat16)
    texts = [torch.randn(1, 64, 256, device=device, dtype=torch.bfloat16) for _ in range(2)]
    return model, latents, texts


def sampling_loop(fn, latents, texts, steps=10):
    import torch

    out = None
    for t in torch.linspace(999, 10, steps).tolist():
        timestep = torch.full((1,), t, device=latents.device)
        for text in texts:
            out = fn(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
    return out, steps * len(texts)


def prepare(name: str) -> dict:
    """Compile a variant on its own model copy and run its first loops (compile, CUDA-graph recording)."""
    import torch

    options, mode = VARIANTS[name]
    model, latents, texts = build()
    if options == "inductor":
        fn = torch.compile(model, fullgraph=True, mode=mode)
    else:
        import dit_compiler

        fn = torch.compile(model, backend=dit_compiler.vsparse(**options, mode=mode), fullgraph=True)
    with torch.no_grad():
        start = time.perf_counter()
        sampling_loop(fn, latents, texts)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        sampling_loop(fn, latents, texts)  # CUDA graphs record on a later call
        torch.cuda.synchronize()
    return {"name": name, "fn": fn, "latents": latents, "texts": texts, "compile_s": compile_s, "times": []}


def time_loop(variant: dict) -> float:
    """ms per forward of one sampling loop."""
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        _, calls = sampling_loop(variant["fn"], variant["latents"], variant["texts"])
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def host_profile(variant: dict, top: int) -> list:
    """Where one sampling loop's host time goes (cProfile): the `top` functions by own time, each as [function, calls
    a forward, own µs a forward, cumulative µs a forward]. Launch-bound forwards spend it in Python: this says where."""
    import cProfile
    import pstats

    import torch

    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        _, calls = sampling_loop(variant["fn"], variant["latents"], variant["texts"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    rows = [[f"{file.rsplit('/', 1)[-1]}:{line}({name})" if line else name, round(n / calls, 2),
             round(own / calls * 1e6, 1), round(cumulative / calls * 1e6, 1)]
            for (file, line, name), (_, n, own, cumulative, _) in stats.items()]
    return sorted(rows, key=lambda r: -r[2])[:top]


def profile(variant: dict) -> dict:
    import torch

    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                             torch.profiler.ProfilerActivity.CUDA]) as prof:
        _, calls = sampling_loop(variant["fn"], variant["latents"], variant["texts"])
        torch.cuda.synchronize()
    counts = {e: 0 for e in SYNC_EVENTS}
    cpu_ops = {e: 0 for e in COUNTED_CPU_OPS}
    kernels: dict = {}
    for event in prof.events():
        if event.name in counts:
            counts[event.name] += 1
        if event.name in cpu_ops:
            cpu_ops[event.name] += 1
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total, n = kernels.get(event.name, (0.0, 0))
            kernels[event.name] = (total + event.device_time, n + 1)
    counts["cudaDeviceSynchronize"] -= 1  # the loop's own final torch.cuda.synchronize()
    times = variant["times"]
    result = {"variant": variant["name"], "compile_and_first_loop_s": round(variant["compile_s"], 1),
              "forward_ms": round(statistics.median(times), 3), "forward_ms_min": round(min(times), 3),
              "forward_ms_all": [round(x, 3) for x in times],
              "syncs_per_forward": {k: round(v / calls, 2) for k, v in counts.items()},
              "cpu_ops_per_forward": {k: round(v / calls, 1) for k, v in cpu_ops.items()},
              "gpu_busy_ms_per_forward": round(sum(t for t, _ in kernels.values()) / 1e3 / calls, 3),
              "gpu_ops_per_forward": round(sum(n for _, n in kernels.values()) / calls, 1),
              "top_gpu_ops_us_per_forward": {name[:80]: round(t / calls, 1) for name, (t, _) in sorted(
                  kernels.items(), key=lambda kv: -kv[1][0])[:6]}}
    if VARIANTS[variant["name"]][0] != "inductor":
        import dit_compiler

        rows = dit_compiler.stats(variant["fn"])
        result["stack_runs_reused"] = sum(r["reused"] for r in rows)
        result["stack_runs"] = sum(r["calls"] for r in rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="also cProfile one loop a variant and report its N costliest functions by own time")
    parser.add_argument("--out")
    args = parser.parse_args()
    import torch

    # Every variant stays compiled (each on its own model copy), then the loops are timed round-robin, so a drift
    # of the host's speed (these small forwards are launch-bound) hits all variants alike.
    torch._dynamo.config.recompile_limit = 64
    prepared, results = [], []
    for name in args.variants.split(","):
        try:
            prepared.append(prepare(name))
            print(f"{name}: compiled in {prepared[-1]['compile_s']:.1f} s", flush=True)
        except Exception as failure:  # one failing variant must not hide the others' figures
            results.append({"variant": name, "error": f"{type(failure).__name__}: {failure}"[:2000]})
            print(json.dumps(results[-1]), flush=True)
    for _ in range(args.repeats):
        for variant in prepared:
            variant["times"].append(time_loop(variant))
    for variant in prepared:
        results.append(profile(variant))
        if args.host_profile:
            results[-1]["host_profile"] = host_profile(variant, args.host_profile)
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| variant | forward (ms), median / min | vs Inductor, same mode | host syncs / forward (_local_scalar_dense,"
          " stream, device) | compile + first loop (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error'][:300]} | | | |")
            continue
        s = r["syncs_per_forward"]
        base = inductor_forward_ms(results, r["variant"])
        ratio = f"{base / r['forward_ms']:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['forward_ms']:.3f} / {r['forward_ms_min']:.3f} | {ratio} | "
              f"{s['aten::_local_scalar_dense']}, "
              f"{s['cudaStreamSynchronize']}, {s['cudaDeviceSynchronize']} | {r['compile_and_first_loop_s']} |")
    for r in results:
        if r.get("host_profile"):
            print(f"\n{r['variant']}: host time a forward by function (calls, own µs, cumulative µs)")
            for function, calls, own, cumulative in r["host_profile"]:
                print(f"  {own:9.1f} {cumulative:9.1f} {calls:7.2f}  {function[:110]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
