"""Defaults by measurement: each quality setting's Wan-1.3B generation speed, the quality-versus-speed frontier, and
the fastest setting that clears the bar.

Quality comes from the trained harness (`benchmarks/quality.py`: PSNR / SSIM of the final latents against dense, the
share of calls whose block stack the cache skipped `s`). Speed
comes from the Wan2.1-1.3B configuration on the GPU, never from the harness's wall time: forward times per planner
and density with every layer and step sparse (`benchmarks/end_to_end.py`), and per kind of call in a generation
(`benchmarks/generation.py`: dense-phase calls, the head and tail a skipped call still runs, Inductor's call).
A setting's mean call on Wan-1.3B is projected from those measured parts:

    t_call = c_dense * t_dense + c_sparse * t_sparse + s * t_skip
    t_sparse = t_fwd(planner, density) + L / layers * (t_inductor - t_fwd(planner, density))

f, the share of calls in the dense phase, follows from the schedule (the harness's 50 steps at its shift, the
setting's dense_steps: `dense_steps_share.dense_share`; 0.50 at the default 0.25). Which calls the cache skipped is
recorded by quality rows measured before `dit_compiler.stats` counted computed dense-phase calls
(`dense_computed`), so there the computed ones are placed two ways: spread over both phases alike, c_dense =
f (1 - s) and c_sparse = (1 - f)(1 - s); or, conservative, the skips taken from the sparse phase first (its calls
are the cheaper ones to skip), c_sparse = max(0, 1 - f - s), c_dense = 1 - s - c_sparse. A row with
`dense_computed_share` has its measured placement, which the choice then uses; otherwise the conservative one.

t_fwd: end_to_end's forward of that planner and density; L: the harness layers the setting kept dense (its dense
sites; a dense layer costs what an Inductor layer costs, attention being the only part that differs); t_dense: a
vsparse dense-phase call (generation.py's median, the planner's own if measured, else the mean of those measured);
t_skip: a call whose stack the cache skipped (generation.py's median where random weights made it skip, else the
head-and-tail call).
Speedup = t_inductor / t_call, t_inductor from the same end_to_end run as t_fwd. The harness's skip share s is taken
to carry over to Wan-1.3B (an assumption: it is a 6-layer model's), and a skipped call to cost its head and tail
only (the cache's own host work on it is not in t_skip).

A setting whose planner and density have no measured forward is listed without a speed and cannot be chosen.
The choice: the fastest projected setting whose mean PSNR >= 32 dB and mean SSIM >= 0.93 (issue 9's bar).

    python benchmarks/choose_defaults.py --quality q1/quality.json q2/quality.json --forward e2e.json \\
        --generation gen.json headtail.json --out results/defaults
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package: its siblings by name
import quality  # noqa: E402
from dense_steps_share import dense_share  # noqa: E402

WAN_LAYERS = 30  # Wan2.1-1.3B's blocks (end_to_end.CONFIGS["wan-1.3b"])


def load_quality(paths: list[str]) -> list[dict]:
    """Every setting's row, the latest file winning for a setting measured twice (each file holds its dense run)."""
    rows: dict[str, dict] = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        for row in report["results"]:
            rows[row["setting"]] = {**row, "source": path}
    return list(rows.values())


def load_forwards(paths: list[str]) -> tuple[dict, float]:
    """((planner, density) -> forward ms, Inductor's forward ms) from end_to_end.py reports; all from runs that
    timed Inductor too, the sparse figures scaled to the first file's Inductor (runs differ by a few percent)."""
    forwards, inductor = {}, None
    for path in paths:
        rows = [r for r in json.loads(Path(path).read_text()) if "forward_ms" in r]
        base = next((r["forward_ms"] for r in rows if r["variant"] == "inductor"), None)
        if base is None:
            raise ValueError(f"{path}: no Inductor row; sparse forwards are only compared within one run")
        inductor = inductor or base
        for r in rows:
            parts = r["variant"].split("-")  # vsparse-<planner>-<density>
            if len(parts) == 3 and parts[0] == "vsparse":
                forwards[(parts[1], float(parts[2]))] = r["forward_ms"] * inductor / base
    if inductor is None:
        raise ValueError("no end_to_end report given")
    return forwards, inductor


def load_calls(paths: list[str]) -> dict:
    """From generation.py reports (whole generations, or `--head-tail-only`): dense-phase call ms per planner, and
    the skipped call's ms."""
    rows = [r for path in paths for r in json.loads(Path(path).read_text())["variants"] if "error" not in r]
    dense, skipped, head_tail = {}, [], []
    for r in rows:
        planner = (r.get("options") or {}).get("sparsity")
        if "dense_phase" in r["call_ms"] and planner:
            dense.setdefault(planner, []).append(r["call_ms"]["dense_phase"])
        if "skipped" in r["call_ms"]:
            skipped.append(r["call_ms"]["skipped"])
        if r.get("head_tail_ms") is not None:
            head_tail.append(r["head_tail_ms"])
    if not dense:
        raise ValueError(f"{', '.join(paths)}: no vsparse variant with dense-phase calls")
    if not skipped and not head_tail:
        raise ValueError(f"{', '.join(paths)}: no cache variant (no skipped call and no head-and-tail call measured)")
    return {"dense_ms": {p: statistics.median(v) for p, v in dense.items()},
            "skip_ms": statistics.median(skipped) if skipped else statistics.median(head_tail),
            "skip_from": "skipped calls" if skipped else "head-and-tail call (no call skipped on random weights)"}


def schedule_dense_share(row: dict, shift: float, steps: int) -> float:
    """The share of the harness's calls in the setting's dense phase, from the schedule."""
    return dense_share(shift, steps, float(quality.resolved_options(row)["dense_steps"]))


def project(row: dict, forwards: dict, inductor_ms: float, calls: dict, layers: int = WAN_LAYERS) -> Optional[dict]:
    """The setting's projected Wan-1.3B call (module docstring), spread and conservative, or None without a measured
    forward. `row["dense_share"]`: `schedule_dense_share`."""
    options = quality.resolved_options(row)
    planner = options["sparsity"]
    f, s = row["dense_share"], row["cache_skipped"]
    if planner == "none":
        sparse = dense = inductor_ms
    else:
        # Dense layers as measured (the harness's dense sites).
        forward = forwards.get((planner, float(options["density"])))
        if forward is None:
            return None
        sparse_sites, sites = row["sparse_sites"]
        dense_layers = sites - sparse_sites  # the harness has one self-attention site a layer
        sparse = forward + dense_layers / layers * (inductor_ms - forward)
        dense = calls["dense_ms"].get(planner, statistics.mean(calls["dense_ms"].values()))
    placements = {"spread": (f * (1 - s), (1 - f) * (1 - s)), "conservative": (1 - s - max(0.0, 1 - f - s),
                                                                             max(0.0, 1 - f - s))}
    if "dense_computed_share" in row:
        placements["measured"] = (row["dense_computed_share"], 1 - s - row["dense_computed_share"])
    result = {"sparse_ms": sparse, "dense_ms": dense}
    for name, (computed_dense, computed_sparse) in placements.items():
        call = computed_dense * dense + computed_sparse * sparse + s * calls["skip_ms"]
        result[f"{name}_call_ms"], result[f"{name}_speedup"] = call, inductor_ms / call
    return result


def choose(rows: list[dict]) -> Optional[dict]:
    """The fastest projected row at the bar, or None when no measured row clears it."""
    passing = [r for r in rows if r.get("projection") and passes(r)]
    return max(passing, key=chosen_speedup, default=None)


def chosen_speedup(row: dict) -> float:
    """The projection the choice ranks by: the measured placement of skips where the row has it, else the
    conservative one."""
    p = row["projection"]
    return p.get("measured_speedup", p["conservative_speedup"])


def passes(row: dict) -> bool:
    return row["psnr_mean"] >= quality.PSNR_TARGET and row["ssim_mean"] >= quality.SSIM_TARGET


def report(quality_paths, forward_paths, generation_paths) -> dict:
    rows = load_quality(quality_paths)
    forwards, inductor = load_forwards(forward_paths)
    calls = load_calls(generation_paths)
    for row in rows:
        header = json.loads(Path(row["source"]).read_text())
        row["dense_share"] = schedule_dense_share(row, header["harness"]["shift"], header["steps"])
        row["projection"] = project(row, forwards, inductor, calls)
    chosen = choose(rows)
    return {"inductor_forward_ms": inductor, "forwards": {f"{p}-{d:g}": ms for (p, d), ms in forwards.items()},
            "calls": calls, "sources": {"quality": quality_paths, "forward": forward_paths,
                                        "generation": generation_paths},
            "rows": rows, "chosen": chosen["setting"] if chosen else None}


def markdown(rep: dict) -> str:
    lines = [f"Inductor forward {rep['inductor_forward_ms']:.1f} ms; dense-phase call "
             + ", ".join(f"{p} {ms:.1f} ms" for p, ms in rep["calls"]["dense_ms"].items())
             + f"; skipped call {rep['calls']['skip_ms']:.1f} ms ({rep['calls']['skip_from']}).", "",
             "| setting | PSNR dB mean (worst) | SSIM mean (worst) | at the bar | dense share | skipped | "
             "projected Wan-1.3B call ms: ranked (spread) | vs Inductor: ranked (spread) |",
             "|---|---|---|---|---|---|---|---|"]
    rows = sorted(rep["rows"], key=lambda r: -chosen_speedup(r) if r["projection"] else 0)
    for r in rows:
        p = r["projection"]
        mark = " **(chosen)**" if r["setting"] == rep["chosen"] else ""
        ranked = "measured" if p is not None and "measured_speedup" in p else "conservative"
        call = "-" if p is None else f"{p[f'{ranked}_call_ms']:.1f} ({p['spread_call_ms']:.1f})"
        speed = "not measured" if p is None else (f"{p[f'{ranked}_speedup']:.2f}x ({p['spread_speedup']:.2f}x)"
                                                  + (", skips placed as measured" if ranked == "measured" else ""))
        lines.append(
            f"| `{r['setting']}`{mark} | {r['psnr_mean']:.2f} ({r['psnr_min']:.2f}) | {r['ssim_mean']:.3f} "
            f"({r['ssim_min']:.3f}) | {'yes' if passes(r) else 'no'} | {r['dense_share']:.2f} | "
            f"{r['cache_skipped']:.2f} | {call} | {speed} |")
    lines += ["", f"Chosen: {rep['chosen'] or 'none clears the bar'}."]
    return "\n".join(lines)


def plot(path: Path, rep: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rep["rows"]:
        if r["projection"] is None:
            continue
        x, y = chosen_speedup(r), r["psnr_mean"]
        ax.scatter(x, y, color="tab:green" if passes(r) else "tab:gray",
                   marker="*" if r["setting"] == rep["chosen"] else "o", s=160 if r["setting"] == rep["chosen"] else 30)
        ax.annotate(r["setting"].replace("sparsity=", "").replace("cache=easycache,cache_threshold=", "cache "),
                    (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(quality.PSNR_TARGET, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("projected Wan-1.3B generation speedup over Inductor dense (x; measured skip placement, else "
                  "conservative)")
    ax.set_ylabel("harness latent PSNR vs dense (dB)")
    ax.set_title("green: PSNR >= 32 dB and SSIM >= 0.93; star: chosen", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[list] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", nargs="+", required=True, help="quality.py reports (later files win)")
    parser.add_argument("--forward", nargs="+", required=True, help="end_to_end.py reports, each with Inductor")
    parser.add_argument("--generation", nargs="+", required=True,
                        help="generation.py reports: a sparse variant's dense phase; a cache variant's skipped or "
                             "head-and-tail call (--head-tail-only measures that alone)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rep = report(args.quality, args.forward, args.generation)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "defaults.json").write_text(json.dumps(rep, indent=1))
    (out / "defaults.md").write_text(markdown(rep) + "\n")
    try:
        plot(out / "defaults.png", rep)
    except ImportError:
        print("matplotlib is not installed: no defaults.png", file=sys.stderr)
    print(markdown(rep))
    return rep


if __name__ == "__main__":
    main()
