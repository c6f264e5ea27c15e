import struct
import subprocess
import sys
import zlib

import torch

from dit_compiler.dump import Dump, mask_picture, write_png


def read_png(path):
    """Decode the grey 8-bit PNGs write_png makes (enough to check them independently of the writer)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    cols, rows = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = zlib.decompress(chunks[b"IDAT"])
    return [list(raw[r * (cols + 1) + 1:(r + 1) * (cols + 1)]) for r in range(rows)]


def test_png_round_trip(tmp_path):
    pixels = torch.randint(0, 256, (5, 7), dtype=torch.uint8)
    write_png(tmp_path / "a.png", pixels)
    assert read_png(tmp_path / "a.png") == pixels.tolist()


def test_mask_picture_puts_heads_side_by_side():
    visit = torch.tensor([[[True, False], [False, True]], [[False, False], [True, True]]])
    image = mask_picture(visit, gap=1)
    assert image.tolist() == [[255, 0, 128, 0, 0], [0, 255, 128, 255, 255]]


def test_show_prints_reports(tmp_path):
    for name in ("GraphA_0", "GraphB_1"):
        Dump(str(tmp_path), name).write_text("report.md", f"# report of {name}\n")
    out = subprocess.run([sys.executable, "-m", "dit_compiler", "show", str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    assert "# report of GraphA_0" in out and "# report of GraphB_1" in out
    missing = subprocess.run([sys.executable, "-m", "dit_compiler", "show", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no dump" in missing.stderr


def test_report_shows_every_segment_of_a_layout():
    """A layout of several grids used to render as None×None×None (its single-grid fields are unset)."""
    from dit_compiler.dump import render_report

    def site(layout):
        return {"node": "sdpa", "module_path": "blocks.0.attn1", "self_attention": True, "q_shape": [1, 2, 30, 64],
                "kv_shape": [1, 2, 30, 64], "rewritten": False, "decision_reason": "why", "layout": layout}

    several = {"frames": None, "height": None, "width": None, "text_before": None, "text_after": None,
               "attention": "full", "segments": [
                   {"kind": "text", "length": 4, "source": "a"},
                   {"kind": "grid", "length": 4, "source": "b", "frames": 1, "height": 2, "width": 2},
                   {"kind": "grid", "length": 22, "source": "c", "frames": 2, "height": 1, "width": 11}]}
    temporal = dict(several, attention="temporal", segments=several["segments"][1:2])
    report = render_report("M", "M_0", {}, [site(several), site(temporal)], [], [])
    assert "| 4 text + 1×2×2 + 2×1×11 |" in report
    assert "| 1×2×2 (temporal attention) |" in report
    assert "None" not in report


def blobs(mask) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (top, left, bottom, right) of the 4-connected groups of True pixels."""
    import numpy as np

    seen = np.zeros_like(mask)
    boxes = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, box = [start], [start[0], start[1], start[0], start[1]]
        while stack:
            r, c = stack.pop()
            box = [min(box[0], r), min(box[1], c), max(box[2], r), max(box[3], c)]
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        boxes.append(tuple(box))
    return boxes


def test_show_draws_a_timeline_of_every_call(tmp_path, eager_pieces, capsys, monkeypatch):
    """A real dump (tiny Wan, CFG, the cache reusing, two generations): timeline.png holds one cell per call in the
    dense-phase and block-stack rows, in the colour of what the call did, and one per computed call and site in the
    colour of its density; without matplotlib `show` says how to get it."""
    import json

    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import to_rgb
    from PIL import Image

    from dit_compiler.__main__ import main
    from dit_compiler.timeline import COMPUTED, DENSE, DENSITY_COLORMAP, REUSED
    from tiny_models import wan

    model, inputs = wan(frames=3, height=16, width=16, head_dim=64)  # 192 tokens: 3 blocks of 64
    compiled = torch.compile(model, backend="vsparse", options=dict(
        sparsity="draft", density=0.5, block_size=64, dense_layers=0, dense_steps=0.25, cache="easycache",
        cache_threshold=0.04, dump_dir=str(tmp_path)))
    for _ in range(2):
        for t in torch.linspace(999, 50, 6).tolist():
            for branch in range(2):
                with torch.no_grad():
                    compiled(**dict(inputs, timestep=torch.full((1,), t), hidden_states=inputs["hidden_states"] * (
                        1 + t / 1e4), encoder_hidden_states=inputs["encoder_hidden_states"] * (1 - branch)))
    (graph,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    calls = [json.loads(line) for line in (graph / "runtime.jsonl").read_text().splitlines()]

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["show", str(tmp_path)]) == 0
    assert "pip install 'dit-compiler[plot]'" in capsys.readouterr().err and not (graph / "timeline.png").exists()
    monkeypatch.undo()
    assert main(["show", str(tmp_path)]) == 0
    assert f"timeline: {graph / 'timeline.png'}" in capsys.readouterr().err

    image = np.asarray(Image.open(graph / "timeline.png").convert("RGB")).astype(int)
    assert image.shape[1] > 600 and image.shape[0] > 300

    def cells(colour):
        return blobs((np.abs(image - np.round(np.array(to_rgb(colour)) * 255)).max(axis=-1) == 0))

    reused = sum(c["cache"] == "reuse" for c in calls)
    dense = sum(c["dense_phase"] for c in calls)
    assert 0 < reused < len(calls) and 0 < dense < len(calls)
    # each colour's cells, and its patch in the legend
    marks = {colour: cells(colour) for colour in (COMPUTED, REUSED, DENSE)}
    assert [len(marks[c]) for c in (COMPUTED, REUSED, DENSE)] == [len(calls) - reused + 1, reused + 1, dense + 1]
    # one column of cells per step of each generation (the legend's patches have another size)
    boxes = marks[COMPUTED] + marks[REUSED]
    sizes = [(b[2] - b[0], b[3] - b[1]) for b in boxes]
    cell = sorted(sizes)[len(sizes) // 2]
    lefts = sorted({b[1] for b, (h, w) in zip(boxes, sizes) if abs(h - cell[0]) <= 2 and abs(w - cell[1]) <= 2})
    assert len([x for i, x in enumerate(lefts) if i == 0 or x - lefts[i - 1] > 2]) == 2 * 6
    right = max(b[3] for b in marks[COMPUTED] + marks[REUSED])
    # densities: one cell per computed call and sparse site, left of the colour scale
    colormap = colormaps[DENSITY_COLORMAP]
    expected = {}
    for c in calls:
        for value in (c.get("density") or {}).values():
            colour = tuple(round(255 * v) for v in colormap(value)[:3])
            expected[colour] = expected.get(colour, 0) + 1
    assert sum(expected.values()) == 2 * (len(calls) - reused) and len(expected) > 1  # dense and sparse calls
    for colour, count in expected.items():
        found = blobs((np.abs(image[:, : right + 1] - np.array(colour)).max(axis=-1) == 0))
        assert len(found) == count, (colour, len(found), count)
