"""benchmarks/site_breakdown.py on a CPU at a tiny grid: every variant compiles and runs, and the attribution is the
differences of the timed layers it says it is."""
import json
import sys

import pytest
import torch

from repo_modules import load

site_breakdown = load("benchmarks/site_breakdown.py")


def test_a_cpu_smoke_run_attributes_planning_and_permutation_from_its_layers(tmp_path, monkeypatch):
    out = tmp_path / "site.json"
    # 1 x 16 x 32 tokens in 128-token blocks: Draft's window order is no identity there.
    monkeypatch.setattr(sys, "argv", ["site_breakdown", "--device", "cpu", "--grid", "1", "16", "32", "--planners",
                                      "draft", "--densities", "0.5", "--budget-ms", "1", "--profile", "--out", str(out)])
    site_breakdown.main()
    (row,) = json.loads(out.read_text())["sites"]
    assert row["planner"] == "draft" and 0 < row["visited"] <= 1
    assert row["moved_heads"] == site_breakdown.HEADS  # one window order for every head
    # The row rounds µs to 0.1 and ms to 4 decimals: a difference of rounded figures is within 0.15 µs
    # (0.2 leaves room for float noise).
    assert row["planning_us"] == pytest.approx((row["layer_site_ms"] - row["layer_fixed_ms"]) * 1e3, abs=0.2)
    assert row["permutation_us"] == pytest.approx((row["layer_fixed_ms"] - row["layer_unpermuted_ms"]) * 1e3,
                                                  abs=0.2)
    assert row["kernel_us"] > 0 and row["flex_us"] is None  # no FlexAttention peer on a CPU
    # --profile: each variant's ops; only the site plans (its argsort), every variant runs the op.
    tables = {variant: {name for name, _, _ in table} for variant, table in row["kernels"].items()}
    assert set(tables) == {"site", "fixed", "unpermuted"}
    assert all("vsparse::block_sparse_attention" in names for names in tables.values())
    assert any("descending_order" in name for name in tables["site"])
    assert not any("descending_order" in name for name in tables["fixed"])
    assert row["site_share_by_kernels"] == pytest.approx(
        (row["planning_us_by_kernels"] + row["permutation_us_by_kernels"]) / row["kernel_us"], abs=1e-3)
    attention = row["attention_us_by_kernels"]
    assert set(attention) == {"site", "fixed", "unpermuted"} and all(us > 0 for us in attention.values())
    assert row["site_share"] == pytest.approx((row["planning_us"] + row["permutation_us"]) / row["kernel_us"],
                                              abs=1e-3)
    # Draft's fixed window order is hoisted out of a whole model's sites: there a site pays its planning only.
    assert row["site_share_hoisted"] == pytest.approx(row["planning_us"] / row["kernel_us"], abs=1e-3)
    assert row["site_share_hoisted_by_kernels"] == pytest.approx(
        row["planning_us_by_kernels"] / row["kernel_us"], abs=1e-3)


def test_a_plan_that_moves_no_token_is_measured_without_gathers(tmp_path, monkeypatch):
    """svg-shift (frames of 512 tokens here): its fixed variant gathers nothing, its kernel runs key blocks at token
    starts, and no FlexAttention peer is claimed for them."""
    out = tmp_path / "site.json"
    monkeypatch.setattr(sys, "argv", ["site_breakdown", "--device", "cpu", "--grid", "1", "16", "32", "--planners",
                                      "svg-shift", "--densities", "0.5", "--budget-ms", "1", "--profile", "--out",
                                      str(out)])
    site_breakdown.main()
    (row,) = json.loads(out.read_text())["sites"]
    assert row["planner"] == "svg-shift" and 0 < row["visited"] <= 1 and row["flex_us"] is None
    assert row["moved_heads"] == 0
    assert "site_share_hoisted" not in row  # no fixed order: each call plans its own
    tables = {variant: {name for name, _, _ in table} for variant, table in row["kernels"].items()}
    assert any("sampled_rows_attention" in name for name in tables["site"])
    # (aten::gather is the CPU op's reference reading its key blocks, in every variant alike)
    assert not any("permute_tokens" in name for names in tables.values() for name in names)
    # svg-shift carries its head classes: the kept variant plans with them (its sampled-row op told to skip, which
    # tests/test_plan_reuse.py checks; on a CPU the skipped op's time is too noisy to compare)
    assert set(tables) == {"site", "kept", "fixed", "unpermuted"}
    assert row["planning_kept_us"] == pytest.approx((row["layer_kept_ms"] - row["layer_fixed_ms"]) * 1e3, abs=0.2)
    assert row["site_share_kept_by_kernels"] == pytest.approx(
        (row["planning_kept_us_by_kernels"] + row["permutation_us_by_kernels"]) / row["kernel_us"], abs=1e-3)


@pytest.mark.parametrize("temporal_heads", [0, 5, 12])
def test_temporal_heads_fix_the_heads_svg_moves(temporal_heads):
    """--temporal-heads N: svg classes exactly the last N heads temporal (and moves their rows), whatever the random
    layer, so a site's permutation cost is measured at a stated count."""
    torch.manual_seed(0)
    grid, layout = (6, 8, 16), (6, 8, 16, 0, 0)
    latent = torch.randn(1, site_breakdown.CHANNELS, grid[0], 2 * grid[1], 2 * grid[2])
    attention = site_breakdown.Attention("dense", "svg", 0.25, grid, {}, {})
    layer = site_breakdown.Layer(attention, grid, torch.device("cpu"), torch.float32, temporal_heads)
    svg = site_breakdown.PLANNERS["svg"]
    with torch.no_grad():
        q, k, v = layer.qkv_heads(layer.tokens(latent))
        plan = svg.plan(q, k, v, svg.constants(layout, 64, 0.25, q.device), layout, block_size=64, density=0.25,
                        scale=site_breakdown.HEAD_DIM ** -0.5)
    expected = torch.arange(site_breakdown.HEADS) >= site_breakdown.HEADS - temporal_heads
    assert torch.equal(plan.reordered_heads, expected[None])


@pytest.mark.parametrize("variant", ["fixed", "unpermuted"])
def test_the_baselines_run_the_op_on_the_plans_query_block_schedule(variant, monkeypatch):
    """Without the plan's schedule the op sorts one itself (~17 µs on the H100), work the site does not do: the
    baselines then cost more, and planning and permutation by difference less, than they are."""
    grid, layout = (2, 4, 32), (2, 4, 32, 0, 0)
    planner = site_breakdown.PLANNERS["svg"]
    constants = planner.constants(layout, site_breakdown.BLOCK, 0.5, "cpu")
    q, k, v = (torch.randn(1, site_breakdown.HEADS, 256, site_breakdown.HEAD_DIM) for _ in range(3))
    plan = planner.plan(q, k, v, constants, layout, block_size=site_breakdown.BLOCK, density=0.5, scale=0.1)
    assert plan.q_block_order is not None
    fixed = {"perm": plan.perm, "inverse": plan.inverse, "reordered": plan.reordered_heads,
             "num": plan.kv_num_blocks, "idx": plan.kv_indices, "order": plan.q_block_order, "choice": plan.choice}
    seen = {}

    def op(q, k, v, num, idx, scale, block_size, kv_lengths=None, q_block_order=None, **kwargs):
        seen["order"] = q_block_order
        return q

    monkeypatch.setattr(torch.ops.vsparse, "block_sparse_attention", op)
    site_breakdown.Attention(variant, "svg", 0.5, grid, constants, fixed)(q, k, v)
    assert seen["order"] is not None and torch.equal(seen["order"], plan.q_block_order)


def test_the_kernel_tables_attribute_only_kernels_some_variant_lacks():
    """The attention kernel and the kinds of kernel every variant runs (Inductor's index suffix aside) are no
    planning: their spread between variants must not show up as planning or permutation."""
    projections, attention = "nvjet_sm90_tst_256x152", "_block_sparse_attention_kernel"
    convolution = "triton_poi_fused_convolution_view_{}"
    kernels = {
        "site": [(projections, 4.0, 815.6), (attention, 1.0, 1250.0), (convolution.format(5), 1.0, 114.6),
                 ("_sampled_rows_partial_kernel", 1.0, 91.6), ("_move_tokens_kernel", 2.0, 149.8)],
        "fixed": [(projections, 4.0, 801.4), (attention, 1.0, 1232.8), (convolution.format(2), 1.0, 115.2),
                  ("_move_tokens_kernel", 2.0, 150.3)],
        "unpermuted": [(projections, 4.0, 809.7), (attention, 1.0, 1241.6), (convolution.format(2), 1.0, 116.0)]}
    assert site_breakdown.attributable_us(kernels) == pytest.approx({"site": 241.4, "fixed": 150.3, "unpermuted": 0.0})
