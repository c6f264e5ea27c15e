import torch
from hypothesis import given, settings, strategies as st

from dit_compiler.kernels import block_mask


@settings(max_examples=30, deadline=None)
@given(nq=st.integers(1, 6), nkv=st.integers(1, 7), heads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_block_bool_round_trip(nq, nkv, heads, seed):
    g = torch.Generator().manual_seed(seed)
    visit = torch.rand(1, heads, nq, nkv, generator=g) < 0.5
    num, idx = block_mask.from_block_bool(visit)
    assert num.dtype == idx.dtype == torch.int32
    assert torch.equal(block_mask.to_block_bool(num, idx), visit)
    # Listed ids come first and ascend, as FlexAttention's from_kv_blocks reads them.
    for h in range(heads):
        for i in range(nq):
            listed = idx[0, h, i, : num[0, h, i]].tolist()
            assert listed == sorted(torch.nonzero(visit[0, h, i]).flatten().tolist())


def test_token_mask_cuts_ragged_tails():
    num, idx = block_mask.from_block_bool(torch.tensor([[[[True, False], [False, True]]]]))
    mask = block_mask.to_token_mask(num, idx, q_len=5, kv_len=7, block_size=4)
    assert mask.shape == (1, 1, 5, 7)
    assert mask[0, 0, :4, :4].all() and not mask[0, 0, :4, 4:].any()
    assert mask[0, 0, 4:, 4:].all() and not mask[0, 0, 4:, :4].any()


@settings(max_examples=30, deadline=None)
@given(q_len=st.integers(1, 40), kv_len=st.integers(1, 40), block_size=st.sampled_from([4, 8]),
       unit=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_token_mask_of_key_blocks_at_unit_starts(q_len, kv_len, block_size, unit, seed):
    """Entry i of a row is the key block [i*unit, i*unit + block_size) cut at kv_len: checked token by token."""
    g = torch.Generator().manual_seed(seed)
    nq, nkv = block_mask.num_blocks(q_len, block_size), block_mask.num_blocks(kv_len, block_size)
    num = torch.randint(0, nkv + 1, (1, 2, nq), generator=g, dtype=torch.int32)
    idx = torch.randint(0, block_mask.num_blocks(kv_len, unit), (1, 2, nq, nkv), generator=g, dtype=torch.int32)
    mask = block_mask.to_token_mask(num, idx, q_len, kv_len, block_size, kv_unit=unit)
    expected = torch.zeros(1, 2, q_len, kv_len, dtype=torch.bool)
    for h in range(2):
        for row in range(q_len):
            for entry in idx[0, h, row // block_size, :num[0, h, row // block_size]].tolist():
                expected[0, h, row, entry * unit:entry * unit + block_size] = True
    assert torch.equal(mask, expected)


def test_validate_names_the_problem():
    num, idx = block_mask.full(1, 2, 100, 100, 64)
    block_mask.validate(num, idx, 1, 2, 100, 100, 64)
    import pytest

    with pytest.raises(ValueError, match="int32"):
        block_mask.validate(num.long(), idx, 1, 2, 100, 100, 64)
    with pytest.raises(ValueError, match="query blocks"):
        block_mask.validate(num, idx, 1, 2, 200, 100, 64)
    bad = idx.clone()
    bad[0, 0, 0, 0] = 5
    with pytest.raises(ValueError, match="kv_indices values"):
        block_mask.validate(num, bad, 1, 2, 100, 100, 64)


def test_counts_per_head_over_ids_shared_by_heads():
    """kv_num_blocks [1, H, nq] with kv_indices [1, 1, nq, nkv] (each may broadcast): every head reads its own count
    (validate raised on this valid mask; token_visits and to_block_bool gave one head's answer for all)."""
    num = torch.tensor([1, 2, 2, 1], dtype=torch.int32).view(1, 2, 2)
    idx = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32).view(1, 1, 2, 2)
    block_mask.validate(num, idx, 1, 2, 100, 100, 64)
    assert block_mask.token_visits(num, idx, 100, 64).sum(-1).tolist() == [[[64, 100], [100, 36]]]
    assert block_mask.to_block_bool(num, idx).tolist() == [[[[True, False], [True, True]],
                                                            [[True, True], [False, True]]]]


def test_block_picture_of_token_starts_keeps_listed_blocks_over_unlisted_entries():
    """With kv_unit, an unlisted entry (here 0, block 0) must not clear the listed block 0 it lands on."""
    num = torch.tensor([2], dtype=torch.int32).view(1, 1, 1)
    idx = torch.tensor([10, 70, 0], dtype=torch.int32).view(1, 1, 1, 3)  # starts 10 and 70: blocks 0 and 1 of 64
    assert block_mask.to_block_bool(num, idx, 64, kv_unit=1).tolist() == [[[[True, True, False]]]]
