"""Sampled-row attention under several token masks: the op (pure-torch path on CPU) and the Triton kernels
(interpreted on CPU, compiled on a GPU), against float64 SDPA with each mask."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import dit_compiler.kernels  # noqa: F401  registers torch.ops.vsparse
from dit_compiler.kernels import sampled_rows, triton_sampled_rows

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
ERROR_FACTOR = 4.0
ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def make_case(seed, batch, heads, q_len, kv_len, dim, num_masks, num_rows, density, dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g).to(dtype).to(device) for n in (q_len, kv_len, kv_len))
    rows = torch.randint(0, q_len, (num_rows,), generator=g)
    masks = torch.rand(num_masks, num_rows, kv_len, generator=g) < density
    masks[0, 0] = False  # a row that may see no key
    return q, k, v, rows.to(device), masks.to(device), dim ** -0.5


def sdpa_per_mask(q, k, v, rows, masks, scale, dtype):
    """[B, H, C, R, D] float64: SDPA in `dtype` per mask; rows that may see no key are zeros (SDPA gives NaN)."""
    outs = [F.scaled_dot_product_attention(q[:, :, rows].to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask,
                                           scale=scale) for mask in masks]
    return torch.where(masks.any(-1)[..., None], torch.stack(outs, 2), 0).double()


def assert_matches(out, q, k, v, rows, masks, scale):
    assert out.dtype == torch.float32 and out.shape == (*q.shape[:2], *masks.shape[:2], q.shape[3])
    assert not out.isnan().any(), "unwritten (poisoned) or NaN elements in the output"
    exact = sdpa_per_mask(q, k, v, rows, masks, scale, torch.float64)
    if exact.norm() == 0:  # no row may see any key: zeros exactly
        assert (out == 0).all()
        return
    own = float((sdpa_per_mask(q, k, v, rows, masks, scale, q.dtype) - exact).norm() / exact.norm())
    err = float((out.double() - exact).norm() / exact.norm())
    assert err <= ERROR_FACTOR * own + ERROR_FLOOR[q.dtype], f"error {err:.2e}, low-precision SDPA's own {own:.2e}"
    assert (out[:, :, ~masks.any(-1)] == 0).all(), "rows that may see no key must be zeros"


def cases(max_len, dims):
    return dict(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), heads=st.integers(1, 3),
                q_len=st.integers(1, max_len), kv_len=st.integers(1, max_len), dim=st.sampled_from(dims),
                num_masks=st.integers(1, 3), num_rows=st.integers(1, 20), density=st.floats(0.05, 1.0),
                dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))


@settings(max_examples=25, deadline=None)
@given(**cases(max_len=600, dims=[16, 64, 128]))
def test_op_cpu_matches_float64_sdpa(**case):
    q, k, v, rows, masks, scale = make_case(**case)
    assert_matches(torch.ops.vsparse.sampled_rows_attention(q, k, v, rows, masks, scale), q, k, v, rows, masks, scale)


@interpreted
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**cases(max_len=200, dims=[16, 32]), splits=st.integers(1, 6))
def test_triton_kernels_match_float64_sdpa(splits, **case):
    q, k, v, rows, masks, scale = make_case(**case)
    out = torch.full((*q.shape[:2], *masks.shape[:2], q.shape[3]), float("nan"))
    triton_sampled_rows.triton_sampled_rows_attention(q, k, v, rows, masks, scale, splits=splits, out=out)
    assert_matches(out, q, k, v, rows, masks, scale)


@interpreted
@pytest.mark.parametrize("chunk, splits", [(2, 5), (4, 4), (8, 3)])
def test_triton_merge_reads_the_splits_in_chunks(monkeypatch, chunk, splits):
    """The merge loads MERGE_SPLIT_CHUNK splits at a time: several chunks, the last one ragged, or one chunk with
    splits left over; under 64-row partial tiles, past the last row (3 x 7 = 21)."""
    monkeypatch.setattr(triton_sampled_rows, "MERGE_SPLIT_CHUNK", chunk)
    q, k, v, rows, masks, scale = make_case(2, 1, 2, 60, 80, 16, 3, 7, 0.5, torch.float32)
    out = torch.full((*q.shape[:2], *masks.shape[:2], q.shape[3]), float("nan"))
    triton_sampled_rows.triton_sampled_rows_attention(q, k, v, rows, masks, scale, config=(64, 16, 1, 1),
                                                      splits=splits, out=out)
    assert_matches(out, q, k, v, rows, masks, scale)


@interpreted
def test_triton_kernels_read_strided_inputs():
    q, k, v, rows, masks, scale = make_case(1, 2, 3, 70, 90, 16, 2, 5, 0.5, torch.float32)
    wide = torch.randn(2, 90, 3, 16)  # [B, S, H, D] storage, read through a transposed view
    k = wide.transpose(1, 2)
    out = triton_sampled_rows.triton_sampled_rows_attention(q, k, v, rows, masks, scale)
    assert_matches(out, q, k, v, rows, masks, scale)


@interpreted
def test_triton_kernels_normalize_a_mask_whose_keys_are_far_below_the_hidden_ones():
    # Each mask's softmax has its own maximum: a mask that hides the heavy keys (its own sum ~2^-40 of theirs) must
    # still come out normalized.
    q, k, v, rows, masks, scale = make_case(5, 1, 1, 40, 96, 16, 2, 4, 1.0, torch.float32)
    k[:, :, :32] = q[:, :, rows[0]][:, :, None] * 6  # keys 0..31 score far above the rest for row 0
    masks[1, :, :32] = False
    out = triton_sampled_rows.triton_sampled_rows_attention(q, k, v, rows, masks, scale, splits=3)
    assert_matches(out, q, k, v, rows, masks, scale)


@pytest.mark.parametrize("run", ["op", pytest.param("triton", marks=interpreted)])
def test_skip_gives_zeros_and_its_absence_computes(run):
    q, k, v, rows, masks, scale = make_case(2, 1, 2, 50, 50, 16, 3, 4, 0.5, torch.float32)
    shape = (1, 2, 3, 4, 16)
    for skip in (torch.tensor(True), torch.tensor(False)):
        if run == "op":
            out = torch.ops.vsparse.sampled_rows_attention(q, k, v, rows, masks, scale, skip)
        else:
            out = triton_sampled_rows.triton_sampled_rows_attention(
                q, k, v, rows, masks, scale, skip, out=torch.full(shape, float("nan")))
        if skip:
            assert torch.equal(out, torch.zeros(shape))
        else:
            assert_matches(out, q, k, v, rows, masks, scale)


def test_bad_inputs_raise_naming_the_problem():
    q, k, v, rows, masks, scale = make_case(3, 1, 2, 40, 40, 16, 2, 4, 0.5, torch.float32)
    op = torch.ops.vsparse.sampled_rows_attention
    with pytest.raises(ValueError, match="rows must be int64"):
        op(q, k, v, rows.int(), masks, scale)
    with pytest.raises(ValueError, match="masks must be bool"):
        op(q, k, v, rows, masks[:, :, :-1], scale)
    with pytest.raises(ValueError, match="masks must be bool"):
        op(q, k, v, rows, masks.float(), scale)
    with pytest.raises(ValueError, match="skip must be a 0-dim bool"):
        op(q, k, v, rows, masks, scale, torch.tensor([True]))
    with pytest.raises(TypeError, match="share a dtype"):
        op(q, k.half(), v, rows, masks, scale)
    with pytest.raises(ValueError, match="k, v"):
        op(q, k[:, :1], v, rows, masks, scale)
    with pytest.raises(ValueError, match="head dim must be one of .* on CUDA, got 8"):
        sampled_rows.check_kernel_head_dim(q[..., :8])
    sampled_rows.check_kernel_head_dim(q)


def test_op_stays_one_opaque_call_under_compile_with_symbolic_shapes():
    q, k, v, rows, masks, scale = make_case(4, 1, 2, 60, 60, 16, 2, 3, 0.5, torch.float32)
    compiled = torch.compile(lambda *a: torch.ops.vsparse.sampled_rows_attention(*a, scale), dynamic=True,
                             fullgraph=True, backend="aot_eager")
    assert_matches(compiled(q, k, v, rows, masks), q, k, v, rows, masks, scale)


# ---- the same properties on a GPU (run there with TRITON_INTERPRET=0) ----

@pytest.mark.gpu
@settings(max_examples=25, deadline=None)
@given(**cases(max_len=3000, dims=[64, 128]), splits=st.one_of(st.none(), st.integers(1, 40)))
def test_gpu_kernels_match_float64_sdpa(splits, **case):
    q, k, v, rows, masks, scale = make_case(**case, device="cuda")
    out = torch.full((*q.shape[:2], *masks.shape[:2], q.shape[3]), float("nan"), device="cuda")
    triton_sampled_rows.triton_sampled_rows_attention(q, k, v, rows, masks, scale, splits=splits, out=out)
    assert_matches(out, q, k, v, rows, masks, scale)
    skip = torch.tensor(True, device="cuda")
    assert (torch.ops.vsparse.sampled_rows_attention(q, k, v, rows, masks, scale, skip) == 0).all()


def test_result_is_a_constant_to_autograd():
    """It only chooses among masks: inputs that require grad give an output without grad_fn (callers need not
    detach, which made a second graph node of q and k: tests/test_planners.py)."""
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    rows, masks = torch.tensor([3, 17]), torch.rand(2, 2, 40) < 0.5
    out = torch.ops.vsparse.sampled_rows_attention(q, k, v, rows, masks, 0.25)
    assert not out.requires_grad and out.grad_fn is None


def test_aligned_masks_keep_aligned_rows_and_copy_others():
    """The CUDA kernel reads the masks through TMA (rows 16 bytes apart): a planner's masks are stored so
    (`padded_masks`), and are passed on as they are; others are copied into such rows, values unchanged."""
    from dit_compiler.kernels.sampled_rows import MASK_ROW_BYTES, aligned_masks
    from dit_compiler.passes.planners.svg import svg_constants

    masks = torch.rand(3, 5, 40, generator=torch.Generator().manual_seed(0)) > 0.5
    aligned = aligned_masks(masks)
    assert aligned is not masks and torch.equal(aligned, masks)
    assert aligned.stride(1) % MASK_ROW_BYTES == 0 and aligned.stride(0) == 5 * aligned.stride(1)
    assert aligned_masks(aligned) is aligned
    stored = svg_constants((3, 4, 10, 2, 1), 16, 0.5)["sample_masks"]
    assert aligned_masks(stored) is stored
