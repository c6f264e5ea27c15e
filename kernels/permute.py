"""`torch.ops.vsparse.permute_tokens`: reorder [B, H, S, D] along S by an int64 index, out[..., s, :] =
x[..., index[s], :], with the index shared by all heads ([S]) or per head ([H, S]). The inverse reordering is the
same op with `dit_compiler.kernels.block_mask.invert_permutation(index)`. CUDA runs the Triton gather in triton_permute.py (imported on first
use, so CPU-only installs need no Triton); CPU runs torch.gather.

The indices themselves come from the planners: `dit_compiler.passes.planners.svg.position_major_permutation` (Sparse
VideoGen's temporal heads) and `dit_compiler.passes.planners.draft.window_permutation` (DraftAttention's windows).
"""
from __future__ import annotations

import torch

from dit_compiler.kernels.attention_op import check_bhsd


def _check(x: torch.Tensor, index: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise TypeError("x and index must be Tensors")
    check_bhsd("x", x)
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")
    heads, seq_len = x.shape[1], x.shape[2]
    if not (tuple(index.shape) == (seq_len,) or tuple(index.shape) == (heads, seq_len)):
        raise ValueError(f"index must be [S={seq_len}] or [H={heads}, S={seq_len}], got {tuple(index.shape)}")
    if index.device != x.device:
        raise ValueError(f"index is on {index.device}, x on {x.device}")


def reference_permute_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pure-torch gather along S."""
    batch, heads, seq_len, dim = x.shape
    full = index.expand(heads, seq_len)
    return torch.gather(x, 2, full[None, :, :, None].expand(batch, heads, seq_len, dim)).contiguous()


@torch.library.custom_op("vsparse::permute_tokens", mutates_args=())
def permute_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[b, h, s] = x[b, h, index[s]] (index [S]) or x[b, h, index[h, s]] (index [H, S])."""
    _check(x, index)
    if x.device.type == "cuda":
        from dit_compiler.kernels.triton_permute import triton_permute_tokens

        return triton_permute_tokens(x, index)
    return reference_permute_tokens(x, index)


@permute_tokens.register_fake
def _(x, index):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
