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
    CUDA graphs and at 0.52x without them (a sparse site's host time, ~0.9 ms a call)."""
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


def _stack_nodes(model, inputs):
    """The nodes of the captured graph's block-stack piece, as the backend partitions it."""
    from dit_compiler import patterns

    found = {}

    def capture(gm, example_inputs):
        pieces = patterns.partition(gm, patterns.analyze(gm, example_inputs))
        found["stack"] = [n for n in gm.graph.nodes if pieces[n.name] == "stack"]
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(**inputs)
    return found["stack"]


def test_stack_flops_match_torch_flop_counter():
    """The estimate counts from traced shapes what torch's own counter counts on the blocks' aten calls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dit_compiler.passes.cost_model import node_flops
    from tiny_models import wan

    model, inputs = wan(frames=2, height=8, width=8, layers=2)
    counted = sum(map(node_flops, _stack_nodes(model, inputs)))
    # The math backend runs attention as aten products, which the counter counts (CPU's fused kernel it does not).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    per_module = counter.get_flop_counts()
    blocks = sum(sum(per_module[f"WanTransformer3DModel.blocks.{i}"].values()) for i in range(2))
    assert counted == blocks > 0


def _wan_on_meta(grid, text, **config):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):  # shapes only: nothing allocated, nothing computed
        model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
                                      **config).eval()
        inputs = dict(hidden_states=torch.randn(1, 16, *grid), timestep=torch.tensor([500.0]),
                      encoder_hidden_states=torch.randn(1, text, config["text_dim"]), return_dict=False)
    return model, inputs


def test_the_cache_pays_on_wan_13b_and_not_on_the_small_model():
    from dit_compiler.passes.cost_model import why_cache_does_not_pay

    cuda = torch.device("cuda")
    wan13 = _stack_nodes(*_wan_on_meta((21, 60, 104), 512, num_attention_heads=12, attention_head_dim=128,
                                       text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                                       qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024))
    for cuda_graphs in (False, True):
        reason, words = why_cache_does_not_pay(wan13, cuda, cuda_graphs)
        assert reason is None and "µs a call" in words
    small = _stack_nodes(*_wan_on_meta((9, 64, 64), 64, num_attention_heads=4, attention_head_dim=64, text_dim=256,
                                       freq_dim=256, ffn_dim=1024, num_layers=6, rope_max_seq_len=1024))
    for cuda_graphs in (False, True):
        reason, _ = why_cache_does_not_pay(small, cuda, cuda_graphs)
        assert "does not pay" in reason and "force_cache=True" in reason
    assert why_cache_does_not_pay(small, torch.device("cpu"), False) == (None, "")


def test_every_counted_product_matches_torch_flop_counter():
    """Each product form a model may trace (function, method, operator, keyword arguments) against torch's counter."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dit_compiler.passes.cost_model import node_flops

    def products(x, w, b, q, k, v):
        y = torch.matmul(x, w) + (x @ w) + x.matmul(w) + torch.bmm(x, w) + torch.baddbmm(b, batch1=x, batch2=w)
        z = torch.addmm(b[0], x[0], w[0]) + x[0].addmm(x[0], w[0]) + torch.mm(x[0], w[0])
        a = torch.nn.functional.scaled_dot_product_attention(query=q, key=k, value=v)
        return torch.nn.functional.linear(y, w[0]).sum() + z.sum() + a.sum()

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=g) for s in ((2, 6, 5), (2, 5, 5), (2, 6, 5), (1, 2, 7, 4), (1, 2, 9, 4),
                                                    (1, 2, 9, 3))]
    found = {}

    def capture(gm, example_inputs):
        found["flops"] = sum(map(node_flops, gm.graph.nodes))
        return gm

    torch._dynamo.reset()
    torch.compile(products, backend=capture, fullgraph=True)(*inputs)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        products(*inputs)
    assert found["flops"] == counter.get_total_flops() > 0
