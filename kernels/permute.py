"""`torch.ops.vsparse.permute_tokens`: reorder [B, H, S, D] along S by an int64 index, out[b, h, s, :] =
x[b, h, index[s], :] with the index shared by all heads ([S]), per head ([H, S]) or per batch element and head
([B, H, S]). The output is contiguous. The inverse reordering is the same op with
`dit_compiler.kernels.block_mask.invert_permutation(index)`.

Why an op rather than `torch.gather` in the graph: a per-head gather that Inductor fuses with the kernels producing x
recomputes their pointwise tail (for q and k: RoPE) at the gathered rows, where this op reads x once as it was
written. CUDA runs the Triton gather in triton_permute.py (imported on first use, so CPU-only installs need no
Triton); CPU runs torch.gather. Registered as the other vsparse ops are (kernels/registration.py).
"""
from __future__ import annotations

import torch

from dit_compiler.kernels.attention_op import check_bhsd
from dit_compiler.kernels.registration import register_op

SCHEMA = "permute_tokens(Tensor x, Tensor index) -> Tensor"


def check_inputs(x: torch.Tensor, index: torch.Tensor) -> None:
    """Raise TypeError / ValueError naming what is wrong; reads metadata only."""
    if not isinstance(x, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise TypeError("x and index must be Tensors")
    check_bhsd("x", x)
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")
    batch, heads, seq_len = x.shape[:3]
    if tuple(index.shape) not in ((seq_len,), (heads, seq_len), (batch, heads, seq_len)):
        raise ValueError(f"index must be [S={seq_len}], [H={heads}, S={seq_len}] or [B={batch}, H={heads}, "
                         f"S={seq_len}], got {tuple(index.shape)}")
    if index.device != x.device:
        raise ValueError(f"index is on {index.device}, x on {x.device}")


def reference_permute_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pure-torch gather along S."""
    full = index.expand(x.shape[:3])
    return torch.gather(x, 2, full[..., None].expand(x.shape)).contiguous()


def _cpu_kernel(x, index):
    check_inputs(x, index)
    return reference_permute_tokens(x, index)


_triton = None  # triton_permute, imported on the first CUDA call


def _cuda_kernel(x, index):
    global _triton
    if _triton is None:
        from dit_compiler.kernels import triton_permute as _triton
    check_inputs(x, index)
    return _triton.triton_permute_tokens(x, index)


def _fake_kernel(x, index):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# No autograd kernel: a reordering the planners make of detached or inference-mode inputs (PyTorch's fallback raises
# at backward if an input requires grad).
_lib = register_op(SCHEMA, cpu=_cpu_kernel, cuda=_cuda_kernel, fake=_fake_kernel)
permute_tokens = torch.ops.vsparse.permute_tokens
