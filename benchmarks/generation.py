"""A whole generation (50 steps by default) under eager, Inductor dense and vsparse settings: wall time, speedup over
Inductor, block-stack runs computed and skipped, and what a trained model's skip share would make of a cache setting.

Sampling loops as diffusers' pipelines make them, random weights, batch 1:
- `--config wan-1.3b` (GPU, bf16): Wan2.1-T2V-1.3B (benchmarks/end_to_end.py's configuration table) at WanPipeline's
  defaults: 480x832, 81 frames (latent 1x16x21x60x104, 32,760 video tokens), text 1x512x4096, classifier-free
  guidance 5.0 with two transformer calls a step, cond then uncond. FlowMatchEulerDiscreteScheduler(shift=3.0):
  the flow shift Wan uses at 480p (diffusers' Wan example: 3.0 for 480p, 5.0 for 720p; Wan's Diffusers checkpoints
  ship UniPCMultistepScheduler with that shift, which makes the same calls at slightly other timesteps).
- `--config hunyuan` (GPU, bf16): HunyuanVideoTransformer3DModel with HunyuanVideo's widths (24 heads x 128, MLP
  ratio 4, a 2-layer token refiner over 4096-wide text, pooled 768, RoPE axes 16/56/56, guidance embedding) and
  6 double-stream + 12 single-stream blocks (the real model: 20 + 40), at 544x960, 129 frames (latent 1x16x33x68x120,
  67,320 video tokens), text 1x256x4096 of which the first 64 tokens are valid (the key-padding mask), pooled 1x768.
  Embedded guidance 6.0: ONE call a step with `guidance` = 6000 (HunyuanVideoPipeline's scale x 1000),
  FlowMatchEulerDiscreteScheduler(shift=7.0) (HunyuanVideo's flow shift) with the pipeline's sigmas
  linspace(1, 0, steps + 1)[:-1].
  Why this size: every HunyuanVideo block costs the same per token (~226 MFLOP of projections plus 4·S·3072 of
  attention), so depth scales a call's time but not attention's share of it, which is what sparse settings act on.
  544x960x129 is HunyuanVideo's own 540p size; attention is ~79% of a block's FLOPs there. 18 blocks make ~1.3
  PFLOP a call: ~2.5 s on an H100 at ~550 TFLOP/s (more if SDPA takes a slower kernel for the key-padding mask), so
  50 steps take ~2-3 minutes (an estimate, not yet measured). All 60 blocks would take ~6.5 min a generation, more
  than one 10-minute command holds with a compile and a warm-up; 720p (118,800 tokens) about three times as long.
- `--config small` (CPU, float32): end_to_end.py's 2-block Wan, latent 1x16x5x32x32, text 1x12x64, with CFG;
  `--config hunyuan-small` (CPU): a 1+1-block HunyuanVideo, 2 heads x 64, latent 1x16x3x16x16. They run the code
  through, they make no speed claim (on a CPU the sparse op runs its pure-torch reference).

Variants: `eager`, `inductor` (torch.compile, fullgraph), `vsparse-*` (backend="vsparse", fullgraph; vsparse's
defaults for what the name leaves open, the cache off unless named), or any vsparse options written
`key=value,key=value`. Each runs in its own process (`--in-process`: all in this one, as the test does), with its
own empty Inductor and Triton cache unless `--shared-cache [DIR]` gives the processes one (a fresh directory for
this run, or DIR, kept for later runs): compiles then reuse what an earlier variant built, so "compile + first
generation" is no longer a cold compile.

Reported per variant:
- compile + first gen: the first call compiles; one untimed generation of `--warmup-steps` steps (default --steps)
  runs every compile and the sparse kernel's autotuning (keyed on head dim, dtype and block size; dense-phase calls
  run it too).
- gen: CUDA-synchronized wall time of each of `--generations` later generations (the mean in the table).
- vs Inductor: Inductor's generation time over this one's, in the same run.
- calls (the loop's own count), computed / skipped block-stack runs from `dit_compiler.stats(model)` (eager and
  Inductor compute every call), all per generation.
- density: the rewritten sites' visited-block fraction over the computed calls (dense-phase calls count 1).
- call ms: the median time of one transformer call (CUDA events around each call, no host sync) of each kind:
  computed calls in the dense phase and in the sparse phase of a sparse setting (by the graph's own dense-phase
  flag), all computed calls otherwise, and calls whose block stack the cache skipped; the kinds come from the
  runner's call history, the records dit_compiler.stats sums up.
- stack share (cache variants): the share of a computed call's time spent in the block stack, measured: the call
  time less t_head_tail, the call time of the same model built without its blocks, compiled with the variant's
  backend and options (cache off) and timed in the same loop.

The cache on random weights: EasyCache skips a block stack when its estimated change since the last computed one is
small. A random-weight model's output changes arbitrarily from step to step, so the skip count measured here is NOT
a trained model's and says nothing about the cache's speed on a real generation. For that, give a trained model's
skip share F (share of calls whose stack is skipped): `--harness-skip F`, or `--quality-json quality.json`
(benchmarks/quality.py's "cache skipped" of the setting with the same options, on the trained harness). Each cache
variant is then projected to F:

    projected = T - (F·calls - skipped) · t_stack,      t_stack = t_call - t_head_tail   (per kind of call)

T is the variant's measured generation time, which already holds the cache's own cost (its host read and checks
per call) and the sampling loop; each further skipped call saves its block stack, t_stack of a computed call of
its kind. Without sparse attention this is T_nocache·(1 - F·f), f = the stack share, plus the cache's measured
cost. With sparse attention a dense-phase stack costs more than a sparse-phase one, and where a trained model's
skips fall is not measured here: `projected` spreads the further skips over the kinds as the computed calls are
spread, `conservative` takes them where the stack is cheapest first (the sparse phase). Assumed, not measured: a
skipped call still costs its head and tail (the "skipped" call ms, when the cache skipped any, shows what it costs
with the check), and the harness's skip share (a 6-layer model at 9,216 tokens) carries over to the model here.

    TRITON_INTERPRET=0 python benchmarks/generation.py --variants inductor vsparse-draft-0.25 --out gen.json  # GPU
    python benchmarks/generation.py --config small --steps 3 --variants eager vsparse-none --in-process   # CPU
    python benchmarks/generation.py --from-json gen.json --quality-json results/quality/quality.json  # re-project
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package: its siblings by name
import end_to_end  # noqa: E402
import quality  # noqa: E402


@dataclass(frozen=True)
class Config:
    family: str  # "wan": CFG, two calls a step; "hunyuan": embedded guidance, one call a step
    model_args: dict
    latent: tuple  # latent frames, height, width
    text_tokens: int
    text_dim: int
    device: str
    shift: float
    guidance: float
    valid_text: Optional[int] = None  # hunyuan: prompt tokens the key-padding mask keeps
    pooled_dim: Optional[int] = None  # hunyuan: pooled text embedding

    @property
    def calls_per_step(self) -> int:
        return 2 if self.family == "wan" else 1


CONFIGS = {name: Config("wan", args, latent, text, args["text_dim"], device, shift=3.0, guidance=5.0)
           for name, (args, latent, text, device) in end_to_end.CONFIGS.items()}
CONFIGS["hunyuan"] = Config(
    "hunyuan", dict(num_attention_heads=24, attention_head_dim=128, num_layers=6, num_single_layers=12,
                    num_refiner_layers=2, mlp_ratio=4.0, text_embed_dim=4096, pooled_projection_dim=768,
                    rope_axes_dim=(16, 56, 56), guidance_embeds=True),
    (33, 68, 120), 256, 4096, "cuda", shift=7.0, guidance=6.0, valid_text=64, pooled_dim=768)
CONFIGS["hunyuan-small"] = Config(
    "hunyuan", dict(num_attention_heads=2, attention_head_dim=64, num_layers=1, num_single_layers=1,
                    num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=32, pooled_projection_dim=16,
                    rope_axes_dim=(16, 24, 24), guidance_embeds=True),
    (3, 16, 16), 8, 32, "cpu", shift=7.0, guidance=6.0, valid_text=5, pooled_dim=16)

# name -> (backend, vsparse options)
VARIANTS = {
    "eager": ("eager", None),
    "inductor": ("inductor", None),
    "vsparse-defaults": ("vsparse", {}),
    "vsparse-none": ("vsparse", {"sparsity": "none", "cache": "none"}),
    "vsparse-draft-0.25": ("vsparse", {"sparsity": "draft", "density": 0.25, "cache": "none"}),
    "vsparse-draft-0.15": ("vsparse", {"sparsity": "draft", "density": 0.15, "cache": "none"}),
    "vsparse-draft-0.1": ("vsparse", {"sparsity": "draft", "density": 0.1, "cache": "none"}),
    "vsparse-svg-0.1": ("vsparse", {"sparsity": "svg", "density": 0.1, "cache": "none"}),
    "vsparse-easycache": ("vsparse", {"sparsity": "none", "cache": "easycache"}),
    "vsparse-draft-0.15+easycache": ("vsparse", {"sparsity": "draft", "density": 0.15, "cache": "easycache"}),
}

SKIP_NOTE = ("Random weights: the cache's skipped counts are NOT a trained model's (its output changes arbitrarily "
             "between steps), so they say nothing about the cache's speed on a real generation; the projection "
             "uses a trained model's skip share (--harness-skip or --quality-json).")
PROJECTION_NOTE = ("projected = T - (skip*calls - skipped) * (t_call - t_head_tail): T the measured generation, "
                   "t_call the median computed call of a kind (dense or sparse phase), t_head_tail the call of the "
                   "model without its blocks; 'projected' spreads the further skips over the kinds as the computed "
                   "calls are, 'conservative' takes them where the block stack is cheapest first.")


def variant_options(name: str) -> tuple[str, Optional[dict]]:
    """(backend, vsparse options) of a variant name, or of vsparse options written `key=value,key=value`."""
    if name in VARIANTS:
        return VARIANTS[name]
    if "=" in name:
        from dit_compiler.options import parse_options

        options = quality.parse_setting(name)
        parse_options(options)  # a bad key or value fails here, before any model is built
        return "vsparse", options
    raise ValueError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}, or vsparse options as key=value,...")


def uses_cache(name: str) -> bool:
    backend, options = variant_options(name)
    return backend == "vsparse" and quality.resolve(options)["cache"] != "none"  # the default caches


# ----------------------------------------------------------------------------------------------------------------
# Model, inputs, sampling


def build_model(config: Config, device: torch.device, dtype: torch.dtype, blocks: bool = True):
    """The configuration's model with random weights; without `blocks`, the same head and tail around no block."""
    args = dict(config.model_args)
    if not blocks:
        args.update(num_layers=0, **({"num_single_layers": 0} if config.family == "hunyuan" else {}))
    if config.family == "wan":
        return end_to_end.build_wan(args, device, dtype)
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device(device):
        model = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, patch_size=2, patch_size_t=1, **args)
    return end_to_end.cast_like_from_pretrained(model, dtype).eval()


def make_inputs(config: Config, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    inputs = {"noise": randn(1, 16, *config.latent).to(device),
              "prompt": randn(1, config.text_tokens, config.text_dim).to(device, dtype)}
    if config.family == "wan":
        inputs["null"] = randn(1, config.text_tokens, config.text_dim).to(device, dtype)
    else:
        mask = torch.zeros(1, config.text_tokens)
        mask[:, :config.valid_text] = 1
        inputs.update(prompt_mask=mask.to(device, dtype), pooled=randn(1, config.pooled_dim).to(device, dtype))
    return inputs


def generate_embedded_guidance(transformer, inputs: dict, shift: float, steps: int, guidance: float):
    """HunyuanVideoPipeline's loop: one call a step with the guidance scale (x 1000) as an input, its sigmas
    linspace(1, 0, steps + 1)[:-1]; latents in float32, cast to the model's dtype for each call."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    noise, prompt = inputs["noise"], inputs["prompt"]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist(), device=noise.device)
    scheduler.set_begin_index(0)  # as the pipeline does: the step index is not looked up on the device
    scale = torch.full((noise.shape[0],), guidance * 1000.0, dtype=prompt.dtype, device=noise.device)
    latents = noise.float()
    for t in scheduler.timesteps:
        velocity = transformer(hidden_states=latents.to(prompt.dtype), timestep=t.expand(latents.shape[0]),
                               encoder_hidden_states=prompt, encoder_attention_mask=inputs["prompt_mask"],
                               pooled_projections=inputs["pooled"], guidance=scale, return_dict=False)[0]
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


def generate(config: Config, transformer, inputs: dict, steps: int):
    if config.family == "wan":  # WanPipeline's loop: CFG with two calls a step
        return quality.generate(transformer, inputs["noise"], inputs["prompt"], inputs["null"], config.shift, steps,
                                config.guidance)
    return generate_embedded_guidance(transformer, inputs, config.shift, steps, config.guidance)


def device_options(options: dict, device: torch.device) -> dict:
    """A variant's vsparse options on `device`: on a CPU the cost model keeps every site dense, so there the rewrite
    is forced (the CPU configurations run the code through, they measure no speed)."""
    return {"force_sparse": device.type == "cpu", **options}


def compile_variant(model, backend: str, options: Optional[dict], device: torch.device):
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model, fullgraph=True)
    return torch.compile(model, backend="vsparse", options=device_options(options, device), fullgraph=True)


class CallTimer:
    """Stands in for the transformer in the sampling loop: times each call (CUDA events on a GPU, so no host sync;
    the host clock on a CPU)."""

    def __init__(self, fn, device: torch.device):
        self.fn = fn
        self.cuda = device.type == "cuda"
        self.calls: list = []

    def __call__(self, **kwargs):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.fn(**kwargs)
            end.record()
        else:
            start = time.perf_counter()
            out = self.fn(**kwargs)
            end = time.perf_counter()
        self.calls.append((start, end))
        return out

    def take(self) -> list[float]:
        """Milliseconds of each call since the last take. Waits for the device: call it after the timed region."""
        calls, self.calls = self.calls, []
        if self.cuda:
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in calls]
        return [1e3 * (end - start) for start, end in calls]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# One variant


def measure(variant: str, config_name: str, steps: int, warmup_steps: int, generations: int) -> dict:
    """Build, compile and time one variant in this process; the row of the report."""
    from dit_compiler.options import parse_options

    config = CONFIGS[config_name]
    backend, options = variant_options(variant)
    device = torch.device(config.device)
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 runs Triton kernels in the interpreter: unset it (or 0) on a GPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(config, device, dtype)
    inputs = make_inputs(config, device, dtype)
    timer = CallTimer(compile_variant(model, backend, options, device), device)
    with torch.no_grad():
        first = _timed(lambda: generate(config, timer, inputs, warmup_steps), device)
        timer.take()
        _log(f"{variant}: compile + first generation ({warmup_steps} steps) {first:.1f} s")
        seconds, call_ms = [], []
        for _ in range(generations):
            seconds.append(_timed(lambda: generate(config, timer, inputs, steps), device))
            call_ms += timer.take()
            _log(f"{variant}: generation {seconds[-1]:.2f} s")
    vsparse_options = None
    if backend == "vsparse":
        vsparse_options = dataclasses.asdict(parse_options(device_options(options, device)))
    row = {"variant": variant, "backend": backend, "options": vsparse_options, "config": config_name,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "steps": steps, "warmup_steps": warmup_steps, "generations": generations,
           "first_generation_s": first, "generation_s": statistics.mean(seconds), "generation_s_each": seconds,
           "calls": len(call_ms)}
    if backend == "vsparse":
        row.update(stack_runs(model, generations))
        kinds = call_kinds(model, len(call_ms), sparse=vsparse_options["sparsity"] != "none")
    else:
        row.update({"computed": len(call_ms), "skipped": 0, "dense_calls": None, "density": None, "sparse_sites": 0,
                    "stack_runs_from": "no vsparse: every call runs the block stack"})
        kinds = ["all"] * len(call_ms)
    row.update(kind_times(call_ms, kinds, generations))
    if uses_cache(variant):
        head_tail = measure_head_tail(config, options, device, dtype, inputs)
        n = {kind: count for kind, count in row["kind_calls"].items() if kind != "skipped"}
        row["head_tail_ms"] = head_tail
        row["stack_ms"] = {kind: row["call_ms"][kind] - head_tail for kind in n}
        row["stack_share"] = sum(n[k] * row["stack_ms"][k] for k in n) / sum(n[k] * row["call_ms"][k] for k in n)
    return row


def head_tail_row(variant: str, config_name: str) -> dict:
    """A cache variant's head-and-tail call alone (`measure_head_tail`): what a call whose stack is skipped still
    runs, for benchmarks/choose_defaults.py, without timing whole generations."""
    config = CONFIGS[config_name]
    backend, options = variant_options(variant)
    if not uses_cache(variant):
        raise ValueError(f"{variant}: --head-tail-only measures cache variants (the model without its blocks)")
    device = torch.device(config.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch._dynamo.reset()
    inputs = make_inputs(config, device, dtype)
    return {"variant": variant, "backend": backend, "options": options, "config": config_name,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "call_ms": {}, "head_tail_ms": measure_head_tail(config, options, device, dtype, inputs)}


def stack_runs(model, generations: int) -> dict:
    """Block-stack runs computed and skipped, dense-phase calls and mean density over the timed generations, from
    `dit_compiler.stats` (the first generation it saw is the warm-up)."""
    import dit_compiler

    rows = dit_compiler.stats(model)
    seen = sorted({r["generation"] for r in rows})
    if len(seen) != generations + 1:
        raise RuntimeError(f"dit_compiler.stats placed the calls in generations {seen}; the benchmark ran a warm-up "
                           f"and {generations} more")
    timed = [r for r in rows if r["generation"] in seen[1:]]
    counts = quality.stack_counts(timed)
    density = counts["mean_density"]
    return {"computed": counts["calls"] - counts["reused"], "skipped": counts["reused"],
            "dense_calls": counts["dense_calls"], "stats_calls": counts["calls"],
            "density": statistics.mean(density.values()) if density else None, "sparse_sites": len(density),
            "stack_runs_from": "dit_compiler.stats"}


def call_kinds(model, count: int, sparse: bool) -> list[str]:
    """What each of the model's last `count` calls was, from the runner's call history (the records
    dit_compiler.stats sums up): "skipped" (the cache reused the block stack), else, for a sparse setting,
    "dense_phase" or "sparse_phase" by the graph's own dense-phase flag, else "all"."""
    from dit_compiler.runtime.runner import runners

    params = list(model.parameters())
    histories = [list(state.history) for runner in runners() for state in runner.states.find(params)]
    if len(histories) != 1 or len(histories[0]) < count:
        raise RuntimeError(f"expected one compiled graph holding the model's last {count} calls, found "
                           f"{[len(h) for h in histories]} calls in {len(histories)} (a recompile?)")
    records = histories[0][-count:]
    dense = torch.stack([r.vector[1] for r in records]).tolist() if sparse else None
    kinds = []
    for i, record in enumerate(records):
        if record.cache is not None and record.cache.reused:
            kinds.append("skipped")
        else:
            kinds.append("all" if dense is None else "dense_phase" if dense[i] else "sparse_phase")
    return kinds


def kind_times(call_ms: list[float], kinds: list[str], generations: int) -> dict:
    """Median call time and calls per generation of each kind of call (`call_kinds`)."""
    groups: dict[str, list[float]] = {}
    for ms, kind in zip(call_ms, kinds):
        groups.setdefault(kind, []).append(ms)
    return {"call_ms": {k: statistics.median(v) for k, v in groups.items()},
            "kind_calls": {k: len(v) / generations for k, v in groups.items()}}


def measure_head_tail(config: Config, options: dict, device: torch.device, dtype: torch.dtype, inputs: dict,
                      steps: int = 5) -> float:
    """Median ms of a call of the model built without its blocks, compiled with the variant's backend and options
    (cache off: there is no stack to cache), in the same sampling loop: a 2-step warm-up, then `steps` timed."""
    torch.manual_seed(0)
    bare = build_model(config, device, dtype, blocks=False)
    timer = CallTimer(compile_variant(bare, "vsparse", {**options, "cache": "none"}, device), device)
    with torch.no_grad():
        generate(config, timer, inputs, 2)
        timer.take()
        generate(config, timer, inputs, steps)
    return statistics.median(timer.take())


# ----------------------------------------------------------------------------------------------------------------
# The run: speedups and projections


def skip_shares(rows: list[dict], harness_skip: Optional[float], quality_json: Optional[str]) -> dict:
    """variant -> (skip share, where it comes from), for the cache variants."""
    if harness_skip is None and quality_json is None:
        return {}
    if harness_skip is not None and not 0 <= harness_skip <= 1:
        raise ValueError(f"--harness-skip must be a share between 0 and 1, got {harness_skip}")
    results = json.loads(Path(quality_json).read_text())["results"] if quality_json else []
    shares = {}
    for row in rows:
        if "error" in row or not uses_cache(row["variant"]):
            continue
        if harness_skip is not None:
            shares[row["variant"]] = (harness_skip, "--harness-skip")
            continue
        key = quality.resolve(variant_options(row["variant"])[1])
        match = next((r for r in results if quality.resolved_options(r) == key), None)
        if match is not None:
            shares[row["variant"]] = (match["cache_skipped"], f"{quality_json}: {match['setting']}")
    return shares


def project(row: dict, skip: float) -> dict:
    """A cache variant's generation time had the cache skipped `skip` of the calls (module docstring)."""
    per_gen = row["generations"]
    extra = skip * row["calls"] / per_gen - row["skipped"] / per_gen  # further skips per generation
    stack = row["stack_ms"]
    n = {kind: row["kind_calls"][kind] for kind in stack}  # computed calls per generation of each kind
    mean_stack = sum(n[p] * stack[p] for p in n) / sum(n.values())
    if extra >= 0:  # conservative: the further skips where the stack is cheapest first
        saved, left = 0.0, extra
        for kind in sorted(stack, key=stack.get):
            taken = min(left, n[kind])
            saved, left = saved + taken * stack[kind], left - taken
    else:  # fewer skips than measured: the dearest stack comes back
        saved = extra * max(stack.values())
    return {"skip": skip, "extra_skips_per_generation": extra,
            "projected_s": row["generation_s"] - extra * mean_stack / 1e3,
            "conservative_s": row["generation_s"] - saved / 1e3}


def summarize(header: dict, rows: list[dict], shares: dict) -> dict:
    """The report: speedup over Inductor for every row and, for cache rows with a skip share, the projection."""
    inductor = next((r for r in rows if r.get("variant") == "inductor" and "error" not in r), None)
    base = inductor["generation_s"] if inductor else None
    for row in rows:
        if "error" in row:
            continue
        row["speedup_vs_inductor"] = base / row["generation_s"] if base else None
        row.pop("projection", None)
        if row["variant"] in shares:
            skip, source = shares[row["variant"]]
            projection = project(row, skip)
            projection["skip_from"] = source
            for key in ("projected", "conservative"):
                projection[f"{key}_speedup_vs_inductor"] = base / projection[f"{key}_s"] if base else None
            row["projection"] = projection
    return {**header, "skip_note": SKIP_NOTE, "projection_note": PROJECTION_NOTE, "variants": rows}


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    rows = [r for r in report["variants"] if "error" not in r]
    device = rows[0]["device"] if rows else "-"
    lines = [f"{report['config']}, {report['steps']} steps, {device}, Inductor cache: {report['inductor_cache']}; "
             "per generation:", "",
             "| variant | compile + 1st gen (s) | gen (s) | vs Inductor | calls | computed | skipped | density "
             "| call ms (dense / sparse phase / skipped) | stack share | skip: projected (conservative) gen s "
             "| vs Inductor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["generations"]
        call = r["call_ms"]
        call_text = " / ".join(_num(call.get(k), ".1f") for k in (("all",) if "all" in call else
                                                                    ("dense_phase", "sparse_phase")) + ("skipped",))
        p = r.get("projection")
        projected = "-" if p is None else (f"{p['skip']:.2f}: {p['projected_s']:.2f} "
                                           f"({p['conservative_s']:.2f})")
        projected_speedup = "-" if p is None or p["projected_speedup_vs_inductor"] is None else (
            f"{p['projected_speedup_vs_inductor']:.2f}x ({p['conservative_speedup_vs_inductor']:.2f}x)")
        speedup = "-" if r["speedup_vs_inductor"] is None else f"{r['speedup_vs_inductor']:.2f}x"
        lines.append(
            f"| {r['variant']} | {r['first_generation_s']:.1f} | {r['generation_s']:.2f} | {speedup} | "
            f"{r['calls'] / g:g} | {r['computed'] / g:g} | {r['skipped'] / g:g} | {_num(r['density'], '.3f')} | "
            f"{call_text} | {_num(r.get('stack_share'), '.3f')} | {projected} | {projected_speedup} |")
    lines += [f"{r['variant']}: FAILED ({r['error'].strip().splitlines()[-1] if r['error'].strip() else 'no output'})"
              for r in report["variants"] if "error" in r]
    lines += ["", report["skip_note"], report["projection_note"]]
    return "\n".join(lines)


def _run_child(variant: str, args, env: dict) -> dict:
    """One variant in its own process; its log goes to our stderr as it comes, its row comes back as JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--config", args.config,
               "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
               "--generations", str(args.generations)]
    tail: deque = deque(maxlen=30)
    with tempfile.TemporaryFile("w+") as stdout:  # a file, not a pipe: stdout never blocks the child
        proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
        proc.wait()
        stdout.seek(0)
        lines = stdout.read().strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"variant": variant, "error": f"exit code {proc.returncode}\n" + "".join(tail)}
    return json.loads(lines[-1])


def main(argv: Optional[list] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="wan-1.3b")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                        help=f"names ({', '.join(VARIANTS)}) or vsparse options key=value,... (default: all names)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant in this process, its row on stdout
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int,
                        help="steps of the untimed first generation, at least 2 (default --steps)")
    parser.add_argument("--generations", type=int, default=1, help="timed generations after the warm-up one")
    parser.add_argument("--out", help="write the report as JSON (rewritten after every variant)")
    parser.add_argument("--shared-cache", nargs="?", const="", metavar="DIR",
                        help="one Inductor/Triton cache for every variant's process: a fresh one for this run, or "
                             "DIR (kept); default: an empty cache per variant")
    parser.add_argument("--head-tail-only", action="store_true",
                        help="only each cache variant's call without its blocks (benchmarks/choose_defaults.py)")
    parser.add_argument("--in-process", action="store_true",
                        help="every variant in this process (compiled code and caches carry over between them)")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--harness-skip", type=float, metavar="F",
                      help="project the cache variants to a trained model's skip share F")
    skip.add_argument("--quality-json", metavar="PATH",
                      help="project each cache variant to the skip share of benchmarks/quality.py's setting with "
                           "the same options")
    parser.add_argument("--from-json", metavar="PATH", help="no measuring: redo speedups and projections of a report")
    args = parser.parse_args(argv)
    args.warmup_steps = args.warmup_steps or args.steps
    if min(args.steps, args.generations) < 1 or args.warmup_steps < 2:
        # After a 1-step warm-up the next generation starts at the same timestep, and the runtime, which tells a new
        # generation by a rising timestep, takes it for another CFG branch of the same step.
        parser.error("--steps and --generations must be at least 1, --warmup-steps at least 2")

    if args.head_tail_only:
        report = {"config": args.config, "variants": [head_tail_row(v, args.config) for v in args.variants]}
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report))
        return report
    if args.variant:
        print(json.dumps(measure(args.variant, args.config, args.steps, args.warmup_steps, args.generations)))
        return {}
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        header = {k: v for k, v in report.items() if k not in ("skip_note", "projection_note", "variants")}
        rows = report["variants"]
    else:
        from dit_compiler.runtime.runner import HISTORY

        for variant in args.variants:
            variant_options(variant)  # a bad name fails now, not after the others ran
        calls = CONFIGS[args.config].calls_per_step * (args.warmup_steps + args.generations * args.steps)
        if calls > HISTORY:
            parser.error(f"{calls} calls in one process: dit_compiler.stats keeps the last {HISTORY}")
        header, rows = _measure_all(args)
    report = summarize(header, rows, skip_shares(rows, args.harness_skip, args.quality_json))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return report


def _measure_all(args) -> tuple[dict, list]:
    shared = None
    if args.in_process:
        cache = "in-process: this process's"
    elif args.shared_cache is None:
        cache = "cold (an empty one per variant)"
    else:
        shared = args.shared_cache or tempfile.mkdtemp(prefix="vsparse-generation-cache-")
        cache = f"shared by the variants ({shared})"
    header = {"config": args.config, "steps": args.steps, "warmup_steps": args.warmup_steps,
              "generations": args.generations, "inductor_cache": cache}
    rows = []
    try:
        for variant in args.variants:
            if args.in_process:
                rows.append(measure(variant, args.config, args.steps, args.warmup_steps, args.generations))
            else:
                root = shared or tempfile.mkdtemp(prefix="vsparse-generation-cache-")
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(root, "inductor"),
                           TRITON_CACHE_DIR=os.path.join(root, "triton"))
                rows.append(_run_child(variant, args, env))
                if shared is None:
                    shutil.rmtree(root, ignore_errors=True)
            print(json.dumps(rows[-1]), flush=True)
            if args.out:  # a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps(summarize(header, list(rows), {}), indent=2) + "\n")
    finally:
        if shared is not None and not args.shared_cache:
            shutil.rmtree(shared, ignore_errors=True)
    return header, rows


if __name__ == "__main__":
    main()
