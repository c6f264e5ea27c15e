import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from dit_compiler.kernels import block_mask
from dit_compiler.passes.planners import common, svg


@st.composite
def layouts(draw, max_video=1500):
    """(frames, height, width, text_before, text_after, block_size) with at most max_video video tokens."""
    frames = draw(st.integers(1, 8))
    height = draw(st.integers(1, min(40, max_video // frames)))
    width = draw(st.integers(1, min(40, max_video // (frames * height))))
    texts = st.one_of(st.just(0), st.integers(1, 150))
    return frames, height, width, draw(texts), draw(texts), draw(st.sampled_from([16, 64, 128]))


def seq_len(frames, height, width, text_before, text_after, *_):
    return text_before + frames * height * width + text_after


@settings(max_examples=60, deadline=None)
@given(layout=layouts())
def test_position_major_permutation(layout):
    frames, height, width, text_before, text_after, _ = layout
    perm, inverse = svg.position_major_permutation(*layout[:5])
    s = seq_len(*layout)
    assert perm.dtype == inverse.dtype == torch.int64 and perm.shape == inverse.shape == (s,)
    assert torch.equal(perm.sort().values, torch.arange(s))
    assert torch.equal(perm[inverse], torch.arange(s)) and torch.equal(inverse[perm], torch.arange(s))
    text = torch.cat([torch.arange(text_before), torch.arange(s - text_after, s)])
    assert torch.equal(perm[text], text)
    # Position-major slot (p, t) holds frame-major token (t, p).
    t, p = torch.meshgrid(torch.arange(frames), torch.arange(height * width), indexing="xy")
    assert torch.equal(perm[text_before + p * frames + t], text_before + t * height * width + p)


def unit_gaps(unit_of_position, seq, text_before, text_after, block_size):
    """[n, n] gap between the video units (frames or positions) two blocks cover, from each token's unit."""
    n = block_mask.num_blocks(seq, block_size)
    units = torch.full((n * block_size,), -1)
    units[text_before: seq - text_after] = unit_of_position
    units = units.view(n, block_size)
    big = torch.iinfo(units.dtype).max
    first = torch.where(units >= 0, units, big).amin(-1)
    last = units.amax(-1)
    return (first - last[:, None]).clamp(min=0) + (first[:, None] - last).clamp(min=0)


def check_nearest_units_mask(num, idx, gaps, layout, density):
    """Budgeted counts, forced text and diagonal blocks, and every freely chosen block no farther (in units)
    than any passed-over one."""
    frames, height, width, text_before, text_after, block_size = layout
    s = seq_len(*layout)
    n = block_mask.num_blocks(s, block_size)
    block_mask.validate(num, idx, 1, 1, s, s, block_size)
    visit = block_mask.to_block_bool(num, idx)[0, 0]
    text = common.text_blocks(s, text_before, text_after, block_size)
    forced = torch.eye(n, dtype=torch.bool) | text
    expected = torch.where(text, n, forced.sum(-1).clamp(min=max(1, math.ceil(density * n))))
    assert torch.equal(num[0, 0], expected.to(torch.int32))
    assert (visit | ~forced).all() and visit[text].all()
    free = ~forced & ~text[:, None]
    farthest_chosen = torch.where(visit & free, gaps, -1).amax(-1)
    nearest_passed = torch.where(~visit & free, gaps, torch.iinfo(gaps.dtype).max).amin(-1)
    assert (farthest_chosen <= nearest_passed).all()


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), density=st.floats(0.01, 1.0))
def test_spatial_mask_visits_the_nearest_frames(layout, density):
    frames, height, width, text_before, text_after, block_size = layout
    num, idx = svg.spatial_block_mask(*layout, density)
    frame_of_token = torch.arange(frames * height * width) // (height * width)
    gaps = unit_gaps(frame_of_token, seq_len(*layout), text_before, text_after, block_size)
    check_nearest_units_mask(num, idx, gaps, layout, density)


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), density=st.floats(0.01, 1.0))
def test_temporal_mask_is_a_band_of_the_nearest_positions(layout, density):
    frames, height, width, text_before, text_after, block_size = layout
    num, idx = svg.temporal_block_mask(*layout, density)
    perm, _ = svg.position_major_permutation(*layout[:5])
    position_of_slot = (perm[text_before: seq_len(*layout) - text_after] - text_before) % (height * width)
    gaps = unit_gaps(position_of_slot, seq_len(*layout), text_before, text_after, block_size)
    check_nearest_units_mask(num, idx, gaps, layout, density)


@settings(max_examples=20, deadline=None)
@given(layout=layouts())
def test_density_one_visits_every_block(layout):
    for make_mask in (svg.spatial_block_mask, svg.temporal_block_mask):
        num, idx = make_mask(*layout, 1.0)
        assert block_mask.to_block_bool(num, idx).all()


def grid_qkv(layout, lengths, seed, dim=32, noise=0.3):
    """q, k, v [1, len(lengths), S, D]; head h's scaled scores are -sum_a (p_a - p'_a)^2 / (2 lengths[h][a]^2)
    over the (t, y, x) grid (exact in the first 5 dims, noise elsewhere); text sits far from the video."""
    frames, height, width, text_before, text_after, _ = layout
    g = torch.Generator().manual_seed(seed)
    s = seq_len(*layout)
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    grid = torch.stack([t, y, x], -1).reshape(-1, 3).float()
    qs, ks = [], []
    for length in lengths:
        pos = torch.full((s, 3), -50.0)
        pos[text_before: s - text_after] = grid / torch.tensor(length)
        sq, one = (pos ** 2).sum(-1, keepdim=True), torch.ones(s, 1)
        root_c = (dim ** 0.5 / 2) ** 0.5
        q, k = torch.randn(2, s, dim, generator=g) * noise
        q[:, :5] = torch.cat([2 * pos, -one, -sq], -1) * root_c
        k[:, :5] = torch.cat([pos, sq, one], -1) * root_c
        qs.append(q)
        ks.append(k)
    return torch.stack(qs)[None], torch.stack(ks)[None], torch.randn(1, len(lengths), s, dim, generator=g)


# Per-axis (t, y, x) attention lengths: spatial heads stay in their frame, temporal heads on their position.
SPATIAL, TEMPORAL = (0.7, 3.0, 3.0), (6.0, 0.7, 0.7)


@pytest.mark.parametrize("layout", [(6, 10, 12, 8, 5, 16), (5, 16, 16, 0, 0, 64), (4, 12, 20, 30, 0, 64),
                                    (8, 9, 11, 0, 40, 16)])
def test_classify_heads_tells_spatial_from_temporal(layout):
    lengths = [SPATIAL, TEMPORAL, TEMPORAL, SPATIAL]
    q, k, v = grid_qkv(layout, lengths, seed=0)
    q, k, v = (torch.cat([x, x.flip(1)]) for x in (q, k, v))  # batch 2: the heads in reverse
    frames, height, width, text_before, text_after, block_size = layout
    temporal = svg.classify_heads(q, k, v, frames=frames, height=height, width=width, text_before=text_before,
                                  text_after=text_after, block_size=block_size, density=0.25, num_sample_rows=16)
    truth = torch.tensor([length is TEMPORAL for length in lengths])
    assert torch.equal(temporal, torch.stack([truth, truth.flip(0)]))


def test_planner_skips_the_classification_in_the_dense_phase():
    layout = (6, 10, 12, 8, 5, 16)
    q, k, v = grid_qkv(layout, [SPATIAL, TEMPORAL], seed=0)
    planner, grid = svg.SvgPlanner(), layout[:5]
    constants = planner.constants(grid, 16, 0.25, q.device)
    kwargs = dict(block_size=16, density=0.25, scale=q.shape[-1] ** -0.5)
    classified = planner.plan(q, k, v, constants, grid, **kwargs)
    assert classified.reordered_heads.tolist() == [[False, True]]
    for dense in (None, torch.tensor(False)):
        plan = planner.plan(q, k, v, constants, grid, **kwargs, dense=dense)
        assert torch.equal(plan.reordered_heads, classified.reordered_heads)
    # The dense phase runs the full mask whatever the plan says: the op computes nothing and every head reads as
    # spatial (none reordered: the op moves no row).
    skipped = planner.plan(q, k, v, constants, grid, **kwargs, dense=torch.tensor(True))
    assert not skipped.reordered_heads.any()


def test_classify_heads_reads_only_the_sampled_query_rows():
    layout = (6, 10, 12, 8, 5, 16)
    frames, height, width, text_before, text_after, block_size = layout
    q, k, v = grid_qkv(layout, [SPATIAL, TEMPORAL], seed=0)
    kwargs = dict(frames=frames, height=height, width=width, text_before=text_before, text_after=text_after,
                  block_size=block_size, density=0.25, num_sample_rows=16)
    # The documented spread: row r in frame r * frames // 16, at frame position frac(r / phi + 1/2).
    r = torch.arange(16)
    position = ((r * (5 ** 0.5 - 1) / 2 + 0.5) % 1 * height * width).long()
    rows = text_before + r * frames // 16 * height * width + position
    scrambled = torch.randn_like(q)
    scrambled[..., rows, :] = q[..., rows, :]
    assert torch.equal(svg.classify_heads(q, k, v, **kwargs), svg.classify_heads(scrambled, k, v, **kwargs))
    assert torch.equal(svg.classify_heads(q, k, v, **kwargs), torch.tensor([[False, True]]))


@pytest.mark.parametrize("grid, count", [((21, 30, 52), 21), ((21, 30, 52), 64), ((9, 32, 32), 21),
                                         ((5, 8, 12), 12), ((6, 10, 12), 16)])
def test_sampled_rows_cover_the_frames_and_spread_inside_them(grid, count):
    """Every frame gets its share of the rows (shares differ by at most one), no two rows share a frame position,
    and they reach at least half the frame's lines. An even step over the video failed on Wan's grid: 21 rows of
    21 frames all fell on each frame's first token."""
    frames, height, width = grid
    rows = svg.svg_constants((*grid, 7, 3), 16, 0.3, num_sample_rows=count)["sample_rows"] - 7
    frame, position = rows // (height * width), rows % (height * width)
    assert rows.shape == (count,) and bool((rows >= 0).all()) and bool((rows < frames * height * width).all())
    shares = torch.bincount(frame, minlength=frames)
    assert int(shares.max() - shares.min()) <= 1
    assert position.unique().numel() == count
    assert (position // width).unique().numel() >= min(count, height) // 2


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_sampled_errors_match_a_float64_softmax_per_mask(dtype, tolerance):
    layout = (5, 8, 12, 8, 3, 16)
    constants = svg.svg_constants(layout[:5], 16, 0.3, num_sample_rows=12)
    g = torch.Generator().manual_seed(3)
    seq = 8 + 5 * 8 * 12 + 3
    q, k, v = (torch.randn(2, 3, seq, 32, generator=g) for _ in range(3))
    spatial, temporal = svg.sampled_errors(q.to(dtype), k.to(dtype), v.to(dtype), constants, scale=0.3)

    # Oracle: per mask, the softmax over the keys it allows, in float64.
    rows = constants["sample_rows"]
    scores = q.double()[..., rows, :] @ k.double().transpose(-1, -2) * 0.3

    def output(allowed):
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v.double()

    full_mask, spatial_mask, temporal_mask = constants["sample_masks"]
    assert full_mask.all()
    full = output(full_mask)
    for got, mask in ((spatial, spatial_mask), (temporal, temporal_mask)):
        want = (output(mask) - full).square().mean(dim=(-2, -1))
        assert got.dtype == torch.float32 and got.shape == (2, 3)
        assert torch.allclose(got.double(), want, rtol=tolerance, atol=0), (got, want)


def plan_output(q, k, v, plan, block_size):
    """Run a plan the way the op's caller does: gather per head, masked attention, gather back."""
    perm, inverse, num, idx = plan
    gather = lambda x, index: x.gather(-2, index[..., None].expand_as(x))  # noqa: E731
    s = q.shape[-2]
    out = F.scaled_dot_product_attention(gather(q, perm), gather(k, perm), gather(v, perm),
                                         attn_mask=block_mask.to_token_mask(num, idx, s, s, block_size))
    return gather(out, inverse)


def test_svg_plan_per_head_layouts_and_quality():
    layout = (6, 10, 12, 8, 5, 16)
    frames, height, width, text_before, text_after, block_size = layout
    lengths = [SPATIAL, TEMPORAL, SPATIAL, TEMPORAL]
    q, k, v = grid_qkv(layout, lengths, seed=3)
    s, n, density = q.shape[-2], block_mask.num_blocks(q.shape[-2], block_size), 0.25
    perm, inverse, num, idx = plan = svg.svg_plan(
        q, k, v, frames=frames, height=height, width=width, text_before=text_before, text_after=text_after,
        block_size=block_size, density=density, num_sample_rows=16)
    assert perm.shape == inverse.shape == (1, 4, s) and perm.dtype == inverse.dtype == torch.int64
    block_mask.validate(num, idx, 1, 4, s, s, block_size)
    position_major, position_major_inverse = svg.position_major_permutation(*layout[:5])
    spatial_mask = svg.spatial_block_mask(*layout, density)
    temporal_mask = svg.temporal_block_mask(*layout, density)
    for h, length in enumerate(lengths):
        head_perm, head_mask = ((position_major, temporal_mask) if length is TEMPORAL
                                else (torch.arange(s), spatial_mask))
        assert torch.equal(perm[0, h], head_perm) and torch.equal(inverse[0, h].gather(0, perm[0, h]),
                                                                    torch.arange(s))
        assert torch.equal(num[0, h], head_mask[0][0, 0]) and torch.equal(idx[0, h], head_mask[1][0, 0])

    dense = F.scaled_dot_product_attention(q, k, v)
    text = common.text_blocks(s, text_before, text_after, block_size)
    random_scores = torch.rand(1, 4, n, n, generator=torch.Generator().manual_seed(0))
    identity = torch.arange(s).expand(1, 4, s)
    random_plan = (identity, identity) + block_mask.from_block_bool(
        common.keep_strongest(random_scores, density, text))
    spatial_only = (identity, identity) + tuple(m.expand(1, 4, *m.shape[2:]) for m in spatial_mask)
    temporal_only = (position_major.expand(1, 4, s), position_major_inverse.expand(1, 4, s)) + tuple(m.expand(1, 4, *m.shape[2:]) for m in temporal_mask)
    errors = {name: ((plan_output(q, k, v, p, block_size) - dense).norm() / dense.norm()).item()
              for name, p in (("svg", plan), ("random", random_plan), ("spatial only", spatial_only),
                              ("temporal only", temporal_only))}
    print(", ".join(f"{name} {e:.3f}" for name, e in errors.items()))
    assert errors["svg"] <= 0.3 * errors["random"]
    assert errors["svg"] <= 0.5 * errors["spatial only"] and errors["svg"] <= 0.75 * errors["temporal only"]


def svg_pipeline(q, k, v, frames, height, width, text_before, text_after):
    return svg.svg_plan(q, k, v, frames=frames, height=height, width=width, text_before=text_before,
                        text_after=text_after, block_size=16, density=0.3, num_sample_rows=8)


# Inductor is what the backend hands the graph to; it once failed on a floor division of a clamped arange.
@pytest.mark.parametrize("backend, dynamic", [("aot_eager", False), ("aot_eager", True), ("inductor", True)])
def test_svg_planner_compiles_fullgraph(backend, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(svg_pipeline, fullgraph=True, backend=backend, dynamic=dynamic)
    for i, size in enumerate([(2, 10, 12, 5, 3), (3, 7, 13, 9, 4)]):
        q, k, v = grid_qkv(size + (16,), [SPATIAL, TEMPORAL], seed=i, dim=8)
        if dynamic and i:
            with torch.compiler.set_stance("fail_on_recompile"):  # one graph serves every size
                got = compiled(q, k, v, *size)
        else:
            got = compiled(q, k, v, *size)
        for a, b in zip(got, svg_pipeline(q, k, v, *size)):
            assert torch.equal(a, b)


def test_svg_planner_traces_with_make_fx_symbolic():
    size = (2, 10, 12, 5, 3)
    q, k, v = grid_qkv(size + (16,), [SPATIAL, TEMPORAL], seed=0, dim=8)
    graph = make_fx(lambda q, k, v: svg_pipeline(q, k, v, *size), tracing_mode="symbolic")(q, k, v)
    for a, b in zip(graph(q, k, v), svg_pipeline(q, k, v, *size)):
        assert torch.equal(a, b)


def test_bad_input_names_the_problem():
    layout = (2, 4, 4, 3, 0, 16)
    q, k, v = grid_qkv(layout, [SPATIAL], seed=0, dim=8)
    kwargs = dict(frames=2, height=4, width=4, text_before=3, text_after=0, block_size=16, density=0.5)
    for density in (0.0, 2.0):
        with pytest.raises(ValueError, match="density"):
            svg.svg_plan(q, k, v, **{**kwargs, "density": density})
        with pytest.raises(ValueError, match="density"):
            svg.spatial_block_mask(*layout, density)
    with pytest.raises(ValueError, match="sequence length"):
        svg.svg_plan(q, k, v, **{**kwargs, "text_before": 4})
    with pytest.raises(ValueError, match="num_sample_rows"):
        svg.classify_heads(q, k, v, **kwargs, num_sample_rows=0)
    with pytest.raises(ValueError, match="block_size"):
        svg.temporal_block_mask(2, 4, 4, 3, 0, -16, 0.5)
    with pytest.raises(ValueError, match="frames"):
        svg.position_major_permutation(0, 4, 4, 3, 0)
    with pytest.raises(ValueError, match="q, k, v"):
        svg.classify_heads(q, k[..., :-1, :], v, **kwargs)


@pytest.mark.parametrize("layout", [(4, 12, 20, 0, 0), (5, 10, 26, 3, 0), (3, 16, 16, 0, 70), (6, 8, 25, 40, 9)])
def test_frame_shift_temporal_mask_visits_each_query_position_in_every_frame(layout):
    """svg-shift's temporal heads, in frame-major order: each video query token sees its own position in every
    frame, the text, its own block, and no key twice. Misses only at the video's ends, where a copy would reach
    before the video or into a text block: at most one partial copy a query block at each end, and with no text
    only for query blocks straddling two frames (one copy of the first frame)."""
    block = 64
    frames, height, width, text_before, text_after = layout
    frame_len, seq = height * width, seq_len(*layout)
    num, idx = svg.frame_shift_temporal_mask(layout, block, density=0.6)
    block_mask.validate(num, idx, 1, 1, seq, seq, block, kv_unit=1)
    visits = block_mask.token_visits(num, idx, seq, block, kv_unit=1)[0, 0]  # [n, S]
    starts = idx[0, 0].long()
    text = common.text_blocks(seq, text_before, text_after, block)
    for i in range(num.shape[-1]):
        listed = starts[i, :num[0, 0, i]]
        ends = (listed + block).clamp(max=seq).sort().values
        assert (listed.sort().values[1:] >= ends[:-1]).all(), f"query block {i}: overlapping key blocks"
        if text[i]:
            assert visits[i].all()
            continue
        assert i * block in listed.tolist()  # its own block
        assert visits[i, :text_before].all() and visits[i, seq - text_after:].all()
        rows = torch.arange(i * block, min(i * block + block, seq))
        frame = (rows - text_before) // frame_len
        keys = text_before + torch.arange(frames)[:, None] * frame_len + (rows - text_before) % frame_len
        missed = ~visits[i, keys]  # [frames, rows]
        straddles = bool(frame[0] != frame[-1])
        if text_before == text_after == 0:
            assert not missed.any() or (straddles and not missed[1:].any()), f"query block {i}"
        else:
            assert missed[1:-1].sum() == 0 and missed[0].sum() < block and missed[-1].sum() < block, i


def test_svg_shift_refuses_frames_its_shifted_blocks_could_overlap():
    assert svg.frame_shift_unsupported((3, 8, 25, 0, 0), 64) is None
    assert svg.frame_shift_unsupported((3, 8, 24, 0, 0), 64).endswith("got height*width = 192")
    reason = svg.frame_shift_unsupported((3, 8, 25, 0, 0), 128)
    assert reason == ("svg-shift needs frames longer than 384 tokens (3 blocks of 128), got height*width = 200")
    with pytest.raises(ValueError, match="svg-shift needs frames longer than 384"):
        svg.svg_shift_constants((3, 8, 25, 0, 0), 128, 0.1)


def test_svg_shift_classifies_like_svg_on_the_same_candidates():
    """The sampled rows' temporal candidate is the shifted mask at token level; spatial and full match svg's."""
    layout, block = (4, 12, 20, 5, 0), 64
    shift = svg.svg_shift_constants(layout, block, 0.3)
    plain = svg.svg_constants(layout, block, 0.3)
    assert torch.equal(shift["sample_rows"], plain["sample_rows"])
    assert torch.equal(shift["sample_masks"][:2], plain["sample_masks"][:2])
    num, idx = svg.frame_shift_temporal_mask(layout, block, 0.3)
    rows = shift["sample_rows"]
    expected = block_mask.to_token_mask(num, idx, seq_len(*layout), seq_len(*layout), block, kv_unit=1)[0, 0, rows]
    assert torch.equal(shift["sample_masks"][2], expected)

