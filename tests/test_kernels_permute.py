"""Token permutation: the op, its Triton kernel (interpreted on CPU, compiled on a GPU), the inverse and the index
factories for Sparse VideoGen's and DraftAttention's layouts."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dit_compiler.kernels as kernels
from dit_compiler.kernels.triton_permute import move_tokens, triton_permute_tokens

# Tests that run Triton kernels on CPU tensors through the interpreter (GPU runs set TRITON_INTERPRET=0).
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def draw_case(seed, batch, heads, seq_len, dim, index_dims, dtype, device="cpu"):
    """x [B, H, S, D] and a random permutation index of `index_dims` dims: [S], [H, S] or [B, H, S]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, seq_len, dim, generator=g).to(dtype).to(device)
    shape = (batch, heads, seq_len)[3 - index_dims:]
    index = torch.argsort(torch.rand(shape, generator=g), dim=-1).to(device)
    return x, index


def expected(x, index):
    """Row by row, straight from the definition out[b, h, s] = x[b, h, index[((b,) h,) s]]."""
    out, rows = torch.empty_like(x), index.expand(x.shape[:3])  # a missing leading dim is shared
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            out[b, h] = x[b, h, rows[b, h]]
    return out


case = dict(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), heads=st.integers(1, 3),
            seq_len=st.integers(1, 300), dim=st.sampled_from([16, 48, 64, 128, 320, 1536]),
            index_dims=st.sampled_from([1, 2, 3]),
            dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))


@interpreted
@settings(max_examples=25, deadline=None)
@given(**case)
def test_triton_gather_and_inverse(**drawn):
    x, index = draw_case(**drawn)
    out = torch.full_like(x, float("nan"))
    triton_permute_tokens(x, index, out=out)
    assert torch.equal(out, expected(x, index))
    back = torch.full_like(x, float("nan"))
    triton_permute_tokens(out, kernels.invert_permutation(index), out=back)
    assert torch.equal(back, x)


def moves_case(seed, batch, heads, seq_len, dim, tensors, strided, flag_batch, device="cpu"):
    """`tensors` inputs [B, H, S, D] (the `strided` ones transposes of [B, S, H, D], as diffusers lays q, k, v out),
    one order [S] and head flags [B|1, H] with at least one set and, where H > 1, one clear."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, seq_len, heads, dim, generator=g).transpose(1, 2) if i in strided else
          torch.randn(batch, heads, seq_len, dim, generator=g) for i in range(tensors)]
    flags = torch.rand(batch if flag_batch else 1, heads, generator=g) < 0.5
    flags[:, 0], flags[:, -1] = True, heads == 1
    return [x.to(device) for x in xs], torch.randperm(seq_len, generator=g).to(device), flags.to(device)


def expected_moves(x, order, flags, scatter, out):
    """Each flagged head's rows gathered into `order` (or scattered out of it); the others' rows left as in out."""
    want = out.clone()
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            if flags[min(b, flags.shape[0] - 1), h]:
                if scatter:
                    want[b, h, order] = x[b, h]
                else:
                    want[b, h] = x[b, h, order]
    return want


moves = dict(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), heads=st.integers(1, 3),
             seq_len=st.integers(1, 200), dim=st.sampled_from([16, 64, 128]), tensors=st.integers(1, 4),
             strided=st.sets(st.integers(0, 3)), flag_batch=st.booleans(), scatter=st.booleans())


@interpreted
@settings(max_examples=20, deadline=None)
@given(**moves)
def test_triton_moves_several_tensors_of_the_flagged_heads(scatter, **drawn):
    """q, k and v in one launch where their strides agree, in separate ones where not, more than three in two;
    rows of heads left unflagged are neither read nor written (the outputs are poisoned)."""
    xs, order, flags = moves_case(**drawn)
    outs = [torch.full(x.shape, float("nan")) for x in xs]
    launches = move_tokens(xs, order, outs, flags, scatter=scatter)
    assert len(launches) == sum((len(group) + 2) // 3 for group in (
        [i for i in range(len(xs)) if (i in drawn["strided"]) == strided] for strided in (False, True)) if group)
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out, expected_moves(x, order, flags, scatter, torch.full(x.shape, float("nan"))),
                                   rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@settings(max_examples=20, deadline=None)
@given(**moves)
def test_gpu_recorded_moves_repeat_the_first_launch(scatter, **drawn):
    """The compiled launches `move_tokens` returns, called with another call's tensors of the same layout, move
    those (the block-sparse op's direct launch replays them)."""
    xs, order, flags = moves_case(**drawn, device="cuda")
    # Outputs laid out as the replay's (contiguous): a launch is recorded for its tensors' strides.
    launches = move_tokens(xs, order, [torch.empty(x.shape, device="cuda") for x in xs], flags, scatter=scatter)
    again, order2, _ = moves_case(**{**drawn, "seed": drawn["seed"] + 1}, device="cuda")
    outs = [torch.full(x.shape, float("nan"), device="cuda") for x in again]
    for launch in launches:
        launch(again, order2, outs, flags)
    for x, out in zip(again, outs):
        torch.testing.assert_close(out, expected_moves(x, order2, flags, scatter, torch.full_like(x, float("nan"))),
                                   rtol=0, atol=0, equal_nan=True)


@settings(max_examples=25, deadline=None)
@given(**case)
def test_op_cpu_matches_definition(**drawn):
    x, index = draw_case(**drawn)
    assert torch.equal(torch.ops.vsparse.permute_tokens(x, index), expected(x, index))


def test_op_reads_strided_heads_and_checks_inputs():
    x = torch.randn(2, 40, 3, 64).transpose(1, 2)
    index = torch.randperm(40)
    assert torch.equal(torch.ops.vsparse.permute_tokens(x, index), expected(x, index))
    with pytest.raises(TypeError, match="int64"):
        torch.ops.vsparse.permute_tokens(x, index.int())
    with pytest.raises(ValueError, match=r"\[S=40\], \[H=3, S=40\] or \[B=2, H=3, S=40\]"):
        torch.ops.vsparse.permute_tokens(x, torch.randperm(39))
    with pytest.raises(ValueError, match=r"got \(1, 3, 40\)"):  # a batch dim must be B, not broadcast
        torch.ops.vsparse.permute_tokens(x, torch.randperm(40).expand(1, 3, 40))


def test_compiles_as_one_opaque_call():
    def layout(x, index):
        return torch.ops.vsparse.permute_tokens(x + 1, index) * 2

    x, index = draw_case(0, 1, 2, 50, 64, 2, torch.float32)
    compiled = torch.compile(layout, dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(x, index), layout(x, index))


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(**{**case, "seq_len": st.integers(1, 5000)})
def test_gpu_gather_matches_definition(**drawn):
    x, index = draw_case(**drawn, device="cuda")
    blocks = [torch.full_like(x, float("nan")) for _ in range(4)]  # poison what the op's empty() will reuse
    del blocks
    out = torch.ops.vsparse.permute_tokens(x, index)
    assert torch.equal(out, expected(x, index))
