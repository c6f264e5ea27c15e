"""`torch.ops.vsparse.permute_tokens`: reorder [B, H, S, D] along S by an int64 index, out[..., s, :] =
x[..., index[s], :], with the index shared by all heads ([S]) or per head ([H, S]). The inverse reordering is the
same op with `invert_permutation(index)`. CUDA runs the Triton gather in triton_permute.py (imported on first
use, so CPU-only installs need no Triton); CPU runs torch.gather.

Index factories for the two layouts the planners use; text tokens (before or after the video) keep their places:
- `frame_to_position_major`: Sparse VideoGen's temporal heads, (frame, row, col) -> (row, col, frame), so one spatial
  position's tokens across all frames are adjacent;
- `window_contiguous`: DraftAttention's windows, each (wf, wh, ww) window of the token grid made contiguous.
"""
from __future__ import annotations

import torch


def _check(x: torch.Tensor, index: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise TypeError("x and index must be Tensors")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, S, D], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim, got strides {x.stride()}")
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


def invert_permutation(index: torch.Tensor) -> torch.Tensor:
    """inverse[..., index[..., s]] = s, so permute_tokens(permute_tokens(x, index), inverse) == x."""
    positions = torch.arange(index.shape[-1], device=index.device).expand_as(index)
    return torch.empty_like(index).scatter_(-1, index, positions)


def _with_text(video_order: torch.Tensor, text_before: int, text_after: int) -> torch.Tensor:
    video = video_order + text_before
    head = torch.arange(text_before)
    tail = torch.arange(text_after) + text_before + video_order.numel()
    return torch.cat([head, video, tail])


def frame_to_position_major(frames: int, height: int, width: int, text_before: int = 0,
                            text_after: int = 0) -> torch.Tensor:
    """int64 [S] gather index: video tokens stored (frame, row, col) come out (row, col, frame)."""
    grid = torch.arange(frames * height * width).view(frames, height * width)
    return _with_text(grid.t().reshape(-1), text_before, text_after)


def window_contiguous(frames: int, height: int, width: int, window: tuple[int, int, int], text_before: int = 0,
                      text_after: int = 0) -> torch.Tensor:
    """int64 [S] gather index: tokens of each (wf, wh, ww) window adjacent, windows in (frame, row, col) order.
    Each window size must divide its grid dimension."""
    wf, wh, ww = window
    if frames % wf or height % wh or width % ww:
        raise ValueError(f"window {window} must divide the token grid {(frames, height, width)}")
    grid = torch.arange(frames * height * width).view(frames // wf, wf, height // wh, wh, width // ww, ww)
    return _with_text(grid.permute(0, 2, 4, 1, 3, 5).reshape(-1), text_before, text_after)
