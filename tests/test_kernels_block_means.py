"""Block means in a token order: the op (pure-torch path on CPU), its Triton kernel (interpreted on CPU, compiled on a
GPU), against the float64 definition."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dit_compiler.kernels as kernels
from dit_compiler.kernels.triton_block_means import triton_block_means

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def draw_case(seed, batch, heads, seq_len, dim, dtype, order_kind, device="cpu"):
    """x [B, H, S, D] (random, never zeros) and an order: a random permutation, random ids with repeats, or None
    (the tokens as they are)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, heads, seq_len, dim, generator=g) + 0.5).to(dtype).to(device)
    if order_kind == "none":
        return x, None
    order = torch.randperm(seq_len, generator=g) if order_kind == "permutation" else \
        torch.randint(0, seq_len, (seq_len,), generator=g)
    return x, order.to(device)


def definition(x, order, block_size):
    """[B, H, n, D] float64, block by block straight from the definition."""
    seq_len = x.shape[2]
    order = torch.arange(seq_len) if order is None else order
    blocks = [x[:, :, order[start:start + block_size]].double().mean(2) for start in range(0, seq_len, block_size)]
    return torch.stack(blocks, 2)


def assert_close_to_definition(out, x, order, block_size):
    exact = definition(x, order, block_size)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert not out.isnan().any(), "unwritten (poisoned) elements"
    # Both sum in float32: the error is float32 rounding of sums of at most a few hundred terms.
    torch.testing.assert_close(out.double(), exact.to(out.device), rtol=1e-5, atol=1e-5)


case = dict(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), heads=st.integers(1, 3),
            seq_len=st.integers(1, 300), dim=st.sampled_from([16, 48, 64, 128]),
            dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
            order_kind=st.sampled_from(["permutation", "repeats", "none"]),
            block_size=st.sampled_from([1, 16, 64, 100, 128, 200]))


@settings(max_examples=30, deadline=None)
@given(**case)
def test_op_cpu_matches_the_definition(block_size, **drawn):
    x, order = draw_case(**drawn)
    assert_close_to_definition(torch.ops.vsparse.block_means(x, order, block_size), x, order, block_size)


@interpreted
@settings(max_examples=20, deadline=None)
@given(**case)
def test_triton_kernel_matches_the_definition(block_size, **drawn):
    x, order = draw_case(**drawn)
    out = torch.full((x.shape[0], x.shape[1], -(-x.shape[2] // block_size), x.shape[3]), float("nan"))
    triton_block_means(x, order, block_size, out=out)
    assert_close_to_definition(out, x, order, block_size)


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(**dict(case, seq_len=st.integers(1, 5000)))
def test_gpu_kernel_matches_the_definition(block_size, **drawn):
    x, order = draw_case(**drawn, device="cuda")
    out = torch.full((x.shape[0], x.shape[1], -(-x.shape[2] // block_size), x.shape[3]), float("nan"), device="cuda")
    triton_block_means(x, order, block_size, out=out)
    assert_close_to_definition(out, x, order, block_size)


def test_op_reads_strided_heads_and_checks_inputs():
    x = torch.randn(2, 40, 3, 64).transpose(1, 2)  # [B, S, H, D] storage read through a transposed view
    order = torch.randperm(40)
    assert_close_to_definition(torch.ops.vsparse.block_means(x, order, 16), x, order, 16)
    with pytest.raises(ValueError, match=r"order must be int64 \[S=40\]"):
        torch.ops.vsparse.block_means(x, order.int(), 16)
    with pytest.raises(ValueError, match=r"order must be int64 \[S=40\]"):
        torch.ops.vsparse.block_means(x, order[:-1], 16)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        torch.ops.vsparse.block_means(x, order, 0)
    with pytest.raises(TypeError, match="floating point"):
        torch.ops.vsparse.block_means(x.int(), order, 16)
    with pytest.raises(ValueError, match=r"\[B, H, S, D\]"):
        torch.ops.vsparse.block_means(x[0], order, 16)


def test_compiles_as_one_opaque_call_with_symbolic_shapes():
    def means(x, order):
        return torch.ops.vsparse.block_means(x * 2, order, 16) + 1

    compiled = torch.compile(means, dynamic=True, fullgraph=True)
    for seq_len in (50, 70):
        for order_kind in ("permutation", "none"):
            x, order = draw_case(0, 1, 2, seq_len, 16, torch.float32, order_kind)
            torch.testing.assert_close(compiled(x, order), means(x, order))


def test_result_is_a_constant_to_autograd():
    """The means only rank key blocks: inputs that require grad give an output without grad_fn."""
    x = torch.randn(1, 2, 40, 16, requires_grad=True)
    out = kernels.block_means(x, torch.randperm(40), 16)
    assert not out.requires_grad and out.grad_fn is None
