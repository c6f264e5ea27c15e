"""benchmarks/generation.py on the CPU: the sampling loops run, and what the report says are measurements (times,
calls counted by the loop against dit_compiler.stats, kinds of calls, the cache projection)."""
import dataclasses
import json

import pytest

from repo_modules import load

generation = load("benchmarks/generation.py")

# Sparse from the third of 4 steps (timesteps ~1000, 857, 600, 3 at shift 3: dense above 800), every layer, and a
# cache threshold at which these random weights skip one of the two sparse steps per branch (0.2 to 0.5 do; 0.1
# skips none, 1.0 both): every kind of call is there.
CACHED = "sparsity=draft,density=0.5,block_size=64,dense_steps=0.2,dense_layers=0,cache=easycache,cache_threshold=0.3"


def test_wan_generation_reports_measured_times_stack_runs_and_a_projection(eager_pieces, tmp_path, monkeypatch):
    # The small model at a 3x16x16 latent (192 tokens): on a CPU the sparse op's reference is the slow part.
    monkeypatch.setitem(generation.CONFIGS, "small", dataclasses.replace(generation.CONFIGS["small"],
                                                                         latent=(3, 16, 16)))
    out = tmp_path / "gen.json"
    report = generation.main(["--config", "small", "--steps", "4", "--warmup-steps", "2", "--in-process",
                              "--variants", "eager", CACHED, "--harness-skip", "0.75", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    eager, cached = saved["variants"]
    for row in (eager, cached):
        assert row["first_generation_s"] > 0 and len(row["generation_s_each"]) == 1 and row["generation_s"] > 0
        assert row["calls"] == 8  # 4 steps, cond and uncond
        assert row["computed"] + row["skipped"] == row["calls"] == sum(row["kind_calls"].values())
        assert all(ms > 0 for ms in row["call_ms"].values())
        assert row["speedup_vs_inductor"] is None  # no Inductor row in this run
    assert eager["skipped"] == 0 and eager["kind_calls"] == {"all": 8} and "projection" not in eager

    # The loop's count and stats' agree; the per-call kinds (runner history) agree with stats' sums: the two dense
    # steps computed (the cache computes two steps per branch first), the sparse ones computed or skipped.
    kinds = cached["kind_calls"]
    assert cached["stats_calls"] == 8 and kinds == {"dense_phase": 4, "sparse_phase": 2, "skipped": 2}
    assert cached["skipped"] == 2 and cached["dense_calls"] == 4
    assert cached["sparse_sites"] == 2 and 0.5 < cached["density"] < 1  # dense-phase calls count 1
    assert cached["head_tail_ms"] > 0 and cached["stack_share"] < 1
    assert set(cached["stack_ms"]) == {"dense_phase", "sparse_phase"}

    projection = cached["projection"]
    assert projection["skip"] == 0.75 and projection["skip_from"] == "--harness-skip"
    assert projection["extra_skips_per_generation"] == 0.75 * 8 - 2
    table = generation.markdown(report)
    assert f"| {CACHED} |" in table and "NOT a trained model's" in table

    # Projected to the skip share it measured, a cache variant takes the time it measured.
    again = generation.main(["--from-json", str(out), "--harness-skip", "0.25"])["variants"][1]["projection"]
    assert again["extra_skips_per_generation"] == 0
    assert again["projected_s"] == again["conservative_s"] == cached["generation_s"]


def test_head_tail_only_times_the_model_without_its_blocks(eager_pieces, tmp_path, monkeypatch):
    monkeypatch.setitem(generation.CONFIGS, "small", dataclasses.replace(generation.CONFIGS["small"],
                                                                         latent=(3, 16, 16)))
    timed = []
    real = generation.measure_head_tail
    monkeypatch.setattr(generation, "measure_head_tail",
                        lambda config, *rest, **kw: timed.append(config.model_args) or real(config, *rest, **kw))
    out = tmp_path / "ht.json"
    report = generation.main(["--config", "small", "--head-tail-only", "--variants", CACHED, "--out", str(out)])
    (row,) = json.loads(out.read_text())["variants"]
    assert row == report["variants"][0] and row["variant"] == CACHED and row["head_tail_ms"] > 0
    assert len(timed) == 1 and row["call_ms"] == {}
    with pytest.raises(ValueError, match="measures cache variants"):
        generation.main(["--config", "small", "--head-tail-only", "--variants", "sparsity=draft,density=0.5,cache=none"])


def test_projection_saves_the_stack_of_each_further_skip():
    # 100 calls: 40 computed in the dense phase (stack 500 ms), 50 in the sparse phase (300 ms), 10 skipped.
    row = {"generations": 2, "calls": 200, "skipped": 20, "generation_s": 50.0,
           "kind_calls": {"dense_phase": 40, "sparse_phase": 50, "skipped": 10},
           "stack_ms": {"dense_phase": 500.0, "sparse_phase": 300.0}}
    mean_stack = (40 * 0.5 + 50 * 0.3) / 90
    half = generation.project(row, 0.5)  # 40 more skips: spread, or all in the sparse phase
    assert half["extra_skips_per_generation"] == 40
    assert half["projected_s"] == pytest.approx(50 - 40 * mean_stack)
    assert half["conservative_s"] == pytest.approx(50 - 40 * 0.3)
    most = generation.project(row, 0.95)  # 85 more: the sparse phase's 50, then 35 dense
    assert most["projected_s"] == pytest.approx(50 - 85 * mean_stack)
    assert most["conservative_s"] == pytest.approx(50 - 50 * 0.3 - 35 * 0.5)
    fewer = generation.project(row, 0.05)  # 5 fewer skips than measured: their stacks come back, the dearest
    assert fewer["projected_s"] == pytest.approx(50 + 5 * mean_stack)
    assert fewer["conservative_s"] == pytest.approx(50 + 5 * 0.5)


def test_hunyuan_generation_makes_one_call_a_step(eager_pieces, tmp_path):
    sparse = "sparsity=draft,density=0.5,block_size=64,dense_steps=0.2,dense_layers=0,cache=none"
    report = generation.main(["--config", "hunyuan-small", "--steps", "3", "--warmup-steps", "2", "--in-process",
                              "--variants", sparse, "--harness-skip", "0.5"])
    (row,) = report["variants"]
    # Timesteps ~1000, 933, 778 at shift 7 with the pipeline's sigmas: two calls in the dense phase, one sparse.
    assert row["calls"] == row["computed"] == row["stats_calls"] == 3 and row["skipped"] == 0
    assert row["kind_calls"] == {"dense_phase": 2, "sparse_phase": 1} and row["dense_calls"] == 2
    assert row["sparse_sites"] > 0 and 0.5 <= row["density"] < 1
    assert "projection" not in row and "head_tail_ms" not in row  # no cache, nothing to project


def test_variants_and_quality_settings_are_matched_by_what_they_compute(tmp_path):
    assert generation.variant_options("vsparse-draft-0.15+easycache") == (
        "vsparse", {"sparsity": "draft", "density": 0.15, "cache": "easycache"})
    assert generation.variant_options("sparsity=svg,density=0.1") == ("vsparse", {"sparsity": "svg", "density": 0.1})
    with pytest.raises(ValueError, match="unknown variant 'draft'"):
        generation.variant_options("draft")
    # A variant that leaves the cache to the defaults caches (HunyuanVideo's "sparsity=svg" on the H100 was not
    # projected nor given its head-and-tail call).
    assert [generation.uses_cache(v) for v in ("sparsity=svg", "sparsity=svg,cache=none", "inductor")] == [
        True, False, False]
    with pytest.raises(ValueError, match="density"):
        generation.variant_options("sparsity=draft,density=2")

    import quality

    # Two rows that name the same options, one written before rows recorded their resolution (measured under the
    # defaults of the time: dense_steps 0.25, no cache_start) and one after; vsparse-easycache names the same
    # options, so only the later row computed what it computes.
    named = {"sparsity": "none", "cache": "easycache"}
    results = [{"setting": "sparsity=none,cache=easycache", "cache_skipped": 0.5,
                "options": {**named, "force_sparse": True, "dump_dir": "d1"}},
               {"setting": "sparsity=none,cache=easycache", "cache_skipped": 0.3,
                "options": {**named, "force_sparse": True, "dump_dir": "d2"}, "resolved_options": quality.resolve(named)}]
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"results": results}))
    rows = [{"variant": "vsparse-easycache"}, {"variant": "vsparse-draft-0.15+easycache"}, {"variant": "inductor"}]
    # no quality setting is draft 0.15 with the cache
    assert generation.skip_shares(rows, None, str(path)) == {
        "vsparse-easycache": (0.3, f"{path}: sparsity=none,cache=easycache")}
    assert generation.skip_shares(rows, 0.4, None) == {"vsparse-easycache": (0.4, "--harness-skip"),
                                                       "vsparse-draft-0.15+easycache": (0.4, "--harness-skip")}
