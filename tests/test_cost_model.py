"""The cost model: sparse where it pays, dense (with the estimate) where it does not."""
import json

import pytest
import torch

from dit_compiler.passes.cost_model import H100, estimate, why_sparse_does_not_pay

WAN_13B = (1, 12, 32760, 128)  # Wan2.1-1.3B 480p self-attention
SMALL = (1, 4, 9216, 64)  # the small Wan model of benchmarks/runtime_overhead.py


def test_wan_480p_sites_pay_with_both_planners():
    for planner, density in (("draft", 0.25), ("draft", 0.1), ("svg", 0.1)):
        guess = estimate(WAN_13B, density, planner, cuda_graphs=False)
        assert guess.pays, (planner, density, guess)
    # The dense estimate is cuDNN's measured 11.3 ms at this shape (BASELINES).
    assert 10_000 < estimate(WAN_13B, 0.1, "draft", False).dense_us < 12_500


def test_the_small_model_goes_sparse_only_under_cuda_graphs():
    """Measured on an H100 (benchmarks/runtime_overhead.py): draft 0.25 on this model ran at 1.24x of Inductor under
    CUDA graphs and at 0.50x without them (the op's host cost)."""
    assert estimate(SMALL, 0.25, "draft", cuda_graphs=True).pays
    assert not estimate(SMALL, 0.25, "draft", cuda_graphs=False).pays
    reason, words = why_sparse_does_not_pay(SMALL, 0.25, "draft", torch.device("cuda"), False)
    assert "does not pay" in reason and "µs sparse vs" in words and "force_sparse=True" in reason


def test_host_cost_counts_only_outside_cuda_graphs():
    with_host = estimate(WAN_13B, 0.1, "draft", cuda_graphs=False).sparse_us
    assert with_host - estimate(WAN_13B, 0.1, "draft", cuda_graphs=True).sparse_us == pytest.approx(H100.host_us)


def test_sparse_cost_grows_with_density_and_the_verdict_flips_once():
    """Between density 0 and 1 the estimate rises monotonically and crosses PAYS_BELOW x dense at most once."""
    verdicts, previous = [], 0.0
    for density in [i / 20 for i in range(1, 21)]:
        guess = estimate(WAN_13B, density, "draft", cuda_graphs=False)
        assert guess.sparse_us > previous
        previous = guess.sparse_us
        verdicts.append(guess.pays)
    assert verdicts[0] and not verdicts[-1]
    assert verdicts == sorted(verdicts, reverse=True)


def test_cpu_never_pays():
    reason, _ = why_sparse_does_not_pay(WAN_13B, 0.1, "draft", torch.device("cpu"), False)
    assert "pure-torch reference" in reason


@pytest.mark.slow
def test_the_backend_keeps_unprofitable_sites_dense_and_says_why(tmp_path, monkeypatch):
    from tiny_models import wan

    import dit_compiler.backend as backend

    monkeypatch.delenv("VSPARSE_FORCE_SPARSE")
    monkeypatch.setattr(backend, "compile_piece", lambda gm, example_inputs, config: gm)
    model, inputs = wan(head_dim=64)
    for force in (False, True):
        torch._dynamo.reset()
        dump = tmp_path / str(force)
        compiled = torch.compile(model, backend="vsparse", fullgraph=True,
                                 options=dict(sparsity="draft", dense_layers=0, force_sparse=force,
                                              dump_dir=str(dump)))
        with torch.no_grad():
            compiled(**inputs)
        (graph,) = [d for d in dump.iterdir() if d.is_dir()]
        sites = [s for s in json.loads((graph / "analysis.json").read_text())["sites"] if s["self_attention"]]
        assert sites and all(s["rewritten"] == force for s in sites)
        if not force:
            assert all("pure-torch reference" in s["decision_reason"] for s in sites)
    torch._dynamo.reset()


def test_every_registered_planner_has_a_planning_rate():
    from dit_compiler.passes.planners import PLANNERS

    assert set(PLANNERS) <= set(H100.planning_ns_per_token_head)
