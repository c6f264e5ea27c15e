"""CPU µs per call of `torch.ops.vsparse.block_sparse_attention`'s host path on a machine without a GPU: the
dispatcher, checks, launch key and launch preparation, with Triton's launch replaced by a no-op (CPU tensors take the
CUDA kernel's path). What this leaves out needs a GPU: Triton's launcher itself (TMA descriptor encoding,
cuLaunchKernel), CUDA's torch.empty, and on the normal path Triton's JITFunction.run / autotuner binding.
benchmarks/site_breakdown.py --host-only measures the whole call on a GPU.

  normal path   the op as a torch.library.custom_op (before) or the Library op with direct launches off: checks,
                descriptors and the launch through `kernel[grid](...)` (stubbed) every call
  direct path   the Library op after the first call for a key: launch key, recorded launch; also as svg calls
                it (a token order and reordered heads: the attention launch and two moves, their q, k and v
                gathered and their output scattered back). The stub has no Triton launcher to take apart, so the
                recorded launches take triton_launch.Relaunch's runner path (descriptors rebuilt per call), not
                the C launch a GPU gets

    python benchmarks/op_host_cost_cpu.py
"""
from __future__ import annotations

import argparse
import json
import time
import types
from typing import Optional

import torch

import dit_compiler.kernels  # noqa: F401  registers torch.ops.vsparse
from dit_compiler.kernels import attention_op, block_mask, triton_block_sparse as tbs, triton_permute


class _StubKernel:
    """`kernel[grid](...)` and `compiled[grid](...)` that launch nothing; returns itself as the compiled kernel."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return self


def us_per_call(fn, calls: int) -> float:
    for _ in range(min(500, calls)):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(calls: int = 20000) -> dict:
    # As on CUDA: the checks read metadata only; Triton launches nothing; the launch key needs no CUDA device.
    attention_op.block_mask = types.SimpleNamespace(
        validate=lambda *args: block_mask.validate_shapes(*args[:7]),  # without kv_unit, which needs values
        validate_shapes=block_mask.validate_shapes,
        validate_order=lambda *args, values: block_mask.validate_order(*args, values=False))
    tbs._block_sparse_attention_kernel = _StubKernel()
    triton_permute._move_tokens_kernel = _StubKernel()
    reordering_check = attention_op.check_reordering
    attention_op.check_reordering = lambda *args: reordering_check(*args[:-1], False)
    tbs.INTERPRET, tbs._autotune, tbs._current_device = False, False, lambda: 0
    lib = torch.library.Library("vsparse", "IMPL")
    lib.impl("block_sparse_attention", attention_op._cuda_kernel, "CPU")  # CPU tensors take the CUDA path

    @torch.library.custom_op("vsparse_before::block_sparse_attention", mutates_args=())
    def before(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
               kv_indices: torch.Tensor, scale: float, block_size: int, kv_lengths: Optional[torch.Tensor] = None,
               q_block_order: Optional[torch.Tensor] = None) -> torch.Tensor:
        attention_op.check_inputs(q, k, v, kv_num_blocks, kv_indices, scale, block_size, kv_lengths, q_block_order)
        return tbs.triton_block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, scale, block_size, kv_lengths,
                                                 q_block_order=q_block_order)

    q, k, v = (torch.randn(1, 1, 256, 64, dtype=torch.bfloat16) for _ in range(3))
    num = torch.full((1, 1, 2), 2, dtype=torch.int32)
    idx = torch.arange(2, dtype=torch.int32).expand(1, 1, 2, 2).contiguous()
    order = block_mask.heaviest_first(num)
    op = torch.ops.vsparse.block_sparse_attention
    result = {"before_custom_op_normal_path_us": us_per_call(
        lambda: torch.ops.vsparse_before.block_sparse_attention(q, k, v, num, idx, 0.125, 128, None, order), calls)}
    tbs._direct_launch = False
    result["library_op_normal_path_us"] = us_per_call(lambda: op(q, k, v, num, idx, 0.125, 128, None, order), calls)
    tbs._direct_launch = True
    result["library_op_direct_path_us"] = us_per_call(lambda: op(q, k, v, num, idx, 0.125, 128, None, order), calls)
    assert tbs._launches, "the direct path was not taken"
    result["library_op_direct_path_sorting_us"] = us_per_call(lambda: op(q, k, v, num, idx, 0.125, 128, None), calls)
    q2, k2, v2 = (torch.randn(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(3))
    token_order, reordered = torch.randperm(256), torch.tensor([[True, False]])
    result["library_op_direct_path_reordering_us"] = us_per_call(
        lambda: op(q2, k2, v2, num, idx, 0.125, 128, None, order, None, token_order, reordered), calls)
    result["torch"], result["triton"] = torch.__version__, tbs.triton.__version__
    print(json.dumps({n: round(x, 1) if isinstance(x, float) else x for n, x in result.items()}, indent=1))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="calls timed per variant")
    main(parser.parse_args().calls)
