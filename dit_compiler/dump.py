"""The dump: what the compiler saw, decided and did, for a human to read (`dump_dir/<graph name>/`).

captured.py   the graph as Dynamo captured it
analysis.json recognized sites, layouts, block stacks, timestep input, and every decision with its reason
rewritten.py  the graph after our passes, as handed to Inductor
report.md     one table to read first
runtime.jsonl one line per call (at most RUNTIME_LINES): model, generation, step, branch, timestep, dense phase,
              cache decision, per-site density
masks/*.png   block masks (white = visited) of the first sparse call, one picture per site, heads side by side
timeline.png  drawn by `python -m dit_compiler show` from runtime.jsonl (dit_compiler/timeline.py)

A dump directory holds one run: the first graph a process dumps into it removes the graph folders an earlier
process left there (only folders marked as ours), so `show` never mixes runs.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import torch

RUNTIME_LINES = 10_000  # runtime.jsonl stops here (with a last line saying so): a long-running server stays bounded
_GRAPH_MARK = ".vsparse-graph"
_RUN_MARK = ".vsparse-run"
_RUN_ID = f"{os.getpid()}-{time.time_ns()}"  # this process


def write_png(path: Path, pixels: torch.Tensor) -> None:
    """Write a [rows, cols] uint8 grey image as PNG (zlib + struct: no imaging dependency)."""
    rows, cols = pixels.shape
    raw = b"".join(b"\x00" + bytes(pixels[r].tolist()) for r in range(rows))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def mask_picture(visit: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """[H, nq, nkv] bool -> one uint8 image with the heads side by side, separated by grey columns."""
    heads, nq, nkv = visit.shape
    image = torch.full((nq, heads * (nkv + gap) - gap), 128, dtype=torch.uint8)
    for h in range(heads):
        image[:, h * (nkv + gap): h * (nkv + gap) + nkv] = visit[h].to(torch.uint8) * 255
    return image


def _claim(root: Path) -> None:
    """Make `root` this process's run: remove graph folders an earlier run left (ours only), mark the run."""
    root.mkdir(parents=True, exist_ok=True)
    mark = root / _RUN_MARK
    if mark.exists() and mark.read_text() == _RUN_ID:
        return
    for old in root.iterdir():
        if (old / _GRAPH_MARK).exists():
            shutil.rmtree(old)
    mark.write_text(_RUN_ID)


class Dump:
    def __init__(self, root: str, graph_name: str) -> None:
        _claim(Path(root))
        self.dir = Path(root) / graph_name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / _GRAPH_MARK).write_text("")
        (self.dir / "runtime.jsonl").write_text("")
        self.runtime_lines = 0
        self.masks_written = False

    def write_text(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)

    def write_json(self, name: str, data: Any) -> None:
        (self.dir / name).write_text(json.dumps(data, indent=2, default=str) + "\n")

    def append_runtime(self, record: dict) -> None:
        if self.runtime_lines > RUNTIME_LINES:
            return
        self.runtime_lines += 1
        if self.runtime_lines > RUNTIME_LINES:
            record = {"truncated": f"runtime.jsonl stops after {RUNTIME_LINES} calls"}
        with open(self.dir / "runtime.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_masks(self, site_names: list[str], visits: list[torch.Tensor]) -> None:
        """Pictures of batch element 0's block masks, once per compiled graph."""
        masks = self.dir / "masks"
        masks.mkdir(exist_ok=True)
        for name, visit in zip(site_names, visits):
            write_png(masks / f"{name}.png", mask_picture(visit[0].cpu()))
        self.masks_written = True


class DumpObserver:
    """Writes one runtime.jsonl line per call and the first sparse call's mask pictures (reads the device)."""

    def __init__(self, dump: Dump, site_names: list[str]) -> None:
        self.dump = dump
        self.site_names = site_names

    def on_call(self, runner, state, record, outputs) -> None:
        pos, cache = record.position, record.cache
        values = record.vector.tolist() if record.vector is not None else [None, None]
        dense = bool(values[1]) if values[1] is not None else None
        line = {"model": state.index, "call": state.calls - 1, "generation": pos.generation, "step": pos.step,
                "branch": pos.branch, "timestep": pos.timestep, "dense_phase": dense,
                "cache": None if cache is None else ("reuse" if cache.reused else "compute"),
                "cache_estimate": None if cache is None else cache.estimate}
        computed = cache is None or not cache.reused
        if self.site_names and computed:
            line["density"] = {name: round(v, 4) for name, v in zip(self.site_names, values[2:])}
            start = runner.outputs.masks
            if not dense and start is not None and not self.dump.masks_written:
                self.dump.write_masks(self.site_names, list(outputs[start: start + len(self.site_names)]))
        self.dump.append_runtime(line)


def _layout_text(layout: dict | None) -> str:
    """A site's token layout for the report: its segments in order (text runs and F×H×W grids), and the attention
    pattern when it is factorized."""
    if not layout:
        return "-"
    parts = [f"{seg['frames']}×{seg['height']}×{seg['width']}" if seg["kind"] == "grid" else f"{seg['length']} text"
             for seg in layout.get("segments") or []]
    text = " + ".join(parts) if parts else f"{layout['frames']}×{layout['height']}×{layout['width']}"
    attention = layout.get("attention", "full")
    return text if attention == "full" else f"{text} ({attention} attention)"


def render_report(model: str, graph_name: str, options: dict, sites: list[dict], stacks: list[dict],
                  notes: list[str]) -> str:
    """report.md: the options, one row per attention site with its decision, the block stacks, notes."""
    lines = [f"# vsparse report: {graph_name} ({model})", "",
             "options: " + ", ".join(f"{k}={v}" for k, v in options.items()), "",
             "| site | module | kind | B×H×S×D (q) | keys | token layout (text, F×H×W grids) | decision | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for s in sites:
        grid = _layout_text(s.get("layout"))
        shape = "×".join(str(d) for d in s["q_shape"])
        kind = "self" if s["self_attention"] else "cross"
        keys = str(s["kv_shape"][2])
        decision = "sparse" if s["rewritten"] else "dense"
        lines.append(f"| {s['node']} | {s['module_path']} | {kind} | {shape} | {keys} | {grid} | {decision} | "
                     f"{s['decision_reason']} |")
    lines += ["", "| block stack | blocks | entry | exit |", "|---|---|---|---|"]
    for st in stacks:
        lines.append(f"| {st['name']} | {len(st['blocks'])} | {', '.join(st['entry'])} | {', '.join(st['exit'])} |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def graph_folders(path: str) -> list[Path]:
    """The graph folders of a dump directory (one graph's folder, or the root holding several)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no dump at {root}")
    folders = [root] if (root / "report.md").exists() else sorted(r.parent for r in root.glob("*/report.md"))
    if not folders:
        raise FileNotFoundError(f"no report.md under {root}")
    return folders


def show(path: str) -> str:
    """The report(s) under a dump directory."""
    return "\n".join((folder / "report.md").read_text() for folder in graph_folders(path))
