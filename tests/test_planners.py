"""One conformance test over every registered planner (passes/planners/__init__.py's contract)."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_compiler.kernels import block_mask
from dit_compiler.kernels.attention_op import head_orders
from dit_compiler.options import SPARSITY
from dit_compiler.passes.planners import PLANNERS
from dit_compiler.passes.sparse_attention import planner_kv_unit, sparse_attention

BLOCK = 64
# Frames of 4 to 256 tokens: svg-shift plans only frames longer than 3 blocks of 64 and refuses the others.
layouts = st.tuples(st.integers(1, 3), st.integers(2, 16), st.integers(2, 16), st.integers(0, 9), st.integers(0, 9))


def test_the_registry_feeds_the_sparsity_option():
    assert set(SPARSITY) == set(PLANNERS) | {"none"}
    assert all(name == planner.name for name, planner in PLANNERS.items())


def _is_permutation(perm, inverse, seq_len):
    ids = torch.arange(seq_len).expand_as(perm)
    return torch.equal(perm.sort(-1).values, ids) and torch.equal(torch.gather(perm, -1, inverse), ids)


@pytest.mark.parametrize("name", sorted(PLANNERS))
@settings(max_examples=15, deadline=None)
@given(layout=layouts, density=st.sampled_from([0.1, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_planner_contract(name, layout, density, seed):
    planner = PLANNERS[name]
    frames, height, width, text_before, text_after = layout
    seq_len = text_before + frames * height * width + text_after
    torch.manual_seed(seed)
    q, k, v = (torch.randn(2, 3, seq_len, 16) for _ in range(3))
    scale = 16 ** -0.5
    refusal = getattr(planner, "unsupported", lambda *_: None)(layout, BLOCK)
    if refusal is not None:  # a layout the planner cannot serve: the site stays dense with this reason
        with pytest.raises(ValueError, match=refusal[:20]):
            planner.constants(layout, BLOCK, density, None)
        return
    constants = planner.constants(layout, BLOCK, density, None)
    plan = planner.plan(q, k, v, constants, layout, block_size=BLOCK, density=density, scale=scale)
    ordered = (q, k)
    if plan.perm is not None:
        # The order is a permutation with its inverse, shared [S] or per head, and leaves text tokens in place.
        assert plan.perm.dtype == torch.int64 and plan.perm.shape[-1] == seq_len
        assert _is_permutation(plan.perm, plan.inverse, seq_len)
        text = torch.cat([torch.arange(text_before), torch.arange(seq_len - text_after, seq_len)])
        assert torch.equal(plan.perm[..., text], text.expand(*plan.perm.shape[:-1], -1))
        perm = plan.perm
        if plan.reordered_heads is not None:  # one [S] order for the heads set, the others in place
            assert perm.dim() == 1 and plan.reordered_heads.dtype == torch.bool
            assert plan.reordered_heads.shape in ((2, 3), (1, 3))
            perm = head_orders(perm, plan.reordered_heads)
        index = perm if perm.dim() == 1 else perm.unsqueeze(-1).expand(*q.shape)
        ordered = [t.index_select(2, perm) if perm.dim() == 1 else torch.gather(t, 2, index) for t in (q, k)]
    # The mask is valid for the kernel, its key blocks of one query block never overlap (a key counted twice), and
    # every query sees its own key.
    num, idx = planner.mask(*ordered, plan, constants, layout, block_size=BLOCK, density=density, scale=scale)
    kv_unit = planner_kv_unit(name)
    block_mask.validate(num, idx, 2, 3, seq_len, seq_len, BLOCK, kv_unit)
    unit = block_mask.key_unit(kv_unit, BLOCK)
    listed = torch.arange(idx.shape[-1]) < num.unsqueeze(-1)
    starts = (idx.long() * unit).where(listed, -BLOCK).sort(-1).values
    gaps = starts[..., 1:] - starts[..., :-1]
    assert (gaps.where(starts[..., :-1] >= 0, BLOCK) >= BLOCK).all(), "overlapping key blocks"
    visit = block_mask.to_token_mask(num, idx, seq_len, seq_len, BLOCK, kv_unit)
    assert visit.diagonal(dim1=-2, dim2=-1).all()
    # A schedule the planner fixed ahead of the data is the one the kernel would sort for this mask.
    if plan.q_block_order is not None:
        block_mask.validate_order(plan.q_block_order, 2, 3, seq_len, BLOCK, values=True)
        assert torch.equal(plan.q_block_order.expand(2, 3, -1), block_mask.heaviest_first(num.expand(2, 3, -1)))
    # A planner that carries a choice: told to keep one, it plans with it (the masks of those classes); told to
    # choose anew, it chooses as it does without one.
    if getattr(planner, "carries_choice", False):
        from dit_compiler.passes.planners import Carried

        other = ~plan.choice
        kept = planner.plan(q, k, v, constants, layout, block_size=BLOCK, density=density, scale=scale,
                            carried=Carried(other, torch.tensor(False)))
        fresh = planner.plan(q, k, v, constants, layout, block_size=BLOCK, density=density, scale=scale,
                             carried=Carried(other, torch.tensor(True)))
        assert torch.equal(kept.choice, other) and torch.equal(fresh.choice, plan.choice)
        # keeping the choice it would make gives the plan it makes
        same = planner.plan(q, k, v, constants, layout, block_size=BLOCK, density=density, scale=scale,
                            carried=Carried(plan.choice, torch.tensor(False)))
        for field in dataclasses.fields(plan):
            a, b = getattr(plan, field.name), getattr(same, field.name)
            assert (a is None and b is None) or torch.equal(a, b), field.name
    # Through the generic replacement: at density 1 it is exact dense attention in the original order.
    if density == 1.0:
        out, _, _ = sparse_attention(q, k, v, None, None, constants, layout, planner=name, density=1.0,
                                     block_size=BLOCK, scale=scale)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale),
                                   rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seq_len=st.integers(1, 40), order=st.sampled_from(["shared", "per batch and head", "per head"]),
       seed=st.integers(0, 2**16))
def test_the_plan_order_is_the_gather_it_stands_for(seq_len, order, seed):
    """A shared order is written by scattering to the inverse (fused into x's producer), a per-head one [B|1, H, S]
    by `permute_tokens`; either must equal the gather."""
    from dit_compiler.kernels.block_mask import invert_permutation
    from dit_compiler.passes.sparse_attention import _reorder, _to_plan_order

    torch.manual_seed(seed)
    x = torch.randn(2, 3, seq_len, 4)
    batch = {"shared": 0, "per batch and head": 2, "per head": 1}[order]
    perm = torch.stack([torch.randperm(seq_len) for _ in range(3 * batch)]).view(batch, 3, seq_len) if batch \
        else torch.randperm(seq_len)
    index = perm[0] if order == "per head" else perm  # [S], [H, S] or [B, H, S], as the site hands it over
    torch.testing.assert_close(_to_plan_order(x, index, invert_permutation(index)), _reorder(x, perm), rtol=0,
                               atol=0)


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_the_site_reads_each_value_through_one_graph_node(name):
    """Every vsparse op of a compiled site reads q, k and v through the same graph nodes: each op's inputs are
    realized with their traced strides, so two nodes for one value are written out twice. svg's `detach()` for the
    sampled rows came out of functionalization as a second permute of RoPE's output, and Inductor's RoPE kernel
    stored q and k twice (H100, Wan-1.3B: +32 µs a site for each; README, "End to end")."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from tiny_models import wan

    graphs = []

    class Capture(CustomGraphPass):
        def __call__(self, graph):
            graphs.append(graph)

        def uuid(self):
            return None  # no FX graph cache entry: every compile runs the pass

    model, inputs = wan(frames=2, height=32, width=32, text=5, layers=1, head_dim=64)  # svg-shift: frames > 3 blocks
    torch._dynamo.reset()
    options = dict(sparsity=name, density=0.5, block_size=64, dense_layers=0, dense_steps=0.0, cache="none",
                   force_sparse=True)
    compiled = torch.compile(model, backend="vsparse", options=options)
    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_post_pass=Capture(), fx_graph_cache=False):
        compiled(**inputs)
    ops = [n for graph in graphs for n in graph.nodes
           if n.op == "call_function" and str(n.target).startswith("vsparse.")]
    assert any(op.target is torch.ops.vsparse.block_sparse_attention.default for op in ops), "no site rewritten"
    producers: dict = {}
    for node in (a for op in ops for a in op.all_input_nodes if a.op == "call_function"):
        producers.setdefault((node.target, repr(node.args), repr(node.kwargs)), set()).add(node)
    assert not [(key, nodes) for key, nodes in producers.items() if len(nodes) > 1], "one value, several graph nodes"
