import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from dit_compiler.kernels import block_mask
from dit_compiler.passes.planners import common, draft


@st.composite
def layouts(draw, min_frames=1, min_windows=0, max_video=1500):
    """(frames, height, width, text_before, text_after, block_size) with at most max_video video tokens."""
    block_size = draw(st.sampled_from([16, 64, 128]))
    rows, cols = draft.window_shape(block_size)
    min_height, min_width = max(1, min_windows * rows), max(1, min_windows * cols)
    frames = draw(st.integers(min_frames, min(4, max_video // (min_height * min_width))))
    height = draw(st.integers(min_height, max(min_height, min(48, max_video // (frames * min_width)))))
    width = draw(st.integers(min_width, max(min_width, min(64, max_video // (frames * height)))))
    texts = st.one_of(st.just(0), st.integers(1, 150))
    return frames, height, width, draw(texts), draw(texts), block_size


def seq_len(frames, height, width, text_before, text_after):
    return text_before + frames * height * width + text_after


def video_coords(perm, frames, height, width, text_before):
    """[S, 3] (t, y, x) of the token at each permuted position; -1 for text."""
    video = perm - text_before
    inside = (video >= 0) & (video < frames * height * width)
    coords = torch.stack([video // (height * width), video % (height * width) // width, video % width], -1)
    return torch.where(inside[:, None], coords, -1)


def mean_block_spread(perm, frames, height, width, text_before, block_size):
    """Mean over blocks (with >= 2 video tokens) of the mean squared distance of their tokens' (t, y, x) to the
    block centroid: how far apart the tokens that one pooled q/k stands for are."""
    coords = video_coords(perm, frames, height, width, text_before).float()
    n = block_mask.num_blocks(perm.numel(), block_size)
    coords = F.pad(coords, (0, 0, 0, n * block_size - perm.numel()), value=-1).view(n, block_size, 3)
    weight = (coords[..., 0] >= 0).float()
    count = weight.sum(-1)
    centroid = (coords * weight[..., None]).sum(1) / count.clamp(min=1)[:, None]
    spread = (((coords - centroid[:, None]) ** 2).sum(-1) * weight).sum(-1) / count.clamp(min=1)
    return spread[count >= 2].mean().item()


def test_window_shape():
    assert draft.window_shape(64) == (8, 8)
    assert draft.window_shape(128) == (8, 16)
    assert draft.window_shape(16) == (4, 4)
    assert draft.window_shape(48) == (6, 8)
    with pytest.raises(ValueError, match="block_size"):
        draft.window_shape(0)


@settings(max_examples=60, deadline=None)
@given(layout=layouts())
def test_window_permutation_is_a_bijection_with_text_in_place(layout):
    frames, height, width, text_before, text_after, block_size = layout
    perm, inverse = draft.window_permutation(*layout)
    s = seq_len(*layout[:5])
    assert perm.dtype == inverse.dtype == torch.int64 and perm.shape == inverse.shape == (s,)
    assert torch.equal(perm.sort().values, torch.arange(s))
    assert torch.equal(perm[inverse], torch.arange(s)) and torch.equal(inverse[perm], torch.arange(s))
    x = torch.randn(2, s, 3)
    assert torch.equal(x[:, perm][:, inverse], x)
    text = torch.cat([torch.arange(text_before), torch.arange(s - text_after, s)])
    assert torch.equal(perm[text], text)


@settings(max_examples=60, deadline=None)
@given(layout=layouts())
def test_every_whole_window_is_exactly_one_block(layout):
    """Each rows x cols tile of the frame grid is one block (ragged edges may not be)."""
    frames, height, width, text_before, text_after, block_size = layout
    rows, cols = draft.window_shape(block_size)
    perm, _ = draft.window_permutation(*layout)
    s = perm.numel()
    n_full = s // block_size
    coords = video_coords(perm, frames, height, width, text_before)[: n_full * block_size].view(n_full, block_size, 3)
    low, high = coords.min(1).values, coords.max(1).values
    is_window = ((low >= 0).all(-1) & (low[:, 0] == high[:, 0]) & (high[:, 1] - low[:, 1] == rows - 1)
                 & (high[:, 2] - low[:, 2] == cols - 1) & (low[:, 1] % rows == 0) & (low[:, 2] % cols == 0))
    whole = frames * (height // rows) * (width // cols)
    # Text before the video shifts the block grid; with fewer edge tokens than that shift, one window is split
    # between the first video block and the last.
    split = -text_before % block_size > frames * height * width - whole * block_size
    assert int(is_window.sum()) == max(0, whole - split)


@settings(max_examples=40, deadline=None)
@given(layout=layouts(min_frames=2, min_windows=2))
def test_window_blocks_are_more_compact_than_raster_blocks(layout):
    frames, height, width, text_before, text_after, block_size = layout
    perm, _ = draft.window_permutation(*layout)
    raster = torch.arange(perm.numel())
    windowed = mean_block_spread(perm, frames, height, width, text_before, block_size)
    assert windowed <= 0.75 * mean_block_spread(raster, frames, height, width, text_before, block_size)


# Real latent grids (frames, height, width, text_before, text_after): on these the edges barely cost anything.
REAL_LAYOUTS = {"wan_480p": (21, 30, 52, 0, 0), "wan_720p": (21, 45, 80, 0, 0),
                "hunyuan_544p": (33, 34, 60, 0, 256), "cogvideox": (13, 30, 45, 226, 0)}


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("name", sorted(REAL_LAYOUTS))
def test_window_blocks_on_real_grids_are_near_ideal(name, block_size):
    frames, height, width, text_before, text_after = REAL_LAYOUTS[name]
    rows, cols = draft.window_shape(block_size)
    ideal = (rows * rows - 1) / 12 + (cols * cols - 1) / 12  # spread of one rows x cols patch
    perm, _ = draft.window_permutation(frames, height, width, text_before, text_after, block_size)
    windowed = mean_block_spread(perm, frames, height, width, text_before, block_size)
    raster = mean_block_spread(torch.arange(perm.numel()), frames, height, width, text_before, block_size)
    print(f"{name} bs={block_size}: spread window {windowed:.1f} (ideal {ideal:.1f}), raster {raster:.1f}")
    assert windowed <= 1.1 * ideal and windowed <= 0.15 * raster


def random_qk(layout, batch, heads, seed, dim=8):
    g = torch.Generator().manual_seed(seed)
    s = seq_len(*layout[:5])
    return torch.randn(batch, heads, s, dim, generator=g), torch.randn(batch, heads, s, dim, generator=g)


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), density=st.floats(0.01, 1.0), batch=st.integers(1, 2), heads=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_draft_mask_keeps_the_budget_and_forced_blocks(layout, density, batch, heads, seed):
    frames, height, width, text_before, text_after, block_size = layout
    q, k = random_qk(layout, batch, heads, seed)
    s, n = q.shape[-2], block_mask.num_blocks(q.shape[-2], block_size)
    num, idx = draft.draft_block_mask(q, k, block_size=block_size, density=density, text_before=text_before,
                                      text_after=text_after)
    block_mask.validate(num, idx, batch, heads, s, s, block_size)
    assert num.shape == (batch, heads, n) and idx.shape == (batch, heads, n, n)
    visit = block_mask.to_block_bool(num, idx)
    text = common.text_blocks(s, text_before, text_after, block_size)
    forced = torch.eye(n, dtype=torch.bool) | text
    budget = max(1, math.ceil(density * n))
    expected = torch.where(text, n, forced.sum(-1).clamp(min=budget))
    assert torch.equal(num, expected.to(torch.int32).expand(batch, heads, n))
    assert (visit | ~forced).all() and visit[..., text, :].all()

    # The freely chosen blocks are the strongest of the pooled map.
    scores = draft.pooled_attention_map(q, k, block_size)
    free = ~forced & ~text[:, None]
    chosen = torch.where(visit & free, scores, float("inf")).amin(-1)
    passed = torch.where(~visit & free, scores, float("-inf")).amax(-1)
    assert (chosen >= passed).all()


@settings(max_examples=20, deadline=None)
@given(layout=layouts(), seed=st.integers(0, 2**16))
def test_density_one_visits_every_block(layout, seed):
    q, k = random_qk(layout, 1, 2, seed)
    num, idx = draft.draft_block_mask(q, k, block_size=layout[5], density=1.0, text_before=layout[3],
                                      text_after=layout[4])
    assert torch.equal(num, torch.full_like(num, idx.shape[-1]))
    assert block_mask.to_block_bool(num, idx).all()


def test_pooled_map_averages_only_real_tokens_of_the_last_block():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 37, 4, generator=g), torch.randn(1, 2, 37, 4, generator=g)
    bounds = [(0, 16), (16, 32), (32, 37)]
    q_means = torch.stack([q[..., a:b, :].mean(-2) for a, b in bounds], -2)
    k_means = torch.stack([k[..., a:b, :].mean(-2) for a, b in bounds], -2)
    counts = torch.tensor([b - a for a, b in bounds], dtype=torch.float32)
    expected = (q_means @ k_means.transpose(-1, -2) * 0.5 + counts.log()).softmax(-1)
    torch.testing.assert_close(draft.pooled_attention_map(q, k, 16), expected)


def local_qkv(frames, height, width, text_before, text_after, heads, dim, seed, length=1.5, noise=0.3):
    """q, k whose scaled dot product is -|p - p'|^2 / (2 length^2) for video grid positions p, p' (a smooth
    function of (t, y, x), exact in the first 5 dims), plus noise in the other dims; text sits far away."""
    g = torch.Generator().manual_seed(seed)
    s = seq_len(frames, height, width, text_before, text_after)
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.full((s, 3), -30.0)
    pos[text_before: s - text_after] = torch.stack([t, y, x], -1).reshape(-1, 3).float()
    sq, one = (pos ** 2).sum(-1, keepdim=True), torch.ones(s, 1)
    root_c = (dim ** 0.5 / (2 * length ** 2)) ** 0.5  # SDPA divides by sqrt(dim)
    q_smooth = torch.cat([2 * pos, -one, -sq], -1) * root_c
    k_smooth = torch.cat([pos, sq, one], -1) * root_c

    def with_noise(smooth):
        z = torch.randn(1, heads, s, dim, generator=g) * noise
        z[..., :5] = smooth
        return z

    return with_noise(q_smooth), with_noise(k_smooth), torch.randn(1, heads, s, dim, generator=g)


def masked_error(q, k, v, num, idx, block_size):
    s = q.shape[-2]
    dense = F.scaled_dot_product_attention(q, k, v)
    sparse = F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask.to_token_mask(num, idx, s, s, block_size))
    return ((sparse - dense).norm() / dense.norm()).item()


@pytest.mark.parametrize("layout", [(2, 24, 32, 0, 0, 64), (1, 36, 40, 13, 0, 64), (2, 24, 32, 0, 17, 128)])
def test_draft_mask_captures_local_attention(layout):
    """At density 0.25 the draft mask's output error is far below a random mask's (same budget, same forced
    blocks) and close to the best block mask (the dense map's strongest blocks)."""
    frames, height, width, text_before, text_after, block_size = layout
    heads, density = 4, 0.25
    perm, _ = draft.window_permutation(*layout)
    q, k, v = (x[..., perm, :] for x in local_qkv(*layout[:5], heads=heads, dim=64, seed=1))
    s, n = q.shape[-2], block_mask.num_blocks(q.shape[-2], block_size)
    text = common.text_blocks(s, text_before, text_after, block_size)
    draft_mask = draft.draft_block_mask(q, k, block_size=block_size, density=density, text_before=text_before,
                                        text_after=text_after)
    random_scores = torch.rand(1, heads, n, n, generator=torch.Generator().manual_seed(2))
    random_mask = block_mask.from_block_bool(common.keep_strongest(random_scores, density, text))
    probs = (q @ k.transpose(-1, -2) / 8).softmax(-1)
    block_mass = F.pad(probs, (0, n * block_size - s, 0, n * block_size - s)).view(
        1, heads, n, block_size, n, block_size).sum((3, 5))
    best_mask = block_mask.from_block_bool(common.keep_strongest(block_mass, density, text))
    errors = {name: masked_error(q, k, v, *mask, block_size)
              for name, mask in (("draft", draft_mask), ("random", random_mask), ("best", best_mask))}
    print(f"{layout}: " + ", ".join(f"{name} {e:.3f}" for name, e in errors.items())
          + f", draft/random {errors['draft'] / errors['random']:.3f}")
    assert errors["draft"] <= 0.4 * errors["random"]
    assert errors["draft"] <= 1.5 * errors["best"]


def draft_pipeline(q, k, frames, height, width, text_before, text_after):
    """What the sparse-attention pass inserts: window gather, then the draft mask (block size, density fixed)."""
    perm, inverse = draft.window_permutation(frames, height, width, text_before, text_after, 16)
    q, k = q[..., perm, :], k[..., perm, :]
    num, idx = draft.draft_block_mask(q, k, block_size=16, density=0.3, text_before=text_before,
                                      text_after=text_after)
    return perm, inverse, num, idx


# Inductor is what the backend hands the graph to; it once failed on a floor division of a clamped arange.
@pytest.mark.parametrize("backend, dynamic", [("aot_eager", False), ("aot_eager", True), ("inductor", True)])
def test_draft_planner_compiles_fullgraph(backend, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(draft_pipeline, fullgraph=True, backend=backend, dynamic=dynamic)
    sizes = [(2, 10, 12, 5, 3), (3, 7, 13, 9, 4)]
    for i, size in enumerate(sizes):
        q, k = random_qk(size + (16,), 2, 2, seed=i)
        if dynamic and i:
            with torch.compiler.set_stance("fail_on_recompile"):  # one graph serves every size
                got = compiled(q, k, *size)
        else:
            got = compiled(q, k, *size)
        for a, b in zip(got, draft_pipeline(q, k, *size)):
            assert torch.equal(a, b)


def test_draft_planner_traces_with_make_fx_symbolic():
    q, k = random_qk((2, 10, 12, 5, 3, 16), 1, 2, seed=0)
    graph = make_fx(lambda q, k: draft_pipeline(q, k, 2, 10, 12, 5, 3), tracing_mode="symbolic")(q, k)
    for a, b in zip(graph(q, k), draft_pipeline(q, k, 2, 10, 12, 5, 3)):
        assert torch.equal(a, b)


def test_bad_input_names_the_problem():
    q, k = random_qk((1, 4, 4, 0, 0, 16), 1, 1, seed=0)
    for density in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="density"):
            draft.draft_block_mask(q, k, block_size=16, density=density, text_before=0, text_after=0)
    with pytest.raises(ValueError, match="block_size"):
        draft.draft_block_mask(q, k, block_size=0, density=0.5, text_before=0, text_after=0)
    with pytest.raises(ValueError, match="text_before"):
        draft.draft_block_mask(q, k, block_size=16, density=0.5, text_before=-1, text_after=0)
    with pytest.raises(ValueError, match="exceeds the sequence"):
        draft.draft_block_mask(q, k, block_size=16, density=0.5, text_before=10, text_after=10)
    with pytest.raises(ValueError, match="q and k"):
        draft.draft_block_mask(q, k[..., :8, :], block_size=16, density=0.5, text_before=0, text_after=0)
    with pytest.raises(ValueError, match="height"):
        draft.window_permutation(1, 0, 4, 0, 0, 16)
    with pytest.raises(ValueError, match="text_after"):
        draft.window_permutation(1, 4, 4, 0, -2, 16)
