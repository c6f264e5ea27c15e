"""The dual-layout planner (passes/planners/dual.py) on structured attention: spatial and temporal heads."""
import pytest
import torch

from dit_compiler.passes.planners.draft import draft_block_mask
from dit_compiler.passes.planners.dual import LAYOUTS, DualPlanner, dual_plan
from test_masks_svg import SPATIAL, TEMPORAL, grid_qkv, plan_output


def single_layout_plan(q, k, constants, layout, name, block_size, density):
    """Draft's pooled-map mask with every head in one layout."""
    order, inverse = constants[name], constants[name + "_inverse"]
    heads, seq = q.shape[1], q.shape[2]
    mask = draft_block_mask(q.index_select(2, order), k.index_select(2, order), block_size=block_size,
                            density=density, text_before=layout[3], text_after=layout[4])
    return order.expand(1, heads, seq), inverse.expand(1, heads, seq), *mask


@pytest.mark.parametrize("layout", [(8, 12, 16, 0, 0, 64), (6, 10, 12, 8, 5, 64)])
def test_each_head_takes_its_layout_and_the_mix_beats_either_layout_alone(layout):
    """Temporal heads take the position-major layout, spatial heads the windows; the attention output's error
    against dense is at most the better single layout's (Draft alone is the window layout) at equal density."""
    lengths = [SPATIAL, TEMPORAL, SPATIAL, TEMPORAL]
    q, k, v = grid_qkv(layout, lengths, seed=1)
    block_size, density = layout[5], 0.15
    constants = DualPlanner().constants(layout[:5], block_size, density, None)
    plan = dual_plan(q, k, constants, block_size=block_size)
    for h, length in enumerate(lengths):
        expected = constants["position_major" if length is TEMPORAL else "window"]
        assert torch.equal(plan[0][0, h], expected)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    errors = {name: ((plan_output(q, k, v, p, block_size) - dense).norm() / dense.norm()).item()
              for name, p in [("dual", plan)] + [(n, single_layout_plan(q, k, constants, layout, n, block_size,
                                                                          density)) for n in LAYOUTS]}
    print(", ".join(f"{name} {e:.3f}" for name, e in errors.items()))
    assert errors["dual"] <= min(errors["window"], errors["position_major"]) * 1.001
    assert errors["dual"] < 0.8 * errors["window"]  # what Draft alone loses on the temporal heads
