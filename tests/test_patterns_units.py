"""Recognizer pieces on small hand-written graphs: mask kinds, key_padding_lengths, explicit attention,
reshape grouping, partition errors, bad input."""
import pytest
import sympy
import torch
from hypothesis import given, settings, strategies as st

import tiny_models
from dit_compiler.patterns import analyze, key_padding_lengths, partition
from dit_compiler.patterns.graph import Sizes
from dit_compiler.patterns.tokens import reshape_groups
from dit_compiler.patterns.types import BlockStackInfo, GraphAnalysis
from test_patterns import capture, node_values

MASKS = {"prefix": "key_padding", "additive": "key_padding", "where": "key_padding", "suffix": "unsupported",
         "rows": "unsupported", "causal": "unsupported"}


@pytest.fixture(scope="module", params=sorted(MASKS))
def masked(request):
    model, inputs = tiny_models.masked_attention(request.param)
    gm, example_inputs, _ = capture(model, inputs)
    return request.param, example_inputs, inputs, gm, analyze(gm, example_inputs)


def test_mask_kinds(masked):
    kind, _, inputs, gm, analysis = masked
    (site,) = analysis.sites
    assert site.self_attention and site.layout is not None
    assert site.mask == MASKS[kind], site.reason
    assert site.eligible == (MASKS[kind] == "key_padding")
    if kind == "rows":
        assert "query row" in site.reason
    if kind == "suffix":
        assert "prefix" in site.reason
    if kind == "causal":
        assert "is_causal" in site.reason


def test_key_padding_lengths_of_recognized_masks(masked):
    kind, example_inputs, inputs, gm, analysis = masked
    if MASKS[kind] != "key_padding":
        pytest.skip("not a key-padding mask")
    values = node_values(gm, example_inputs)
    mask = values[analysis.sites[0].mask_node]
    assert key_padding_lengths(mask).tolist() == inputs["lengths"].tolist()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=4), st.sampled_from(["bool", "-inf", "-1e4", "finfo"]))
def test_key_padding_lengths_counts_valid_prefixes(lengths, kind):
    keys = 9
    valid = torch.arange(keys)[None, :] < torch.tensor(lengths)[:, None]
    if kind == "bool":
        mask = valid
    else:
        fill = {"-inf": float("-inf"), "-1e4": -1e4, "finfo": torch.finfo(torch.float32).min}[kind]
        mask = torch.zeros(len(lengths), keys).masked_fill(~valid, fill)
    got = key_padding_lengths(mask[:, None, None, :])
    assert got.dtype == torch.int32 and got.tolist() == lengths
    assert key_padding_lengths(mask).tolist() == lengths


def test_key_padding_lengths_traces_without_graph_breaks_and_expands():
    mask = torch.arange(6)[None, :] < torch.tensor([4])[:, None]
    compiled = torch.compile(lambda m: key_padding_lengths(m, batch=3), backend="eager", fullgraph=True)
    assert compiled(mask[:, None, None, :]).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match=r"\[B, 1, 1, S\]"):
        key_padding_lengths(torch.ones(2, 3, 4, 5, dtype=torch.bool))


@pytest.fixture(scope="module")
def explicit():
    model, inputs = tiny_models.explicit()
    gm, example_inputs, _ = capture(model, inputs)
    return gm, analyze(gm, example_inputs)


def test_explicit_attention_sites(explicit):
    gm, analysis = explicit
    assert [s.kind for s in analysis.sites] == ["explicit"] * 4
    self_sites = [s for s in analysis.sites if s.self_attention]
    cross_sites = [s for s in analysis.sites if not s.self_attention]
    assert [s.block for s in self_sites] == [0, 1] and len(cross_sites) == 2
    assert all(s.scale == pytest.approx(0.5 / 16 ** 0.5) for s in self_sites)  # (q @ k^T) * scale
    assert all(s.scale == pytest.approx(1 / 16 ** 0.5) for s in cross_sites)  # einsum(...) / sqrt(d)
    assert all(s.kv_shape[2] == 4 for s in cross_sites)  # keys are the 4 text tokens
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in self_sites:
        assert nodes[site.node].target.__name__ == "matmul"  # the @ operator
        assert nodes[site.query].meta["example_value"].shape == (1, 2, 30, 16)
        assert (site.layout.frames, site.layout.height, site.layout.width) == (2, 3, 5)
    assert analysis.timestep_input == "l_timestep_"


def test_no_timestep_without_sinusoidal_embedding(masked):
    assert masked[4].timestep_input is None and masked[4].timestep_index is None


def test_reshape_groups_keep_unit_dims_apart():
    sizes = Sizes.__new__(Sizes)
    sizes.var_to_val = {}
    shape = lambda *s: [sympy.Integer(x) for x in s]  # noqa: E731
    # Conv3d output with one frame flattened into tokens.
    assert reshape_groups(sizes, shape(1, 32, 1, 3, 5), shape(1, 32, 15)) == [([0], [0]), ([1], [1]), ([2], []),
                                                                             ([3, 4], [2])]
    # CogVideoX: batch*frames split back into batch, frames.
    assert reshape_groups(sizes, shape(6, 32, 3, 5), shape(2, 3, 32, 3, 5)) == [([0], [0, 1]), ([1], [2]),
                                                                                ([2], [3]), ([3], [4])]
    assert reshape_groups(sizes, shape(1, 45, 32), shape(1, 1, 45, 32)) == [([0], [0]), ([], [1]), ([1], [2]),
                                                                           ([2], [3])]


def test_partition_rejects_a_cycle(explicit):
    gm, analysis = explicit
    stack = analysis.stacks[0]
    # Claim the stack starts at the last block's output: block 0 would then feed a head node.
    broken = GraphAnalysis(analysis.model, [], [BlockStackInfo(stack.name, stack.blocks[:1], stack.exit, [])],
                           None, None)
    with pytest.raises(ValueError, match="not acyclic"):
        partition(gm, broken)
    with pytest.raises(ValueError, match="no block stack"):
        partition(gm, GraphAnalysis(analysis.model, [], [], None, None))


def test_analyze_rejects_non_graph_modules():
    with pytest.raises(TypeError, match="GraphModule"):
        analyze(torch.nn.Linear(2, 2), [])


def test_scale_computed_in_the_graph_blocks_rewriting():
    class ScaledByBatch(torch.nn.Module):
        def forward(self, x):  # x: [B, H, S, D]; with dynamic shapes the scale is a symbolic float
            return (torch.nn.functional.scaled_dot_product_attention(x, x, x, scale=1.0 / x.shape[0]),)

    gm, example_inputs, _ = capture(ScaledByBatch(), dict(x=torch.randn(3, 2, 8, 16)), dynamic=True)
    (site,) = analyze(gm, example_inputs).sites
    assert site.self_attention and not site.eligible
    assert "scale computed in the graph" in site.reason and site.scale is None
