"""Triton kernels compile for sm_90 (the H100 and H200) without a GPU: Triton's wheel carries ptxas and cuobjdump.
Compilation only, with no spilled registers and shared memory within the SM's (the sampled-row partial kernel spilled
through its pointer loads: kernels/NOTES.md); numerics are the interpreter tests' and the GPU tests' (`pytest -m gpu`).
Each compile runs in a fresh process with TRITON_INTERPRET=0: the interpreter the other tests select patches
triton.language, and compiling beside it failed at random."""
import json
import os
import subprocess
import sys

import pytest
import triton

from dit_compiler.kernels.triton_block_sparse import CONFIGS as ATTENTION_CONFIGS
from dit_compiler.kernels.triton_sampled_rows import CONFIG

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
HOPPER_SHARED_BYTES = 232448  # shared memory a block may use on sm_90 (227 KiB), as Triton's launch checks it

# kernel: (module, function, argument types, constexprs, warps, stages, most registers a thread), as the launchers
# use them on Wan's shapes (bf16, head dim 128); a string names the launcher's own constant.
PARTIAL_M, PARTIAL_N, PARTIAL_WARPS, PARTIAL_STAGES = CONFIG
ATTENTION_M, ATTENTION_N, ATTENTION_WARPS, ATTENTION_STAGES = ATTENTION_CONFIGS[0]
ATTENTION_TILE = "tensordesc<bf16[1,1,{},128]>"


def _attention_case(kv_unit: int, moved_heads: bool = False) -> tuple:
    moved = {f"moved_{name}_desc": ATTENTION_TILE.format(ATTENTION_N if name in "kv" else ATTENTION_M)
             for name in "qkvo"}
    return (
        "triton_block_sparse", "_block_sparse_attention_kernel",
        dict(q_desc=ATTENTION_TILE.format(ATTENTION_M), k_desc=ATTENTION_TILE.format(ATTENTION_N),
             v_desc=ATTENTION_TILE.format(ATTENTION_N), o_desc=ATTENTION_TILE.format(ATTENTION_M),
             **(moved if moved_heads else {}), num_ptr="*i32",
             idx_ptr="*i32", order_ptr="*i32", kv_lengths_ptr="*i32", heads_ptr="*u8", stride_nb="i32",
             stride_nh="i32", stride_ib="i32", stride_ih="i32", stride_iq="i32", stride_orb="i32", stride_orh="i32",
             stride_hb="i32", stride_hh="i32", heads="i32", kv_len="i32", qk_scale="fp32"),
        dict(HEAD_DIM=128, BLOCK_SIZE=128, KV_UNIT=kv_unit, BLOCK_M=ATTENTION_M, BLOCK_N=ATTENTION_N,
             HAS_KV_LENGTHS=False, MOVED_HEADS=moved_heads, DOT_FP32=False, IEEE=False,
             **({} if moved_heads else dict.fromkeys(moved))),  # an absent moved set is passed as None
        ATTENTION_WARPS, ATTENTION_STAGES, 255)


CASES = {
    "block_sparse_attention": _attention_case(128),  # block ids
    "block_sparse_attention_token_starts": _attention_case(1),  # svg-shift's key blocks at token starts
    "block_sparse_attention_moved_heads": _attention_case(128, moved_heads=True),  # svg's reordered heads
    **{name: (
        "triton_permute", "_move_tokens_kernel",
        dict(x0_ptr="*bf16", x1_ptr="*bf16", x2_ptr="*bf16", index_ptr="*i64", moved_ptr="*u8", out0_ptr="*bf16",
             out1_ptr="*bf16", out2_ptr="*bf16", stride_xb="i32", stride_xh="i32", stride_xs="i32", stride_ob="i32",
             stride_oh="i32", stride_os="i32", stride_ib="i32", stride_ih="i32", stride_mb="i32", stride_mh="i32",
             heads="i32", seq_len="i32"),
        dict(DIM=128, BLOCK_D=128, BLOCK_S="BLOCK_S", SCATTER=scatter, HAS_MOVED=moved, NUM_TENSORS=tensors),
        "NUM_WARPS", 3, 255)
       for name, scatter, moved, tensors in (("permute_tokens", False, False, 1), ("move_tokens_back", True, True, 1),
                                             ("move_qkv_tokens", False, True, 3))},  # svg's reordered heads
    "sampled_rows_partial": (
        "triton_sampled_rows", "_sampled_rows_partial_kernel",
        dict(q_desc=f"tensordesc<bf16[1,1,{PARTIAL_M},128]>", k_desc=f"tensordesc<bf16[1,1,{PARTIAL_N},128]>",
             v_desc=f"tensordesc<bf16[1,1,{PARTIAL_N},128]>", masks_desc=f"tensordesc<u8[{PARTIAL_M},{PARTIAL_N}]>",
             skip_ptr="*u8", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", heads="i32", kv_len="i32",
             keys_per_split="i32", padded_virtual="i32", qk_scale="fp32"),
        dict(HAS_SKIP=True, HEAD_DIM=128, BLOCK_M=PARTIAL_M, BLOCK_N=PARTIAL_N, DOT_FP32=False, IEEE=False),
        PARTIAL_WARPS, PARTIAL_STAGES, 168),  # 168: three 4-warp programs fit an SM's registers
    "sampled_rows_merge": (
        "triton_sampled_rows", "_sampled_rows_merge_kernel",
        dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr="*fp32", skip_ptr="*u8", splits="i32",
             num_virtual="i32", padded_virtual="i32"),
        dict(HAS_SKIP=True, HEAD_DIM=128, SPLIT_CHUNK="MERGE_SPLIT_CHUNK"), "MERGE_WARPS", 3, 128),
    **{name: (
        "triton_block_means", "_block_means_kernel",
        dict(x_ptr="*bf16", order_ptr="*i64" if gather else "*bf16", out_ptr="*fp32", stride_xb="i32",
             stride_xh="i32", stride_xs="i32", heads="i32", seq_len="i32", num_blocks="i32", block_size="i32"),
        dict(DIM=128, BLOCK_D=128, ROWS="ROWS", GATHER=gather), "NUM_WARPS", 3, 128)
       for name, gather in (("block_means", True), ("block_means_consecutive", False))},  # dual's, draft's
}


def resource_usage(name: str, cubin_path: str) -> dict:
    """Compile CASES[name] for sm_90 into `cubin_path`; cuobjdump's resource counts (REG, STACK, LOCAL, ...)."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, kernel_name, arguments, constexprs, warps, stages, _ = CASES[name]
    module = importlib.import_module(f"dit_compiler.kernels.{module_name}")
    constant = lambda value: getattr(module, value) if isinstance(value, str) else value  # noqa: E731
    constexprs = {key: constant(value) for key, value in constexprs.items()}
    signature = dict(arguments, **{key: "constexpr" for key in constexprs})
    compiled = triton.compile(ASTSource(fn=getattr(module, kernel_name), signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": constant(warps), "num_stages": stages})
    with open(cubin_path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", cubin_path], capture_output=True,
                           text=True, check=True).stdout
    line = next(line for line in usage.splitlines() if "REG:" in line)
    counts = {key: int(value) for key, value in (item.split(":") for item in line.split() if ":" in item)
              if value.isdigit()}
    return dict(counts, DYNAMIC_SHARED=compiled.metadata.shared)


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="this Triton wheel carries no ptxas")
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_compiles_for_sm90_without_spills(name, tmp_path):
    proc = subprocess.run([sys.executable, __file__, name, str(tmp_path / f"{name}.cubin")], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, f"{name} spills: {usage}"
    most = CASES[name][-1]
    assert usage["REG"] <= most, f"{name} needs {usage['REG']} registers a thread (at most {most})"
    # A kernel over the limit compiles but cannot launch; the autotuner then drops its config silently (two key
    # loops in one kernel doubled the pipeline's buffers to 393 KB: kernels/NOTES.md).
    assert usage["DYNAMIC_SHARED"] <= HOPPER_SHARED_BYTES, f"{name} needs {usage['DYNAMIC_SHARED']} B of shared memory"


if __name__ == "__main__":
    print(json.dumps(resource_usage(sys.argv[1], sys.argv[2])))
