"""timeline.png: what each call of a dumped graph did, drawn from its runtime.jsonl (`python -m dit_compiler show`).

One panel per model and CFG branch; one column per call, at its denoising step (generations side by side, a dashed
line between them). Rows, top to bottom:
  dense phase   a red cell where the call fell in the leading dense share of the trajectory
  block stack   blue where the stack was computed, orange where the cache reused it
  one per site  the visited-block fraction of each sparse site (colour scale beside), blank when the stack was reused
Needs matplotlib (the `plot` extra); `MissingPlotting` says how to get it.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

COMPUTED = "#1f77b4"
REUSED = "#ff7f0e"
DENSE = "#d62728"  # not a grey: antialiased text makes greys
DENSITY_COLORMAP = "viridis"
CELL = 0.8  # cell size in column / row units; the gap keeps neighbouring cells apart


class MissingPlotting(RuntimeError):
    """matplotlib is not installed."""


def runtime_calls(graph_dir: Path) -> list[dict]:
    """The call lines of a graph's runtime.jsonl (without the line saying it stopped)."""
    path = graph_dir / "runtime.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if "truncated" not in line]


def site_labels(graph_dir: Path) -> dict:
    """Site node -> its module path (what a reader recognizes), from analysis.json when there is one."""
    path = graph_dir / "analysis.json"
    if not path.exists():
        return {}
    return {s["node"]: s.get("module_path") or s["node"] for s in json.loads(path.read_text())["sites"]}


def columns(calls: list[dict]) -> tuple[dict, list[int]]:
    """Column of each (generation, step): generations side by side with one empty column between them; and the
    columns where a generation after the first starts."""
    last_step = defaultdict(int)
    for c in calls:
        last_step[c["generation"]] = max(last_step[c["generation"]], c["step"])
    offsets, starts, x = {}, [], 0
    for generation in sorted(last_step):
        if x:
            starts.append(x)
        offsets[generation] = x
        x += last_step[generation] + 2
    return {(c["generation"], c["step"]): offsets[c["generation"]] + c["step"] for c in calls}, starts


def render_timeline(graph_dir: Path, out: Path | None = None) -> Path | None:
    """Draw `graph_dir`'s timeline.png (or `out`); None when the graph ran no call."""
    try:
        from matplotlib.collections import PatchCollection
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
        import matplotlib
    except ImportError as e:
        raise MissingPlotting("timeline.png needs matplotlib: pip install 'dit-compiler[plot]' "
                              "(or pip install matplotlib)") from e
    calls = runtime_calls(graph_dir)
    if not calls:
        return None
    labels = site_labels(graph_dir)
    sites = sorted({name for c in calls for name in c.get("density") or {}})
    rows = ["dense phase", "block stack"] + [labels.get(s, s) for s in sites]
    column, starts = columns(calls)
    panels = defaultdict(list)
    for c in calls:
        panels[(c["model"], c["branch"])].append(c)
    width = max(column.values()) + 1
    norm, colormap = Normalize(0.0, 1.0), matplotlib.colormaps[DENSITY_COLORMAP]
    inches = (min(3.0 + 0.28 * width, 40.0), 0.6 + len(panels) * (0.7 + 0.28 * len(rows)))  # 40": 4,000 pixels
    fig = Figure(figsize=inches, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, ((model, branch), group) in zip(axes, sorted(panels.items())):
        cells = []
        for c in group:
            x = column[(c["generation"], c["step"])]
            if c.get("dense_phase"):
                cells.append((x, 0, DENSE))
            cells.append((x, 1, REUSED if c.get("cache") == "reuse" else COMPUTED))
            for i, site in enumerate(sites):
                value = (c.get("density") or {}).get(site)
                if value is not None:
                    cells.append((x, 2 + i, colormap(norm(value))))
        ax.add_collection(PatchCollection(
            [Rectangle((x - CELL / 2, y - CELL / 2), CELL, CELL) for x, y, _ in cells],
            facecolors=[color for _, _, color in cells], edgecolors="none", antialiased=False))
        for x in starts:
            ax.axvline(x - 1, color="0.6", linestyle="--", linewidth=1)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(f"model {model}, CFG branch {branch}", fontsize=9, loc="left")
    steps = sorted((x, step) for (_, step), x in column.items())
    shown = steps[::-(-len(steps) // 25)]  # at most 25 step numbers
    axes[-1].set_xticks([x for x, _ in shown], [str(step) for _, step in shown])
    axes[-1].set_xlabel("denoising step" + (" (generations left to right)" if starts else ""))
    fig.suptitle(graph_dir.name, fontsize=10)
    fig.legend(handles=[Patch(color=COMPUTED, label="stack computed"), Patch(color=REUSED, label="stack reused"),
                        Patch(color=DENSE, label="dense phase")], loc="outside lower center", ncols=3, fontsize=8)
    if sites:
        from matplotlib.cm import ScalarMappable

        fig.colorbar(ScalarMappable(norm, colormap), ax=list(axes), label="visited-block fraction", shrink=0.8)
    out = out or graph_dir / "timeline.png"
    fig.savefig(out, dpi=100)
    return out
