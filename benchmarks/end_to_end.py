"""Compile time and forward time of diffusers' WanTransformer3DModel under plain Inductor and vsparse.

`--config wan-1.3b` (GPU, bf16): Wan2.1-T2V-1.3B's configuration with random weights, latent 1x16x21x60x104
(480x832, 81 frames: 32,760 video tokens), text 1x512x4096. `--config small` (CPU, float32): the quickstart's
2-block model, latent 1x16x5x32x32 (1,280 tokens), text 1x12x64. Each variant runs in its own process with its
own empty Inductor cache, so every compile is cold and none profits from another's cache; `--shared-cache` gives them
one cache (later variants compile warm: the forward table in less GPU time, compile times then not comparable).

    python benchmarks/end_to_end.py --out results.json                 # all variants, Wan2.1-1.3B on the GPU
    python benchmarks/end_to_end.py --config small --variants inductor,vsparse-none,vsparse-draft-0.25
    python benchmarks/end_to_end.py --variant inductor                 # one, in this process
    python benchmarks/end_to_end.py --variants inductor,vsparse-draft-0.1 --profile   # + each forward's kernels,
                                                         # the device's busy time and where it waits (CUDA)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Sparse variants run every layer and step sparse (dense_layers=0, dense_steps=0): the forward's own speed.
VARIANTS = {
    "eager": None,
    "inductor": {},
    "vsparse-none": {"sparsity": "none", "cache": "none"},
    # One forward, sparse attention only: no dense phase, no dense layers, no cache.
    **{f"vsparse-{planner}-{density}": {"sparsity": planner, "density": density, "dense_steps": 0.0, "dense_layers": 0,
                                        "cache": "none"}
       for planner in ("draft", "svg", "dual", "svg-shift") for density in (0.25, 0.15, 0.1)},
}


# (model keyword arguments, latent frames x height x width, text tokens, device)
CONFIGS = {
    "wan-1.3b": (dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=8960,
                      num_layers=30, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
                 (21, 60, 104), 512, "cuda"),
    "small": (dict(num_attention_heads=2, attention_head_dim=64, text_dim=64, freq_dim=32, ffn_dim=256, num_layers=2,
                   rope_max_seq_len=64), (5, 32, 32), 12, "cpu"),
}


def cast_like_from_pretrained(model, dtype):
    """The dtypes `from_pretrained(torch_dtype=dtype)` gives a diffusers model, in place: state-dict tensors in
    `dtype` except those under a module the class keeps in float32 (`_keep_in_fp32_modules`: Wan's time embedder,
    norms, modulation table); non-persistent buffers (Wan's float64 RoPE tables) as constructed."""
    import torch

    keep = model._keep_in_fp32_modules or []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def build_wan(model_args: dict, device, dtype):
    """diffusers' WanTransformer3DModel with `model_args` (a CONFIGS entry's) and random weights, in eval mode, in
    the dtypes a pipeline loading it in `dtype` runs."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device(device):  # initialized where it runs: a 1.3B model's random init is slow on the host
        model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
                                      **model_args)
    return cast_like_from_pretrained(model, dtype).eval()


def reset_compile_breakdown() -> None:
    from torch._dynamo.utils import compilation_time_metrics
    from torch._inductor import metrics

    compilation_time_metrics.clear()
    metrics.reset()


def compile_breakdown() -> dict:
    """Where the compile time went since `reset_compile_breakdown`: Dynamo's and Inductor's timed phases of at least
    0.5 s (cumulative seconds; nested phases are counted in their parents too, and a phase run on parallel threads,
    such as compile_file, can sum to more than the wall time) and how many kernels Inductor generated."""
    from torch._dynamo.utils import compile_times
    from torch._inductor import metrics

    names, seconds = compile_times(repr="csv", aggregate=True)
    phases = {name: round(float(s), 2) for name, s in zip(names, seconds) if float(s) >= 0.5}
    return {"compile_phases_s": phases, "kernels_generated": metrics.generated_kernel_count}


def measure(variant: str, config: str, repeats: int, profile: bool = False) -> dict:
    import torch

    model_args, (frames, height, width), text, device = CONFIGS[config]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_wan(model_args, device, dtype)
    text_dim = model_args["text_dim"]
    inputs = dict(hidden_states=torch.randn(1, 16, frames, height, width, device=device, dtype=dtype),
                  timestep=torch.tensor([500.0], device=device),
                  encoder_hidden_states=torch.randn(1, text, text_dim, device=device, dtype=dtype), return_dict=False)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    options = VARIANTS[variant]
    if options is None:
        fn = model
    elif variant == "inductor":
        fn = torch.compile(model, fullgraph=True)
    else:
        # On the CPU config the cost model keeps every site dense; this benchmark measures the rewrite's cost there.
        options = dict(options, force_sparse=device == "cpu")
        fn = torch.compile(model, backend="vsparse", options=options, fullgraph=True)
    with torch.no_grad():
        reset_compile_breakdown()
        sync()
        start = time.perf_counter()
        out = fn(**inputs)[0]
        sync()
        first = time.perf_counter() - start
        breakdown = compile_breakdown()
        reference = model(**inputs)[0] if options is not None else out
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn(**inputs)
            sync()
            times.append(time.perf_counter() - start)
    times.sort()
    error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
    row = {"variant": variant, "first_call_s": round(first, 2), "forward_ms": round(1e3 * times[len(times) // 2], 1),
           "rel_error_vs_eager": round(error, 5), "tokens": frames * height * width // 4, "config": config,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           **breakdown}
    if profile:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
        from profiling import device_timeline, kernel_table

        kernels = kernel_table(lambda: fn(**inputs), torch.device(device), iterations=2, top=None)
        # Against forward_ms: how much of the forward the device is busy (the rest is host work it waits for).
        row["device_busy_ms"] = round(sum(us for _, _, us in kernels) / 1e3, 1)
        row["kernels"] = kernels[:60]
        if device == "cuda":  # where the device waits within the forward, and for what
            row["device_timeline"] = device_timeline(lambda: fn(**inputs))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--config", choices=sorted(CONFIGS), default="wan-1.3b")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shared-cache", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also record each forward's kernels (torch.profiler)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.config, args.repeats, args.profile)))
        return
    rows = []
    shared = tempfile.mkdtemp(prefix="inductor-shared-") if args.shared_cache else None
    for variant in args.variants.split(","):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=shared or tempfile.mkdtemp(prefix=f"inductor-{variant}-"),
                   TRITON_CACHE_DIR=os.path.join(shared, "triton") if shared else tempfile.mkdtemp(
                       prefix=f"triton-{variant}-"))
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--config", args.config, "--repeats",
                               str(args.repeats)] + (["--profile"] if args.profile else []),
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            rows.append({"variant": variant, "error": proc.stderr[-2000:]})
            print(f"{variant}: FAILED\n{proc.stderr[-2000:]}", flush=True)
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps({k: v for k, v in rows[-1].items()
                              if k not in ("kernels", "compile_phases_s", "device_timeline")}), flush=True)
            print("  compile phases (s):", json.dumps(rows[-1].get("compile_phases_s")), flush=True)
            for name, launches, us in rows[-1].get("kernels", []):
                print(f"  {us:9.1f} µs {launches:6.1f}x  {name[:140]}", flush=True)
            if "device_timeline" in rows[-1]:
                timeline = dict(rows[-1]["device_timeline"])
                gaps = timeline.pop("gaps")
                print("  device timeline (ms):", json.dumps(timeline), flush=True)
                for gap in gaps:
                    print("    gap", json.dumps(gap), flush=True)
        if args.out:  # after every variant: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
    base = next((r["forward_ms"] for r in rows if r["variant"] == "inductor" and "error" not in r), None)
    print("\n| variant | compile + first call (s) | forward (ms) | vs Inductor | rel. error vs eager |\n"
          "|---|---|---|---|---|")
    for r in rows:
        if "error" not in r:
            ratio = f"{base / r['forward_ms']:.2f}x" if base else "-"
            print(f"| {r['variant']} | {r['first_call_s']} | {r['forward_ms']} | {ratio} | {r['rel_error_vs_eager']} |")


if __name__ == "__main__":
    main()
