"""Quality of vsparse settings against dense Inductor, on the trained harness model (examples/harness).

For a fixed set of captions and seeds, every setting generates the same videos as dense Inductor
(`torch.compile(model, backend="inductor")`): FlowMatchEulerDiscreteScheduler at the shift the harness was trained
with, classifier-free guidance with two transformer calls per step (the caption and the null embedding, as
diffusers' Wan pipeline makes them), one generation at a time (batch 1: the cache decides per call). Each setting
compiles with `torch.compile(model, backend="vsparse", options=...)` after a fresh `torch._dynamo.reset()`.

Metrics, per setting, of the final latents against dense (not decoded pixels: the harness has no VAE; published
figures are on decoded pixels, so these are not directly comparable to them):
- PSNR: 10 log10(R^2 / MSE), R = the dense latents' max - min (per generation); mean and worst over generations.
- SSIM: per frame over the two spatial axes (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range R, valid
  filtering), averaged over channels and frames; mean and worst over generations.
- cache skipped: the share of block-stack runs EasyCache skipped (reused).
- dense-phase calls: the share of transformer calls in the leading `dense_steps` share of the trajectory.
- mean density: the rewritten sites' visited-block fraction over the computed calls (dense-phase calls count 1).
- work: attention + stack cost relative to dense (formula in `relative_work`).
Calls, skips, dense-phase calls and densities come from `dit_compiler.stats(compiled)`.
- wall time: of the harness on this device. NOT a speed claim: the harness is tiny; speed comes from the
  Wan-1.3B configuration (benchmarks/end_to_end.py, benchmarks/generation.py).

    python benchmarks/quality.py --harness examples/harness --out results/quality            # GPU, default grid
    python benchmarks/quality.py --part 1/3 ... --part 3/3                                     # the grid in 3 commands
    python benchmarks/quality.py --settings "sparsity=draft,density=0.15" "sparsity=none,cache=easycache"
    python benchmarks/quality.py --harness /tmp/harness --quick --device cpu --out /tmp/q      # CPU, toy
    python benchmarks/quality.py --out results/quality --plot-only                             # redraw from JSON
    python benchmarks/quality.py --settings "sparsity=svg,density=0.1,cache=none" --sample-rows 32 --out /tmp/q32

A setting is `key=value,key=value` with README.md's option keys; unnamed keys take vsparse's defaults.
Writes quality.json, quality.md and quality.png (the frontier) into --out, the dense latents (dense.pt) and each
setting's dump under dumps/. A later run into the same --out with the same harness, captions, seeds, steps,
guidance and device continues it (dense latents reused, earlier settings kept): a grid longer than one command's
time limit runs as several `--settings ...` commands.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dit_compiler
import dit_compiler.options

DEFAULT_SETTINGS = (
    "sparsity=none,cache=none",  # vsparse without rewrites or cache: must match dense
    *(f"sparsity={planner},density={density},cache=none" for planner in ("draft", "svg", "dual")
      for density in (0.25, 0.15, 0.1)),
    "sparsity=none,cache=easycache,cache_threshold=0.1,cache_start=0",
    "sparsity=none,cache=easycache,cache_threshold=0.25,cache_start=0.05",
    "sparsity=svg,density=0.15,dense_steps=0.15,cache=easycache,cache_threshold=0.25,cache_start=0.05",  # defaults
    "sparsity=svg,density=0.1,dense_steps=0.15,cache=easycache,cache_threshold=0.25,cache_start=0.05",
    "sparsity=svg,density=0.15,dense_steps=0.25,cache=easycache,cache_threshold=0.3,cache_start=0.05",
    "sparsity=svg,density=0.15,dense_steps=0.25,cache=none", "sparsity=svg,density=0.15,dense_layers=0,cache=none",
)
# CPU toy: a dense-equivalent setting and one that is sparse and caches (a high threshold, so a few steps skip).
QUICK_SETTINGS = (
    "sparsity=none,cache=none",
    "sparsity=draft,density=0.5,dense_steps=0,dense_layers=0,block_size=64,cache=easycache,cache_threshold=1.0",
)
PSNR_TARGET, SSIM_TARGET = 32.0, 0.93  # issue 9's bar for choosing defaults
# A setting names the options that differ from vsparse's defaults, and the defaults have changed: rows record the
# options they resolved to (`resolved_options`); rows written before they did were measured under these defaults.
COMPUTING_OPTIONS = ("sparsity", "density", "block_size", "dense_steps", "dense_layers", "cache", "cache_threshold",
                     "cache_start", "plan_every")
DEFAULTS_BEFORE_2026_11_24 = {"sparsity": "draft", "density": 0.25, "block_size": 128, "dense_steps": 0.25,
                              "dense_layers": 1, "cache": "none", "cache_threshold": 0.05, "cache_start": 0.0}
# Options added after rows were recorded, with the value that computes what those rows computed.
ADDED_OPTIONS = {"plan_every": 1}


def resolve(options: dict) -> dict:
    """The options that decide what a setting computes, with vsparse's current defaults filled in."""
    parsed = dataclasses.asdict(dit_compiler.options.parse_options(options))
    return {key: parsed[key] for key in COMPUTING_OPTIONS}


def resolved_options(row: dict) -> dict:
    """What a quality row's setting computed: its recorded resolution, or the options it named over the defaults
    of the time for a row that recorded none."""
    if "resolved_options" in row:
        return {**ADDED_OPTIONS, **row["resolved_options"]}
    return {**DEFAULTS_BEFORE_2026_11_24, **ADDED_OPTIONS,
            **{k: v for k, v in row["options"].items() if k in COMPUTING_OPTIONS}}


def parse_setting(spec: str) -> dict:
    """"sparsity=draft,density=0.15" -> {"sparsity": "draft", "density": 0.15}; vsparse validates keys and values."""
    options = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"setting {spec!r}: {item!r} is not key=value")
        for convert in (int, float):
            try:
                value = convert(value)
                break
            except ValueError:
                pass
        options[key.strip()] = value
    return options


def select_part(specs, part: str) -> list:
    """The K-th of N consecutive slices of the settings, "K/N" (1-based); the N parts together are all of them."""
    k, _, n = part.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise ValueError(f"--part must be K/N with 1 <= K <= N, got {part!r}")
    size = math.ceil(len(specs) / int(n))
    return list(specs[(int(k) - 1) * size: int(k) * size])


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def psnr(test: torch.Tensor, reference: torch.Tensor, data_range: float) -> float:
    """10 log10(data_range^2 / MSE); inf for identical tensors."""
    mse = (test.double() - reference.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-x * x / (2 * sigma * sigma))
    return w / w.sum()


def ssim(test: torch.Tensor, reference: torch.Tensor, data_range: float, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two [C, F, H, W] latents: per frame over (H, W) with a Gaussian window (valid filtering; the window
    shrinks to the smaller spatial side when that is below `window`), averaged over channels and frames."""
    if test.shape != reference.shape or test.dim() != 4:
        raise ValueError(f"ssim wants two [C, F, H, W] tensors of one shape, got {tuple(test.shape)} and "
                         f"{tuple(reference.shape)}")
    size = min(window, test.shape[-2], test.shape[-1])
    w = _gaussian_window(size, sigma)
    x = test.double().flatten(0, 1).unsqueeze(1)  # [C*F, 1, H, W]
    y = reference.double().flatten(0, 1).unsqueeze(1)

    def blur(t):
        t = F.conv2d(t, w.view(1, 1, -1, 1))
        return F.conv2d(t, w.view(1, 1, 1, -1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).mean().item()


# ----------------------------------------------------------------------------------------------------------------
# What the compiled model did


def stack_counts(rows: list[dict]) -> dict:
    """Transformer calls, block-stack runs reused by the cache, calls in the dense phase (all, and computed), and
    each rewritten site's mean visited-block fraction over the computed calls (dense-phase calls count 1), summed
    over the rows of `dit_compiler.stats(compiled)` (every graph, generation and CFG branch)."""
    computed = sum(r["computed"] for r in rows)
    weighted: dict[str, float] = {}
    for row in rows:
        for site, density in row["density"].items():
            weighted[site] = weighted.get(site, 0.0) + density * row["computed"]
    return {"calls": sum(r["calls"] for r in rows), "reused": sum(r["reused"] for r in rows),
            "dense_calls": sum(r["dense_calls"] for r in rows),
            "dense_computed": sum(r["dense_computed"] for r in rows),
            "mean_density": {site: total / computed for site, total in weighted.items()}}


def rewritten_sites(dump_dir: Path) -> tuple[int, int]:
    """(self-attention sites rewritten to block-sparse attention, all self-attention sites), from the dumps'
    analysis.json."""
    rewritten = total = 0
    for path in Path(dump_dir).glob("*/analysis.json"):
        for site in json.loads(path.read_text())["sites"]:
            if site["self_attention"]:
                total += 1
                rewritten += bool(site["rewritten"])
    return rewritten, total


def attention_share(config: dict, tokens: int, text_tokens: int) -> float:
    """Self-attention's share of a dense block's FLOPs per video token: 4 S d (QK^T and PV over S keys) against
    that plus 12 d^2 (self-attention q, k, v, out and cross-attention q, out projections), 4 T d (cross-attention
    over T text tokens) and 4 d ffn (feed-forward)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    attention = 4 * tokens * d
    return attention / (attention + 12 * d * d + 4 * text_tokens * d + 4 * d * config["ffn_dim"])


def relative_work(counts: dict, share: float, num_layers: int) -> float:
    """Block-stack work relative to dense, per transformer call:
        work = (computed / calls) * ((1 - a) + a * attn),   attn = (L - n + sum of the n rewritten sites' d) / L,
    with a = `attention_share`, L layers, computed = calls - reused, d a site's mean visited-block fraction over the
    computed calls (`stack_counts`: dense-phase calls count 1, so attn is the computed calls' mean attention cost).
    Ignores the head and tail outside the stack, the cache's own check and the mask planning."""
    computed = counts["calls"] - counts["reused"]
    if computed == 0:
        return 0.0
    densities = counts["mean_density"]
    attn = (num_layers - len(densities) + sum(densities.values())) / num_layers
    return computed / counts["calls"] * ((1 - share) + share * attn)


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def load_harness(path: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    record = json.loads((path / "harness.json").read_text())
    # from_config + load_state_dict: from_pretrained(torch_dtype=...) needs `accelerate`.
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(path))
    model.load_state_dict(load_file(str(path / "diffusion_pytorch_model.safetensors")))
    model = model.to(device).eval()
    for parameter in model.parameters():  # parameters only: the RoPE tables (buffers) stay float64, as trained
        parameter.data = parameter.data.to(dtype)
    text = load_file(str(path / "text_embeddings.safetensors"))
    return model, record, text["captions"].to(device, dtype), text["null"].to(device, dtype)


def generate(transformer, noise: torch.Tensor, prompt: torch.Tensor, null: torch.Tensor, shift: float, steps: int,
             guidance: float) -> torch.Tensor:
    """Flow-matching Euler sampling with CFG, two transformer calls per step; latents stay in float32 and are
    cast to the model's dtype for each call, as diffusers' Wan pipeline does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, device=noise.device)
    scheduler.set_begin_index(0)  # as diffusers' pipelines do: the step index is not looked up on the device
    latents = noise.float()
    for t in scheduler.timesteps:
        x = latents.to(prompt.dtype)
        timestep = t.expand(latents.shape[0])
        cond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=prompt, return_dict=False)[0]
        uncond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=null, return_dict=False)[0]
        velocity = uncond.float() + guidance * (cond.float() - uncond.float())
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


def run_setting(fn, cases: list, shift: float, steps: int, guidance: float, device: torch.device) -> tuple[list, list]:
    """Final latents of every (noise, prompt, null) case, and the wall time of each generation."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results, seconds = [], []
    with torch.no_grad():
        for noise, prompt, null in cases:
            sync()
            start = time.perf_counter()
            results.append(generate(fn, noise, prompt, null, shift, steps, guidance).cpu())
            sync()
            seconds.append(time.perf_counter() - start)
    return results, seconds


# ----------------------------------------------------------------------------------------------------------------
# Report


def _fmt_db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def write_markdown(path: Path, report: dict) -> None:
    h = report["harness"]
    lines = [
        f"# vsparse quality on the harness ({report['device']}, {report['dtype']}, torch {report['torch']})", "",
        f"{len(report['cases'])} generations (captions {report['captions']}, seeds {report['seeds']}), "
        f"{report['steps']} steps, CFG {report['guidance']}, shift {h['shift']}, token grid "
        f"{'x'.join(map(str, h['token_grid']))}. Against dense Inductor on the final latents: PSNR with peak = the "
        "dense latents' max - min; SSIM per frame over the spatial axes, averaged over channels and frames "
        "(published figures are on decoded pixels). Work: stack cost relative to dense "
        f"(attention share a = {report['attention_share']:.3f}; formula in benchmarks/quality.py). "
        "Wall time is the harness's on this device, not a speed claim.", "",
        "| setting | PSNR dB mean (worst) | SSIM mean (worst) | cache skipped | dense-phase calls | sparse sites | "
        "mean density (computed calls) | work | first gen. s (compile) | gen. s |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        density = r["mean_density"]
        lines.append(
            f"| `{r['setting']}` | {_fmt_db(r['psnr_mean'])} ({_fmt_db(r['psnr_min'])}) | {r['ssim_mean']:.4f} "
            f"({r['ssim_min']:.4f}) | {r['cache_skipped']:.2f} | {r['dense_call_share']:.2f} | "
            f"{r['sparse_sites'][0]}/{r['sparse_sites'][1]} | {'-' if density is None else f'{density:.3f}'} | "
            f"{r['work']:.3f} | {r['first_generation_s']:.1f} | {r['generation_s']:.2f} |")
    d = report["dense"]
    lines += ["", f"dense Inductor: first generation (compile) {d['first_generation_s']:.1f} s, generation "
              f"{d['generation_s']:.2f} s."]
    path.write_text("\n".join(lines) + "\n")


def plot_frontier(path: Path, report: dict) -> None:
    """PSNR and SSIM against work, one point per setting; the Pareto frontier (best quality at no more work) joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    finite = [r["psnr_mean"] for r in results if math.isfinite(r["psnr_mean"])]
    cap = max(finite + [PSNR_TARGET]) + 5  # identical results (inf dB) are drawn at the top, marked
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, key, target, label in ((axes[0], "psnr_mean", PSNR_TARGET, "PSNR vs dense (dB), mean"),
                                   (axes[1], "ssim_mean", SSIM_TARGET, "SSIM vs dense, mean")):
        points = [(r["work"], min(r[key], cap), r["setting"]) for r in results]
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=18)
        for x, y, name in points:
            ax.annotate(name.replace("sparsity=", "").replace("cache=easycache,cache_threshold", "cache"),
                        (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        frontier, best = [], -math.inf
        for x, y, _ in sorted(points, key=lambda p: (p[0], -p[1])):
            if y > best:
                frontier.append((x, y))
                best = y
        ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "-", alpha=0.5)
        ax.axhline(target, linestyle="--", color="grey", linewidth=0.8)
        ax.set_xlabel("work relative to dense (attention + stack)")
        ax.set_ylabel(label + (f" (inf drawn at {cap:.0f})" if key == "psnr_mean" else ""))
        ax.grid(alpha=0.3)
    fig.suptitle(f"vsparse on the quality harness: final latents vs dense Inductor, {report['steps']} steps, CFG "
                 f"({report['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------


def evaluate_setting(model, spec: str, cases: list, reference: list, shift: float, steps: int, guidance: float,
                     device: torch.device, dump_dir: Path, share: float) -> dict:
    """Compile one setting afresh, generate every case, compare with the dense latents."""
    # The harness is small: the cost model would keep it dense and uncached, so quality is measured through the
    # force options.
    options = {**parse_setting(spec), "force_sparse": True, "force_cache": True, "dump_dir": str(dump_dir)}
    torch._dynamo.reset()
    # A copy per setting: stats() finds run-time state by the model's parameters, and an earlier setting's runner
    # can outlive the reset (reference cycles) and would be counted with this one.
    compiled = torch.compile(copy.deepcopy(model), backend="vsparse", options=options, fullgraph=True)
    latents, seconds = run_setting(compiled, cases, shift, steps, guidance, device)
    psnrs, ssims = [], []
    for test, dense in zip(latents, reference):
        data_range = (dense.max() - dense.min()).item()
        psnrs.append(psnr(test, dense, data_range))
        ssims.append(ssim(test[0], dense[0], data_range))
    counts = stack_counts(dit_compiler.stats(compiled))
    densities = counts["mean_density"]
    return {
        "setting": spec, "options": options, "resolved_options": resolve(options),
        "psnr_mean": sum(psnrs) / len(psnrs), "psnr_min": min(psnrs), "psnr": psnrs,
        "ssim_mean": sum(ssims) / len(ssims), "ssim_min": min(ssims), "ssim": ssims,
        "cache_skipped": counts["reused"] / max(counts["calls"], 1),
        "dense_call_share": counts["dense_calls"] / max(counts["calls"], 1),
        "dense_computed_share": counts["dense_computed"] / max(counts["calls"], 1),
        "mean_density": sum(densities.values()) / len(densities) if densities else None,
        "sparse_sites": list(rewritten_sites(dump_dir)), "runtime": counts,
        "work": relative_work(counts, share, model.config["num_layers"]),
        **_timing(seconds)}


def _timing(seconds: list[float]) -> dict:
    later = seconds[1:] or seconds
    return {"first_generation_s": seconds[0], "generation_s": sum(later) / len(later)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harness", default="examples/harness", help="directory written by train_tiny_video_dit.py")
    parser.add_argument("--out", default="results/quality")
    parser.add_argument("--settings", nargs="+", help="key=value,... specs (default: the grid in this file)")
    parser.add_argument("--captions", help="comma-separated caption indices (default 0,5,10,15; quick: 0)")
    parser.add_argument("--seeds", help="comma-separated noise seeds (default 0,1; quick: 0)")
    parser.add_argument("--steps", type=int, help="sampling steps (default 50; quick: 5)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--part", help="K/N: only the K-th of N consecutive slices of the settings (1-based), to "
                                       "spread a grid over several commands into one --out")
    parser.add_argument("--quick", action="store_true", help="CPU toy: one generation, 5 steps, two settings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sample-rows", type=int, default=None,
                        help="svg's sampled query rows per call (default: passes/planners/svg.py's SAMPLE_ROWS); "
                             "recorded in the report, so a run with another count does not continue this one")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw quality.md and quality.png from --out's quality.json (no device, no model)")
    parser.add_argument("--fresh", action="store_true",
                        help="ignore an earlier run in --out (by default one with the same harness, captions, seeds, "
                             "steps, guidance and device is continued: its dense latents reused, its other settings "
                             "kept, so a long grid can run in several commands)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if args.plot_only:
        report = json.loads((out / "quality.json").read_text())
        write_report(out, report)
        return report

    from dit_compiler.options import parse_options
    from dit_compiler.passes.planners import svg

    if args.sample_rows is not None:
        if args.sample_rows < 1:
            raise SystemExit(f"--sample-rows must be >= 1, got {args.sample_rows}")
        svg.SAMPLE_ROWS = args.sample_rows

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    specs = args.settings or (QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS)
    if args.part:
        specs = select_part(specs, args.part)
    for spec in specs:
        parse_options(parse_setting(spec))  # a bad setting fails now, not after an hour of others
    captions = [int(c) for c in (args.captions or ("0" if args.quick else "0,5,10,15")).split(",")]
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    steps = args.steps or (5 if args.quick else 50)
    out.mkdir(parents=True, exist_ok=True)

    model, harness, caption_table, null = load_harness(Path(args.harness), device, dtype)
    if not 0 <= min(captions) <= max(captions) < len(caption_table):
        raise SystemExit(f"--captions must be indices below {len(caption_table)}, got {captions}")
    cases = [(torch.randn(1, *harness["latent_shape"], generator=torch.Generator().manual_seed(seed)).to(device),
              caption_table[c: c + 1], null.unsqueeze(0)) for c in captions for seed in seeds]
    share = attention_share(model.config, harness["tokens"], null.shape[0])
    run = {"harness": {k: harness[k] for k in ("command", "preset", "shift", "token_grid", "tokens", "steps")},
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "dtype": str(dtype).replace("torch.", ""), "captions": captions, "seeds": seeds, "steps": steps,
           "guidance": args.guidance, "svg_sample_rows": svg.SAMPLE_ROWS,
           # what "mean density" and "dense-phase calls" count; runs written before it counted them otherwise
           "counts": "dit_compiler.stats: densities over computed calls, dense-phase calls over all calls"}
    previous = None
    if not args.fresh and (out / "quality.json").exists() and (out / "dense.pt").exists():
        earlier = json.loads((out / "quality.json").read_text())
        if {k: earlier.get(k) for k in run} == run:
            previous = earlier
    print(f"{len(cases)} generations x {steps} steps with CFG on {device} ({dtype}); {len(specs)} settings; "
          f"attention share {share:.3f}" + ("; continuing the run in " + str(out) if previous else ""), flush=True)

    if previous:
        reference, dense = torch.load(out / "dense.pt"), previous["dense"]
    else:
        torch._dynamo.reset()
        reference, seconds = run_setting(torch.compile(model, backend="inductor", fullgraph=True), cases,
                                         harness["shift"], steps, args.guidance, device)
        torch.save(reference, out / "dense.pt")
        dense = _timing(seconds)
        print(f"dense Inductor: {seconds[0]:.1f} s first generation", flush=True)
    results = {r["setting"]: r for r in (previous["results"] if previous else [])}
    for index, spec in enumerate(specs):
        dump_dir = out / "dumps" / spec.replace("=", "-").replace(",", "_")
        shutil.rmtree(dump_dir, ignore_errors=True)  # runtime.jsonl of an earlier run must not be counted
        result = evaluate_setting(model, spec, cases, reference, harness["shift"], steps, args.guidance, device,
                                  dump_dir, share)
        results[spec] = result
        print(f"[{index + 1}/{len(specs)}] {spec}: PSNR {_fmt_db(result['psnr_mean'])} dB, SSIM "
              f"{result['ssim_mean']:.4f}, skipped {result['cache_skipped']:.2f}, sparse sites "
              f"{result['sparse_sites'][0]}/{result['sparse_sites'][1]}, work {result['work']:.3f}, "
              f"{result['first_generation_s']:.1f} s first generation", flush=True)
        report = {**run, "harness_dir": args.harness, "torch": torch.__version__,
                  "cases": [[c, s] for c in captions for s in seeds], "attention_share": share,
                  "metric_note": "final latents vs dense Inductor; PSNR peak and SSIM data range = dense max - min; "
                                 "SSIM per frame over the spatial axes, averaged over channels and frames; published "
                                 "figures are on decoded pixels",
                  "wall_time_note": "harness wall time on this device; not a speed claim",
                  "dense": dense, "results": list(results.values())}
        # After every setting: a run cut short by its time limit keeps what it measured and can be continued.
        (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report(out, report)
    return report


def write_report(out: Path, report: dict) -> None:
    """quality.md, and quality.png where matplotlib is installed (else `--plot-only` redraws it elsewhere)."""
    write_markdown(out / "quality.md", report)
    print((out / "quality.md").read_text())
    try:
        plot_frontier(out / "quality.png", report)
    except ImportError:
        print("matplotlib is not installed: no quality.png. Install it (pip install matplotlib) or copy quality.json "
              "to a machine that has it and run `python benchmarks/quality.py --out DIR --plot-only` there.")


if __name__ == "__main__":
    main()
