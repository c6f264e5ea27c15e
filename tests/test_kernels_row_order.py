"""descending_order: the op (ATen on CPU) and the Triton kernel (interpreted on CPU, compiled on a GPU) against a
stable descending argsort, on rows with many ties, NaN, signed zeros and infinities."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dit_compiler.kernels  # noqa: F401  registers torch.ops.vsparse
from dit_compiler.kernels import row_order

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def make_rows(seed, shape, levels, specials, dtype=torch.float32, device="cpu"):
    """Random rows; `levels` values make many ties (None: distinct with probability 1); `specials` mixes in NaN,
    +-inf, +-0.0 and the largest float (the planners' forced blocks all hold it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) if levels is None else torch.randint(0, levels, shape, generator=g).float()
    if specials and x.numel():
        pool = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, torch.finfo(torch.float32).max])
        pick = torch.rand(shape, generator=g) < 0.3
        x = torch.where(pick, pool[torch.randint(0, len(pool), shape, generator=g)], x)
    return x.to(dtype).to(device)


def assert_descending_order(x, order):
    """The contract checked without argsort: int32, every row a permutation, and along it NaN first, then values
    non-increasing, equal values (-0.0 and 0.0 too) by ascending id."""
    assert order.dtype == torch.int32 and order.shape == x.shape
    ids = order.long()
    assert torch.equal(ids.sort(-1).values, torch.arange(x.shape[-1]).expand_as(ids).to(ids.device))
    values = torch.gather(x, -1, ids).double()
    nan = values.isnan()
    values = values.nan_to_num(nan=0.0)
    head, tail = (slice(None, -1), slice(1, None))
    first_nan, second_nan = nan[..., head], nan[..., tail]
    first, second = values[..., head], values[..., tail]
    ahead = (first_nan & ~second_nan) | ((first_nan == second_nan) & (
        (first > second) | ((first == second) & (ids[..., head] < ids[..., tail]))))
    assert ahead.all(), "entries out of order"


shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2).flatmap(
    lambda lead: st.integers(1, 300).map(lambda n: (*lead, n)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, levels=st.sampled_from([2, 5, None]), specials=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.int32, torch.int64]))
def test_op_cpu_is_a_stable_descending_argsort(seed, shape, levels, specials, dtype):
    x = make_rows(seed, shape, levels, specials and dtype.is_floating_point, dtype)
    assert_descending_order(x, torch.ops.vsparse.descending_order(x))


@interpreted
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, levels=st.sampled_from([2, 5, None]), specials=st.booleans())
def test_triton_kernel_interpreted_matches_argsort(seed, shape, levels, specials):
    from dit_compiler.kernels.triton_row_order import triton_descending_order

    x = make_rows(seed, shape, levels, specials)
    out = triton_descending_order(x)
    assert_descending_order(x, out)
    assert torch.equal(out, row_order.reference_descending_order(x))


@interpreted
def test_triton_kernel_reads_strided_rows_and_writes_every_id():
    from dit_compiler.kernels.triton_row_order import triton_descending_order

    x = make_rows(1, (6, 40), 3, True)[:, ::2]  # strided rows of a power-of-two-padded length (20 -> 32)
    assert torch.equal(triton_descending_order(x), row_order.reference_descending_order(x))


def test_nan_ranks_first_and_zeros_tie():
    x = torch.tensor([[1.0, float("nan"), -0.0, 2.0, 0.0, -float("inf")]])
    assert torch.ops.vsparse.descending_order(x).tolist() == [[1, 3, 0, 2, 4, 5]]


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="at least one dim"):
        torch.ops.vsparse.descending_order(torch.tensor(1.0))
    with pytest.raises(TypeError, match="real"):
        torch.ops.vsparse.descending_order(torch.zeros(3, dtype=torch.bool))


def test_compiles_with_symbolic_rows():
    fn = torch.compile(lambda x: torch.ops.vsparse.descending_order(x * 2), fullgraph=True, dynamic=True)
    for n in (7, 12):
        x = make_rows(n, (3, n), 4, False)
        assert torch.equal(fn(x), row_order.reference_descending_order(x))


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, levels=st.sampled_from([2, 5, None]), specials=st.booleans(),
       n=st.sampled_from([None, 256, 1000, row_order.TRITON_MAX_ROW, row_order.TRITON_MAX_ROW + 1]))
def test_op_on_gpu_matches_argsort(seed, shape, levels, specials, n):
    if n is not None:
        shape = (*shape[:-1], n)
    x = make_rows(seed, shape, levels, specials, device="cuda")
    out = torch.ops.vsparse.descending_order(x)
    assert_descending_order(x, out)
    assert torch.equal(out, row_order.reference_descending_order(x))
