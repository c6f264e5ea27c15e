"""Token permutation: the op, its Triton kernel (interpreted on CPU, compiled on a GPU), the inverse and the index
factories for Sparse VideoGen's and DraftAttention's layouts."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dit_compiler.kernels as kernels
from dit_compiler.kernels.triton_permute import triton_permute_tokens

# Tests that run Triton kernels on CPU tensors through the interpreter (GPU runs set TRITON_INTERPRET=0).
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def draw_case(seed, batch, heads, seq_len, dim, per_head, dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, seq_len, dim, generator=g).to(dtype).to(device)
    shape = (heads, seq_len) if per_head else (seq_len,)
    index = torch.argsort(torch.rand(shape, generator=g), dim=-1).to(device)
    return x, index


def expected(x, index):
    """Row by row, straight from the definition out[b, h, s] = x[b, h, index[(h,) s]]."""
    out = torch.empty_like(x)
    for h in range(x.shape[1]):
        rows = index[h] if index.dim() == 2 else index
        out[:, h] = x[:, h, rows]
    return out


case = dict(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), heads=st.integers(1, 3),
            seq_len=st.integers(1, 300), dim=st.sampled_from([16, 48, 64, 128]), per_head=st.booleans(),
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
    with pytest.raises(ValueError, match=r"\[S=40\] or \[H=3, S=40\]"):
        torch.ops.vsparse.permute_tokens(x, torch.randperm(39))


def test_frame_to_position_major_groups_each_position_across_frames():
    frames, height, width, text = 3, 2, 4, 5
    index = kernels.frame_to_position_major(frames, height, width, text_after=text)
    tokens = torch.arange(frames * height * width + text)
    moved = tokens[index]
    video = moved[: frames * height * width].view(height * width, frames)
    # Row p holds position p in frames 0, 1, 2 (frame-major ids p, p + H*W, p + 2*H*W); text stays at the end.
    assert torch.equal(video, torch.arange(height * width)[:, None] + height * width * torch.arange(frames))
    assert torch.equal(moved[-text:], tokens[-text:])
    assert torch.equal(tokens[index][kernels.invert_permutation(index)], tokens)


def test_window_contiguous_puts_each_window_together():
    frames, height, width, window, text = 4, 4, 6, (2, 2, 3), 3
    index = kernels.window_contiguous(frames, height, width, window, text_before=text)
    assert torch.equal(index[:text], torch.arange(text))
    coords = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width),
                                        indexing="ij"), -1).view(-1, 3)
    moved = coords[index[text:] - text].view(-1, 2 * 2 * 3, 3)
    window_of = moved // torch.tensor(window)
    assert (window_of == window_of[:, :1]).all(), "a run of 12 tokens spans two windows"
    assert len({tuple(w) for w in window_of[:, 0].tolist()}) == moved.shape[0]
    with pytest.raises(ValueError, match="divide"):
        kernels.window_contiguous(frames, height, 5, window)


def test_compiles_as_one_opaque_call():
    def layout(x, index):
        return torch.ops.vsparse.permute_tokens(x + 1, index) * 2

    x, index = draw_case(0, 1, 2, 50, 64, True, torch.float32)
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
