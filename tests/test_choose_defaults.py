"""benchmarks/choose_defaults.py: the projection from measured parts, and the choice of the fastest setting at the bar."""
import json

import pytest

from repo_modules import load

choose_defaults = load("benchmarks/choose_defaults.py")


def _quality_row(setting, psnr, ssim, skipped, sparse_sites=(5, 6)):
    options = dict(item.split("=") for item in setting.split(","))
    options = {k: (float(v) if k in ("density", "cache_threshold") else v) for k, v in options.items()}
    return {"setting": setting, "options": {**options, "force_sparse": True, "dump_dir": "/tmp/x"},
            "psnr_mean": psnr, "psnr_min": psnr - 1, "ssim_mean": ssim, "ssim_min": ssim - 0.01,
            "cache_skipped": skipped, "sparse_sites": list(sparse_sites)}


@pytest.fixture
def reports(tmp_path):
    header = {"harness": {"shift": 3.0}, "steps": 50}
    quality_a = {**header, "results": [
        _quality_row("sparsity=svg,density=0.1", 37.0, 0.935, 0.0),
        _quality_row("sparsity=svg,density=0.15,cache=easycache,cache_threshold=0.1", 35.9, 0.924, 0.58),
        _quality_row("sparsity=none,cache=easycache,cache_threshold=0.1", 38.3, 0.949, 0.58, (0, 6)),
        {**_quality_row("sparsity=svg,density=0.1,dense_steps=0.1", 33.0, 0.95, 0.0), "dense_computed_share": 0.26},
    ]}
    # A later file measures a setting again: its row wins.
    quality_b = {**header, "results": [_quality_row("sparsity=svg,density=0.1", 36.0, 0.94, 0.0, (4, 6)),
                                       _quality_row("sparsity=draft,density=0.15", 36.5, 0.94, 0.0)]}
    forward_a = [{"variant": "inductor", "forward_ms": 500.0}, {"variant": "vsparse-svg-0.1", "forward_ms": 200.0}]
    # A second end_to_end run whose Inductor ran 10% slower: its sparse figure is scaled to the first run's.
    forward_b = [{"variant": "inductor", "forward_ms": 550.0}, {"variant": "vsparse-svg-0.15", "forward_ms": 275.0}]
    generation = {"variants": [
        {"variant": "inductor", "options": None, "call_ms": {"all": 505.0}},
        {"variant": "sparsity=svg,density=0.1", "options": {"sparsity": "svg", "density": 0.1},
         "call_ms": {"dense_phase": 520.0, "sparse_phase": 230.0}},
        {"variant": "cached", "options": {"sparsity": "svg", "density": 0.15, "cache": "easycache"},
         "call_ms": {"dense_phase": 530.0, "sparse_phase": 260.0}},
        {"variant": "broken", "error": "exit code 1"},
    ]}
    # The skipped call from a second report, as `generation.py --head-tail-only` writes it.
    head_tail = {"variants": [{"variant": "cached", "options": {"cache": "easycache"}, "call_ms": {},
                               "head_tail_ms": 20.0}]}
    paths = {}
    for name, content in (("qa", quality_a), ("qb", quality_b), ("fa", forward_a), ("fb", forward_b),
                          ("gen", generation), ("ht", head_tail)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(content))
    return paths


def test_projection_from_measured_parts_and_the_fastest_setting_at_the_bar_is_chosen(reports, tmp_path):
    rep = choose_defaults.main(["--quality", str(reports["qa"]), str(reports["qb"]), "--forward", str(reports["fa"]),
                                str(reports["fb"]), "--generation", str(reports["gen"]), str(reports["ht"]),
                                "--out", str(tmp_path / "o")])
    rows = {r["setting"]: r for r in rep["rows"]}
    assert len(rows) == 5 and rows["sparsity=svg,density=0.1"]["psnr_mean"] == 36.0  # the later file won
    assert rep["calls"]["dense_ms"] == {"svg": 525.0}  # median of the two svg variants' dense phases
    assert rep["calls"]["skip_ms"] == 20.0  # nothing skipped on random weights: the head-and-tail call
    # The dense phase from the schedule (50 steps at shift 3): half the calls at dense_steps 0.25, 26% at 0.1.
    assert rows["sparsity=svg,density=0.1"]["dense_share"] == 0.5
    assert rows["sparsity=svg,density=0.1,dense_steps=0.1"]["dense_share"] == 0.26

    # svg 0.1, 2 dense layers of 30: sparse = 200 + 2/30 * 300 = 220; half the calls dense at 525; no cache, so
    # both placements agree.
    svg = rows["sparsity=svg,density=0.1"]["projection"]
    assert svg["sparse_ms"] == pytest.approx(220.0)
    for placement in ("spread", "conservative"):
        assert svg[f"{placement}_call_ms"] == pytest.approx(0.5 * 525 + 0.5 * 220)
        assert svg[f"{placement}_speedup"] == pytest.approx(500 / (0.5 * 525 + 0.5 * 220))
    # svg 0.15 + cache: the forward scaled to run A's Inductor (275 * 500/550 = 250), one dense layer. 58% skipped:
    # spread over both phases, or (conservative) all 50% sparse-phase calls first, then 8% of the dense ones.
    cached = rows["sparsity=svg,density=0.15,cache=easycache,cache_threshold=0.1"]["projection"]
    sparse = 250 + 1 / 30 * 250
    assert cached["spread_call_ms"] == pytest.approx(0.21 * 525 + 0.21 * sparse + 0.58 * 20)
    assert cached["conservative_call_ms"] == pytest.approx(0.42 * 525 + 0.58 * 20)
    # The cache alone: every computed call costs Inductor's.
    alone = rows["sparsity=none,cache=easycache,cache_threshold=0.1"]["projection"]
    assert alone["spread_call_ms"] == alone["conservative_call_ms"] == pytest.approx(0.42 * 500 + 0.58 * 20)
    # A row that recorded where its skips fell is ranked by that placement: 30% of calls computed in the dense phase.
    measured = rows["sparsity=svg,density=0.1,dense_steps=0.1"]["projection"]
    assert measured["measured_call_ms"] == pytest.approx(0.26 * 525 + 0.74 * (200 + 1 / 30 * 300))
    assert choose_defaults.chosen_speedup(rows["sparsity=svg,density=0.1,dense_steps=0.1"]) == measured[
        "measured_speedup"]
    # No forward measured for draft 0.15: no speed, never chosen.
    assert rows["sparsity=draft,density=0.15"]["projection"] is None

    # svg + cache is the fastest if skips spread, not if they fall on the sparse phase; it misses the SSIM bar
    # anyway. The cache alone clears it and is the fastest there by the conservative figure.
    assert cached["spread_speedup"] > alone["spread_speedup"] and cached["conservative_speedup"] < alone[
        "conservative_speedup"]
    assert rep["chosen"] == "sparsity=none,cache=easycache,cache_threshold=0.1"
    table = (tmp_path / "o" / "defaults.md").read_text()
    assert "`sparsity=none,cache=easycache,cache_threshold=0.1` **(chosen)**" in table
    assert "| `sparsity=draft,density=0.15` | 36.50 (35.50) | 0.940 (0.930) | yes | 0.50 | 0.00 | - | not measured |" \
        in table
    assert json.loads((tmp_path / "o" / "defaults.json").read_text())["chosen"] == rep["chosen"]


def test_nothing_is_chosen_when_no_measured_setting_clears_the_bar(reports, tmp_path):
    rep = choose_defaults.report([str(reports["qa"])], [str(reports["fa"])], [str(reports["gen"]), str(reports["ht"])])
    for row in rep["rows"]:
        row["ssim_mean"] = 0.9
    assert choose_defaults.choose(rep["rows"]) is None


def test_a_forward_report_without_inductor_is_refused(reports, tmp_path):
    path = tmp_path / "lone.json"
    path.write_text(json.dumps([{"variant": "vsparse-svg-0.1", "forward_ms": 200.0}]))
    with pytest.raises(ValueError, match="no Inductor row"):
        choose_defaults.load_forwards([str(path)])


def test_a_skipped_call_must_be_measured(reports):
    with pytest.raises(ValueError, match="no cache variant"):
        choose_defaults.load_calls([str(reports["gen"])])
