"""Block-sparse attention: the op (pure-torch path on CPU), the Triton kernel (interpreted on CPU, compiled on a GPU)
and the mask format (cross-checked with FlexAttention), all against float64 SDPA with the block mask expanded."""
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import dit_compiler.kernels  # noqa: F401  registers torch.ops.vsparse
from dit_compiler.kernels import attention_op as bsa
from dit_compiler.kernels import triton_block_sparse
from dit_compiler.kernels import block_mask
from dit_compiler.kernels.masks.banded import banded_block_mask
from dit_compiler.kernels.masks.random import random_block_mask

# Tests that run Triton kernels on CPU tensors through the interpreter (GPU runs set TRITON_INTERPRET=0).
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

# Our error may be this many times the error of SDPA run in the input dtype (plus a floor for near-exact cases):
# the kernel rounds P to the input dtype before P@V, and the interpreter truncates instead of rounding on output.
ERROR_FACTOR = 4.0
ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def shift_key_blocks(num, idx, kv_len, block_size, kv_unit, generator):
    """The mask with each row's key blocks moved by one random whole number of units below a block (so they stay
    disjoint), in starts of `kv_unit` tokens; a row whose last listed block would start past the keys stays put."""
    listed = torch.arange(idx.shape[-1]) < num.unsqueeze(-1)
    starts = idx.long() * block_size
    shift = torch.randint(0, block_size // kv_unit, num.shape, generator=generator) * kv_unit
    last = starts.where(listed, 0).amax(-1)
    shift = shift.where(last + shift < kv_len, 0)
    return num, ((starts + shift.unsqueeze(-1)) // kv_unit).to(torch.int32)


def make_case(seed, batch, heads, q_len, kv_len, dim, dtype, block_size, density, mask_batch, mask_heads, empty_rows,
              with_kv_lengths, kv_aligned=False, kv_unit=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if kv_aligned:  # whole key blocks: no tile needs masking unless kv_lengths cuts it
        kv_len = -(-kv_len // block_size) * block_size
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g).to(dtype).to(device) for n in (q_len, kv_len, kv_len))
    num, idx = random_block_mask(batch if mask_batch else 1, heads if mask_heads else 1, q_len, kv_len, block_size,
                                 density, ragged=True, empty_rows=empty_rows, generator=g)
    if kv_unit is not None:
        num, idx = shift_key_blocks(num, idx, kv_len, block_size, kv_unit, g)
    kv_lengths = None
    if with_kv_lengths:
        kv_lengths = torch.randint(0, kv_len + 1, (batch,), generator=g, dtype=torch.int32).to(device)
    return q, k, v, num.to(device), idx.to(device), 1.0 / math.sqrt(dim), kv_lengths


def token_mask(num, idx, q_len, kv_len, block_size, kv_lengths, kv_unit=None):
    mask = block_mask.to_token_mask(num, idx, q_len, kv_len, block_size, kv_unit)
    if kv_lengths is not None:
        keys = torch.arange(kv_len, device=num.device)
        mask = mask & (keys < kv_lengths.long()[:, None, None, None])
    return mask


def sdpa_reference(q, k, v, mask, scale, dtype):
    """SDPA in `dtype` with the expanded mask; rows that see no key are zeros (the op's contract, SDPA gives NaN)."""
    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, 0).double()


def rel(a, ref):
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_matches(out, q, k, v, num, idx, scale, block_size, kv_lengths, kv_unit=None):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any(), "unwritten (poisoned) or NaN elements in the output"
    mask = token_mask(num, idx, q.shape[2], k.shape[2], block_size, kv_lengths, kv_unit)
    exact = sdpa_reference(q, k, v, mask, scale, torch.float64)
    if exact.norm() == 0:  # every row empty: zeros exactly
        assert (out == 0).all()
        return
    own = rel(sdpa_reference(q, k, v, mask, scale, q.dtype), exact)
    err = rel(out, exact)
    assert err <= ERROR_FACTOR * own + ERROR_FLOOR[q.dtype], f"error {err:.2e}, low-precision SDPA's own {own:.2e}"
    empty = ~mask.any(-1)
    assert (out.masked_select(empty[..., None]) == 0).all(), "rows with no visible key must be zeros"


def reordering(seq_len, batch, heads, generator, flags_batch=True):
    """A random token order [S] and reordered-head flags [B|1, H] with at least one head set and, where there are
    several heads, at least one left as given."""
    order = torch.randperm(seq_len, generator=generator)
    flags = torch.rand(batch if flags_batch else 1, heads, generator=generator) < 0.5
    flags.view(-1)[0] = True
    if flags.numel() > 1:
        flags.view(-1)[-1] = False
    return order, flags


def assert_matches_reordered(out, q, k, v, num, idx, scale, block_size, kv_lengths, kv_unit, order, flags):
    """Each head's output, read in that head's order (`token_order` where reordered), is attention over q, k, v
    read in it."""
    orders = bsa.head_orders(order.to(q.device), flags.to(q.device)).expand(q.shape[:3])

    def gather(t):
        return torch.gather(t, 2, orders[..., None].expand(t.shape))

    assert out.shape == q.shape and not out.isnan().any(), "unwritten (poisoned) or NaN elements in the output"
    assert_matches(gather(out), gather(q), gather(k), gather(v), num, idx, scale, block_size, kv_lengths, kv_unit)


dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def cases(max_len, dims, block_sizes):
    return dict(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), heads=st.integers(1, 3),
                q_len=st.integers(1, max_len), kv_len=st.integers(1, max_len), dim=st.sampled_from(dims),
                dtype=dtypes, block_size=st.sampled_from(block_sizes), density=st.floats(0.0, 1.0),
                mask_batch=st.booleans(), mask_heads=st.booleans(), empty_rows=st.sampled_from([0.0, 0.3]),
                with_kv_lengths=st.booleans(), kv_aligned=st.booleans(),
                kv_unit=st.sampled_from([None, None, 1, 16, 64]))  # key blocks at token / 16 / 64 steps


@settings(max_examples=25, deadline=None)
@given(**cases(max_len=1100, dims=[16, 64, 128], block_sizes=[64, 128]))
def test_op_cpu_matches_float64_sdpa(**case):
    q, k, v, num, idx, scale, kvl = make_case(**case)
    out = torch.ops.vsparse.block_sparse_attention(q, k, v, num, idx, scale, case["block_size"], kvl,
                                                   kv_unit=case["kv_unit"])
    assert_matches(out, q, k, v, num, idx, scale, case["block_size"], kvl, case["kv_unit"])


@settings(max_examples=15, deadline=None)
@given(**cases(max_len=700, dims=[16, 64], block_sizes=[64, 128]), flags_batch=st.booleans())
def test_op_cpu_reorders_the_heads_it_is_told_to(flags_batch, **case):
    case["kv_len"], case["kv_aligned"] = case["q_len"], False  # reordered heads attend to themselves
    q, k, v, num, idx, scale, kvl = make_case(**case)
    order, flags = reordering(case["q_len"], case["batch"], case["heads"], torch.Generator().manual_seed(case["seed"]),
                              flags_batch)
    out = torch.ops.vsparse.block_sparse_attention(q, k, v, num, idx, scale, case["block_size"], kvl,
                                                   kv_unit=case["kv_unit"], token_order=order, reordered_heads=flags)
    assert_matches_reordered(out, q, k, v, num, idx, scale, case["block_size"], kvl, case["kv_unit"], order, flags)


@interpreted
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**cases(max_len=260, dims=[16, 64], block_sizes=[64, 128]), flags_batch=st.booleans())
def test_triton_kernel_reorders_the_heads_it_is_told_to(flags_batch, **case):
    """Interpreted: the reordered heads' q, k, v gathered, attended from the moved copies and scattered back; the
    other heads read in place. q, k, v come as transposes of [B, S, H, D], as diffusers hands them."""
    case["kv_len"], case["kv_aligned"] = case["q_len"], False
    q, k, v, num, idx, scale, kvl = make_case(**case)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    order, flags = reordering(case["q_len"], case["batch"], case["heads"], torch.Generator().manual_seed(case["seed"]),
                              flags_batch)
    out = torch.full_like(q, float("nan"))
    triton_block_sparse.triton_block_sparse_attention(q, k, v, num, idx, scale, case["block_size"], kvl, out=out,
                                                      kv_unit=case["kv_unit"], token_order=order,
                                                      reordered_heads=flags)
    assert_matches_reordered(out, q, k, v, num, idx, scale, case["block_size"], kvl, case["kv_unit"], order, flags)


@interpreted
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**cases(max_len=300, dims=[16, 64], block_sizes=[64, 128]))
def test_triton_kernel_matches_float64_sdpa(**case):
    """Interpreted on CPU (small sizes: every visited block costs milliseconds there)."""
    q, k, v, num, idx, scale, kvl = make_case(**case)
    out = torch.full_like(q, float("nan"))
    triton_block_sparse.triton_block_sparse_attention(q, k, v, num, idx, scale, case["block_size"], kvl, out=out,
                                                      kv_unit=case["kv_unit"])
    assert_matches(out, q, k, v, num, idx, scale, case["block_size"], kvl, case["kv_unit"])


@interpreted
def test_triton_kernel_reads_strided_heads_and_masks():
    """diffusers hands q/k/v as a transpose of [B, S, H, D]: strided heads, contiguous last dim. Masks may come
    expanded (stride 0) or as a non-contiguous view."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 150, 3, 64, generator=g).transpose(1, 2) for _ in range(3))
    num, idx = random_block_mask(1, 3, 150, 150, 64, 0.5, ragged=True, generator=g)
    num = num.expand(2, 3, 3)
    idx = idx.transpose(-1, -2).contiguous().transpose(-1, -2)
    out = torch.full((2, 3, 150, 64), float("nan"))
    triton_block_sparse.triton_block_sparse_attention(q, k, v, num, idx, 0.125, 64, out=out)
    assert_matches(out, q, k, v, num, idx, 0.125, 64, None)


@interpreted
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), q_len=st.integers(1, 300), block_size=st.sampled_from([64, 128]),
       density=st.floats(0.1, 1.0), shared=st.booleans())
def test_triton_kernel_follows_a_given_query_block_order(seed, q_len, block_size, density, shared):
    """`q_block_order` only schedules programs: any permutation per row (shared by heads or not) gives every query
    block its own output, none twice, none unwritten (the output is poisoned first)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, q_len, 16, generator=g) for _ in range(3))
    num, idx = random_block_mask(1, 2, q_len, q_len, block_size, density, ragged=True, generator=g)
    nq = block_mask.num_blocks(q_len, block_size)
    order = torch.stack([torch.randperm(nq, generator=g) for _ in range(1 if shared else 2)])[None].to(torch.int32)
    out = torch.full_like(q, float("nan"))
    triton_block_sparse.triton_block_sparse_attention(q, k, v, num, idx, 0.25, block_size, out=out,
                                                      q_block_order=order)
    assert_matches(out, q, k, v, num, idx, 0.25, block_size, None)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), heads=st.integers(1, 2), q_len=st.integers(1, 400),
       kv_len=st.integers(1, 400), block_size=st.sampled_from([64, 128]), density=st.floats(0.0, 1.0),
       mask_batch=st.booleans(), mask_heads=st.booleans())
def test_mask_format_agrees_with_flex_attention(seed, batch, heads, q_len, kv_len, block_size, density, mask_batch,
                                               mask_heads):
    """FlexAttention reads the same arrays through its own BlockMask (to_dense): same result as our op."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    q, k, v, num, idx, scale, _ = make_case(seed, batch, heads, q_len, kv_len, 64, torch.float64, block_size,
                                            density, mask_batch, mask_heads, 0.3, False)
    flex_mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block_size, seq_lengths=(q_len, kv_len))
    visit = flex_mask.to_dense().bool().expand(batch, heads, -1, -1)

    def blocks(b, h, q_idx, kv_idx):
        return visit[b, h, q_idx // block_size, kv_idx // block_size]

    flex_mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block_size, mask_mod=blocks,
                                         seq_lengths=(q_len, kv_len))
    flex_module = __import__("torch.nn.attention.flex_attention", fromlist=["_"])
    # Eager flex otherwise runs through Dynamo, recompiling for every drawn shape (seconds each).
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore")  # eager flex warns that it is slow
        patch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True, raising=False)
        theirs = flex_attention(q, k, v, block_mask=flex_mask, scale=scale)
    ours = bsa.reference_block_sparse_attention(q, k, v, num, idx, scale, block_size)
    assert torch.allclose(ours, theirs, atol=1e-12, rtol=0)


def test_banded_mask_under_op_matches_sdpa():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 1000, 128, generator=g) for _ in range(3))
    num, idx = banded_block_mask(1, 2, 1000, 1000, 128, 0.3)
    assert (num == 2).all()
    out = torch.ops.vsparse.block_sparse_attention(q, k, v, num, idx, 0.09, 128)
    assert_matches(out, q, k, v, num, idx, 0.09, 128, None)


def test_bad_inputs_raise_naming_the_problem():
    q = torch.randn(1, 2, 100, 64)
    num, idx = block_mask.full(1, 2, 100, 100, 64)
    op = torch.ops.vsparse.block_sparse_attention
    with pytest.raises(TypeError, match="dtype"):
        op(q.double(), q.double(), q.double(), num, idx, 0.1, 64)
    with pytest.raises(TypeError, match="share a dtype"):
        op(q, q.half(), q, num, idx, 0.1, 64)
    with pytest.raises(ValueError, match="head dim"):
        op(q[..., :48], q[..., :48], q[..., :48], num, idx, 0.1, 64)
    with pytest.raises(ValueError, match="contiguous last"):
        t = torch.randn(1, 2, 64, 100).transpose(-1, -2)
        op(t, t, t, num, idx, 0.1, 64)
    with pytest.raises(ValueError, match="block_size"):
        op(q, q, q, num, idx, 0.1, 32)
    with pytest.raises(ValueError, match="int32"):
        op(q, q, q, num.long(), idx, 0.1, 64)
    with pytest.raises(ValueError, match="query blocks"):
        op(q, q, q, num[..., :1], idx, 0.1, 64)
    bad = idx.clone()
    bad[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match="kv_indices values"):
        op(q, q, q, num, bad, 0.1, 64)
    with pytest.raises(ValueError, match="kv_lengths"):
        op(q, q, q, num, idx, 0.1, 64, torch.tensor([5, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="q_block_order must be int32"):
        op(q, q, q, num, idx, 0.1, 64, None, torch.tensor([[[0, 1]]]))
    with pytest.raises(ValueError, match="every query block once"):
        op(q, q, q, num, idx, 0.1, 64, None, torch.tensor([[[1, 1]]], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_unit must be a divisor of block_size=64"):
        op(q, q, q, num, idx, 0.1, 64, kv_unit=48)
    order, flags = torch.arange(100).flip(0), torch.tensor([[True, False]])
    with pytest.raises(ValueError, match="must be given together"):
        op(q, q, q, num, idx, 0.1, 64, token_order=order)
    with pytest.raises(ValueError, match=r"token_order must be int64 \[S=100\]"):
        op(q, q, q, num, idx, 0.1, 64, token_order=order.int(), reordered_heads=flags)
    with pytest.raises(ValueError, match=r"reordered_heads must be bool \[B=1\|1, H=2\]"):
        op(q, q, q, num, idx, 0.1, 64, token_order=order, reordered_heads=flags.T)
    with pytest.raises(ValueError, match="a permutation"):
        op(q, q, q, num, idx, 0.1, 64, token_order=order.clamp(max=98), reordered_heads=flags)
    short_num, short_idx = block_mask.full(1, 2, 100, 80, 64)
    with pytest.raises(ValueError, match="one length, got 100 and 80"):
        op(q, q[:, :, :80], q[:, :, :80], short_num, short_idx, 0.1, 64, token_order=order, reordered_heads=flags)
    starts = idx.clone()
    starts[0, 0, 0, 0] = 100  # a key block starting at token 100 of 100
    with pytest.raises(ValueError, match=r"kv_indices values must lie in \[0, 100\).*kv_unit=1"):
        op(q, q, q, num, starts, 0.1, 64, kv_unit=1)


def test_op_stays_one_opaque_call_under_compile_with_symbolic_shapes():
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._inductor.utils import run_and_get_code

    counter = CompileCounterWithBackend("inductor")

    def attend(q, k, v, num, idx):
        return torch.ops.vsparse.block_sparse_attention(q * 2, k, v, num, idx, 0.125, 64) + 1

    compiled = torch.compile(attend, backend=counter, dynamic=True, fullgraph=True)
    for q_len in (130, 200):
        g = torch.Generator().manual_seed(q_len)
        q, k, v = (torch.randn(1, 2, q_len, 64, generator=g) for _ in range(3))
        num, idx = random_block_mask(1, 2, q_len, q_len, 64, 0.5, generator=g)
        torch.testing.assert_close(compiled(q, k, v, num, idx), attend(q, k, v, num, idx))
    assert counter.frame_count == 1, "a second length recompiled: shapes did not stay symbolic"
    # Inductor's output code calls the op once, as an extern kernel (it neither inlines nor splits it).
    _, code = run_and_get_code(torch.compile(attend, dynamic=True, fullgraph=True), q, k, v, num, idx)
    assert sum(c.count("torch.ops.vsparse.block_sparse_attention.default(") for c in code) == 1


# ---- the same properties on a GPU (run there with TRITON_INTERPRET=0) ----

@pytest.fixture
def fixed_config():
    """One config per key instead of autotuning each of the many keys these tests draw."""
    triton_block_sparse.set_autotune(False)
    yield
    triton_block_sparse.set_autotune(True)


def poison_cuda_allocator(like: torch.Tensor, copies: int = 4):
    """Fill and free blocks of the output's size so the op's torch.empty most likely lands on NaNs."""
    blocks = [torch.full_like(like, float("nan")) for _ in range(copies)]
    del blocks


@pytest.mark.gpu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**cases(max_len=2100, dims=[64, 128], block_sizes=[64, 128]),
       config=st.sampled_from(triton_block_sparse.CONFIGS))
def test_gpu_op_matches_float64_sdpa(fixed_config, config, **case):
    q, k, v, num, idx, scale, kvl = make_case(**case, device="cuda")
    out = torch.full_like(q, float("nan"))
    block_m, block_n, warps, stages = config
    if case["block_size"] % block_m or case["block_size"] % block_n:
        block_m = block_n = 64  # tiles must divide the block
    if q.dtype == torch.float32:  # the one fp32 config (see _prune)
        block_m, block_n, warps, stages = 64, 64, 4, 2
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    triton_block_sparse.triton_block_sparse_attention(q, k, v, num, idx, scale, case["block_size"], kvl, config,
                                                      out=out, kv_unit=case["kv_unit"])
    assert_matches(out, q, k, v, num, idx, scale, case["block_size"], kvl, case["kv_unit"])
    poison_cuda_allocator(q)
    out = torch.ops.vsparse.block_sparse_attention(q, k, v, num, idx, scale, case["block_size"], kvl,
                                                   kv_unit=case["kv_unit"])
    assert_matches(out, q, k, v, num, idx, scale, case["block_size"], kvl, case["kv_unit"])


@pytest.mark.gpu
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**cases(max_len=2100, dims=[64, 128], block_sizes=[64, 128]), flags_batch=st.booleans())
def test_gpu_op_reorders_the_heads_it_is_told_to(fixed_config, flags_batch, **case):
    """Twice: the first call launches through Triton, the second through the recorded direct launch."""
    case["kv_len"], case["kv_aligned"] = case["q_len"], False
    q, k, v, num, idx, scale, kvl = make_case(**case, device="cuda")
    order, flags = reordering(case["q_len"], case["batch"], case["heads"], torch.Generator().manual_seed(case["seed"]),
                              flags_batch)
    order, flags = order.cuda(), flags.cuda()
    for _ in range(2):
        poison_cuda_allocator(q)
        out = torch.ops.vsparse.block_sparse_attention(q, k, v, num, idx, scale, case["block_size"], kvl,
                                                       kv_unit=case["kv_unit"], token_order=order,
                                                       reordered_heads=flags)
        assert_matches_reordered(out, q, k, v, num, idx, scale, case["block_size"], kvl, case["kv_unit"], order,
                                 flags)


@pytest.mark.gpu
def test_gpu_autotuned_kernel_on_a_wan_like_shape():
    """Autotuning (once for this key) and then a large ragged sequence, checked against the pure-torch path."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 8190, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    for density in (1.0, 0.1):
        num, idx = random_block_mask(1, 4, 8190, 8190, 128, density, generator=g, device="cuda")
        out = torch.ops.vsparse.block_sparse_attention(q, k, v, num, idx, 128 ** -0.5, 128)
        ref = bsa.reference_block_sparse_attention(q.float(), k.float(), v.float(), num, idx, 128 ** -0.5, 128)
        assert rel(out, ref.double()) < 1e-2
    assert triton_block_sparse.tuned_config(128, 128, torch.bfloat16) is not None


def _transposed_case(device="cpu", seed=5):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, 200, 3, 64, generator=g, device=device).transpose(1, 2) for _ in range(3))
    num, idx = random_block_mask(1, 3, 200, 200, 64, 0.6, ragged=True, generator=g, device=device)
    return q, k, v, num, idx


def test_op_output_is_laid_out_as_b_s_h_d_whatever_q_is():
    """The output's memory order is [B, S, H, D] (the caller's transpose back is a view) and follows from the shape
    alone: Inductor may pass q in other strides than the fake kernel saw (a compiled layer failed its stride
    assertion when the output followed q's strides), so fake and real must agree for any q."""
    q, k, v, num, idx = _transposed_case()
    for query in (q, q.contiguous()):
        out = torch.ops.vsparse.block_sparse_attention(query, k, v, num, idx, 0.125, 64)
        assert out.transpose(1, 2).is_contiguous()
        assert_matches(out, query, k, v, num, idx, 0.125, 64, None)
        with torch._subclasses.FakeTensorMode() as mode:
            fake = torch.ops.vsparse.block_sparse_attention(*(mode.from_tensor(t) for t in (query, k, v, num, idx)),
                                                            0.125, 64)
        assert fake.stride() == out.stride()


@pytest.mark.gpu
def test_gpu_op_output_layout_first_and_repeated_calls():
    """The first call (checks, Triton's launch) and a repeat (the recorded direct launch) both return the output in
    [B, S, H, D] memory order (here q's own)."""
    q, k, v, num, idx = (t.cuda() for t in _transposed_case())
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    for _ in range(2):
        poison_cuda_allocator(q)
        out = torch.ops.vsparse.block_sparse_attention(q, k, v, num, idx, 0.125, 64)
        assert out.stride() == q.stride()
        assert_matches(out, q, k, v, num, idx, 0.125, 64, None)
