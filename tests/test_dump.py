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
