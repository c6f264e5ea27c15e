"""The op's host fast path (kernels/triton_block_sparse.py, "Host cost"): a CUDA call whose launch key was seen
launches the recorded compiled kernel with the arguments the normal path would bind. On CPU, Triton's launch is
replaced by a recorder (`FakeJIT`), so these tests check the caching logic; test_gpu_* run the real kernel."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dit_compiler.kernels  # noqa: F401  registers torch.ops.vsparse
from dit_compiler.kernels import attention_op, block_mask, triton_block_sparse as tbs, triton_permute
from dit_compiler.kernels.masks.random import random_block_mask

ARG_NAMES = tbs._block_sparse_attention_kernel.arg_names


class FakeJIT:
    """Stands in for the @triton.jit kernel (and its autotuner): records what `kernel[grid](...)` binds, in the
    kernel's parameter order, and returns a fake compiled kernel whose `[grid]` runner records direct launches."""

    def __init__(self):
        self.launches, self.direct = [], []

    def __getitem__(self, grid):
        def run(*args, num_warps=None, num_stages=None, **consts):
            bound = {**dict(zip(ARG_NAMES, args)), **consts}
            if "BLOCK_M" not in bound:  # called as the autotuner: it picks a config and sets the tiles (pre_hook)
                bound.update(BLOCK_M=64, BLOCK_N=64)
                tbs._set_block_shapes(bound)
            self.launches.append(([bound[name] for name in ARG_NAMES], (*grid(bound), 1)))
            return FakeCompiledKernel(self)

        return run


class FakeCompiledKernel:
    """What a fake JIT's launch returns: its `[grid]` runner records direct launches on that JIT."""

    def __init__(self, jit):
        self.jit = jit

    def __getitem__(self, grid):
        return lambda *args: self.jit.direct.append((list(args), grid))


@pytest.fixture
def fake_triton(monkeypatch):
    jit = FakeJIT()
    monkeypatch.setattr(tbs, "_block_sparse_attention_kernel", jit)
    monkeypatch.setattr(tbs, "INTERPRET", False)
    monkeypatch.setattr(tbs, "_direct_launch", True)
    monkeypatch.setattr(tbs, "_autotune", False)
    monkeypatch.setattr(tbs, "_current_device", lambda: 0)
    monkeypatch.setattr(tbs, "_launches", {})
    monkeypatch.setattr(attention_op, "_check_mask_values_on_cuda", False)
    return jit


def case(seed=0, dtype=torch.bfloat16, dim=64, block_size=64, kv_lengths=False, order=True, heads_major=False):
    g = torch.Generator().manual_seed(seed)
    if heads_major:  # diffusers' layout: a transpose of [B, S, H, D]
        q, k, v = (torch.randn(1, 150, 2, dim, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(1, 2, 150, dim, generator=g).to(dtype) for _ in range(3))
    num, idx = random_block_mask(1, 2, 150, 150, block_size, 0.5, ragged=True, generator=g)
    kvl = torch.tensor([120], dtype=torch.int32) if kv_lengths else None
    schedule = block_mask.heaviest_first(num) if order else None
    return (q, k, v, num, idx, 1 / math.sqrt(dim), block_size, kvl, schedule)


def call(args):
    """What the CUDA dispatch key runs (CPU tensors here: the fake launch never reads them)."""
    return attention_op._cuda_kernel(*args)


def same_argument(a, b):
    if isinstance(a, tbs.TensorDescriptor):
        fields = lambda d: {n: x for n, x in d.__dict__.items() if n != "base"}  # noqa: E731
        return type(b) is tbs.TensorDescriptor and fields(a) == fields(b) and a.base.shape == b.base.shape
    if isinstance(a, torch.Tensor):
        return a is b or torch.equal(a, b)  # the schedule is recomputed when not given
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("order", [True, False])
def test_direct_launch_passes_what_the_normal_launch_binds(fake_triton, monkeypatch, order):
    call(case(seed=1, order=order))
    assert len(fake_triton.launches) == 1 and not fake_triton.direct
    second = case(seed=2, order=order)  # same metadata, other data
    out = call(second)
    assert len(fake_triton.launches) == 1 and len(fake_triton.direct) == 1, "the seen key did not launch directly"
    assert out.shape == second[0].shape and out.dtype == second[0].dtype and out.transpose(1, 2).is_contiguous()
    monkeypatch.setattr(tbs, "_direct_launch", False)
    call(second)  # the normal path on the same inputs: what Triton would have bound
    (direct_args, direct_grid), (normal_args, normal_grid) = fake_triton.direct[0], fake_triton.launches[1]
    assert direct_grid == normal_grid
    assert len(direct_args) == len(normal_args) == len(ARG_NAMES)
    for name, a, b in zip(ARG_NAMES, direct_args, normal_args):
        assert same_argument(a, b), f"{name}: direct {a!r} vs normal {b!r}"
    for t, desc in zip(second[:3], direct_args[:3]):
        assert desc.base is t


class FakeMoveJIT:
    """Stands in for triton_permute's move kernel: records the normal launches (arguments in parameter order,
    constexprs last) and the direct ones of the compiled kernel it returns."""

    def __init__(self):
        self.launches, self.direct = [], []

    def __getitem__(self, grid):
        def run(*args, num_warps=None, **consts):
            self.launches.append(([*args, *consts.values()], grid))
            return FakeCompiledKernel(self)

        return run


def reordering_case(seed):
    """case()'s inputs in diffusers' layout with svg's reordering: one token order, the first head reordered."""
    order = torch.randperm(150, generator=torch.Generator().manual_seed(seed))
    return (*case(seed=seed, heads_major=True), None, order, torch.tensor([[True, False]]))


def test_reordered_heads_repeat_their_moves_directly(fake_triton, monkeypatch):
    """A recorded call with reordered heads launches the kernel (both descriptor sets) and both moves (q, k, v
    gathered in one launch, the output scattered back) directly, with what the normal path binds for the same
    inputs."""
    moves = FakeMoveJIT()
    monkeypatch.setattr(triton_permute, "_move_tokens_kernel", moves)
    call(reordering_case(1))
    assert (len(fake_triton.launches), len(moves.launches), len(moves.direct)) == (1, 2, 0)
    second = reordering_case(2)
    call(second)
    assert (len(fake_triton.launches), len(fake_triton.direct)) == (1, 1)
    assert (len(moves.launches), len(moves.direct)) == (2, 2), "the moves did not launch directly"
    monkeypatch.setattr(tbs, "_direct_launch", False)
    call(second)
    for (direct, direct_grid), (normal, normal_grid) in zip(moves.direct, moves.launches[2:]):
        assert direct_grid == normal_grid and len(direct) == len(normal)
        for a, b in zip(direct, normal):
            if isinstance(a, torch.Tensor):  # the given tensors themselves; fresh copies alike in layout
                assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            else:
                assert type(a) is type(b) and a == b
    (direct, direct_grid), (normal, normal_grid) = fake_triton.direct[0], fake_triton.launches[1]
    assert direct_grid == normal_grid and len(direct) == len(normal) == len(ARG_NAMES)
    for name, a, b in zip(ARG_NAMES, direct, normal):
        assert same_argument(a, b), f"{name}: direct {a!r} vs normal {b!r}"
    assert direct[ARG_NAMES.index("MOVED_HEADS")] is True
    assert all(isinstance(direct[ARG_NAMES.index(f"moved_{t}_desc")], tbs.TensorDescriptor) for t in "qkvo")
    q, k, v = second[:3]
    gather = moves.direct[0][0]
    assert gather[0] is q and gather[1] is k and gather[2] is v and gather[3] is second[-2]


@pytest.mark.parametrize("change", [dict(dtype=torch.float16), dict(dim=32), dict(block_size=128),
                                    dict(kv_lengths=True), dict(order=False), dict(heads_major=True)])
def test_a_changed_key_launches_normally_once_then_directly(fake_triton, change):
    call(case())
    call(case(seed=1))
    assert (len(fake_triton.launches), len(fake_triton.direct)) == (1, 1)
    call(case(seed=2, **change))
    assert (len(fake_triton.launches), len(fake_triton.direct)) == (2, 1), f"{change} reused another key's launch"
    call(case(seed=3, **change))
    assert (len(fake_triton.launches), len(fake_triton.direct)) == (2, 2)


def test_other_device_or_autotune_setting_is_another_key(fake_triton, monkeypatch):
    call(case())
    monkeypatch.setattr(tbs, "_current_device", lambda: 1)
    call(case())
    monkeypatch.setattr(tbs, "_autotune", True)
    monkeypatch.setattr(tbs, "_tuned", lambda dtype: tbs._block_sparse_attention_kernel)
    call(case())
    assert (len(fake_triton.launches), len(fake_triton.direct)) == (3, 0)


def test_misaligned_inputs_always_launch_normally(fake_triton):
    """A base off 16 bytes is copied for TMA (and Triton specializes pointers on alignment): never recorded."""
    q, *rest = case()
    storage = torch.empty(q.numel() + 4, dtype=q.dtype)
    shifted = storage[4:].view(q.shape).copy_(q)  # 8 bytes off
    assert shifted.data_ptr() % 16
    for _ in range(2):
        call((shifted, *rest))
    assert (len(fake_triton.launches), len(fake_triton.direct)) == (2, 0)


def test_unchecked_calls_are_not_recorded(fake_triton):
    """Only the op's checked calls record: a direct call of the launcher must not let a later op call skip checks."""
    args = case()
    q, k, v, num, idx, scale, block_size, kvl, order = args
    tbs.triton_block_sparse_attention(q, k, v, num, idx, scale, block_size, kvl, q_block_order=order)
    call(args)
    assert (len(fake_triton.launches), len(fake_triton.direct)) == (2, 0)


def test_mask_value_checks_turn_direct_launches_off(fake_triton, monkeypatch):
    call(case())
    monkeypatch.setattr(attention_op, "_check_mask_values_on_cuda", True)
    call(case(seed=1))
    assert (len(fake_triton.launches), len(fake_triton.direct)) == (2, 0)


def test_bad_inputs_still_raise_after_a_key_was_recorded(fake_triton):
    call(case())
    q, k, v, num, idx, scale, block_size, kvl, order = case()
    with pytest.raises(ValueError, match="query blocks"):
        call((q, k, v, num[..., :1], idx, scale, block_size, kvl, order))
    with pytest.raises(ValueError, match="q_block_order must be int32"):
        call((q, k, v, num, idx, scale, block_size, kvl, order.long()))


@pytest.mark.parametrize("version, known", [("3.6.0", True), ("3.7.1", True), ("3.5.1", False), ("3.8.0", False),
                                            ("4.0.0", False)])
def test_direct_launch_only_on_checked_triton_versions(version, known):
    assert tbs.direct_launch_supported(version) is known


def test_unknown_triton_version_takes_the_normal_path_every_call(fake_triton, monkeypatch):
    monkeypatch.setattr(tbs, "_direct_launch", tbs.direct_launch_supported("3.8.0"))
    for seed in range(3):
        call(case(seed=seed))
    assert (len(fake_triton.launches), len(fake_triton.direct)) == (3, 0)


def test_op_without_backward_raises_clearly_on_backward():
    q = torch.randn(1, 2, 100, 64, requires_grad=True)
    num, idx = block_mask.full(1, 2, 100, 100, 64)
    out = torch.ops.vsparse.block_sparse_attention(q, q.detach(), q.detach(), num, idx, 0.1, 64)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="block_sparse_attention has no backward"):
        out.sum().backward()
    with torch.no_grad():
        assert not torch.ops.vsparse.block_sparse_attention(q, q, q, num, idx, 0.1, 64).requires_grad


def test_op_registration_passes_opcheck():
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch, as torch.library checks them."""
    q = torch.randn(1, 2, 100, 64)
    num, idx = block_mask.full(1, 2, 100, 100, 64)
    order = block_mask.heaviest_first(num)
    torch.library.opcheck(torch.ops.vsparse.block_sparse_attention.default, (q, q, q, num, idx, 0.1, 64, None, order))
    meta = torch.ops.vsparse.block_sparse_attention(q.to("meta"), q.to("meta"), q.to("meta"), num.to("meta"),
                                                    idx.to("meta"), 0.1, 64)
    assert meta.shape == q.shape and meta.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.parametrize("order", [True, False])
def test_gpu_direct_launch_matches_the_normal_launch(monkeypatch, order):
    """The recorded launch gives bit-identical outputs to Triton's normal path (same compiled kernel and config)."""
    monkeypatch.setattr(tbs, "_launches", {})
    monkeypatch.setattr(attention_op, "_check_mask_values_on_cuda", False)
    direct = []
    original = tbs._DirectLaunch.__call__
    monkeypatch.setattr(tbs._DirectLaunch, "__call__", lambda self, *a: direct.append(1) or original(self, *a))
    op = torch.ops.vsparse.block_sparse_attention
    for seed in range(3):
        q, k, v, num, idx, scale, block_size, kvl, schedule = (
            a.cuda() if isinstance(a, torch.Tensor) else a
            for a in case(seed=seed, dim=128, block_size=128, kv_lengths=seed == 2, order=order, heads_major=True))
        got = op(q, k, v, num, idx, scale, block_size, kvl, schedule)
        monkeypatch.setattr(tbs, "_direct_launch", False)
        want = op(q, k, v, num, idx, scale, block_size, kvl, schedule)
        monkeypatch.setattr(tbs, "_direct_launch", True)
        assert torch.equal(got, want)
    assert len(direct) == 1  # seed 1 repeats seed 0's key; seed 2 adds kv_lengths, a new key
    assert all(launch.launch.direct for launch in tbs._launches.values()), "Triton's runner, not the C launch"


@pytest.mark.gpu
def test_gpu_direct_launch_with_reordered_heads_matches_the_normal_launch(monkeypatch):
    monkeypatch.setattr(tbs, "_launches", {})
    monkeypatch.setattr(attention_op, "_check_mask_values_on_cuda", False)
    op = torch.ops.vsparse.block_sparse_attention
    for seed in range(3):
        q, k, v, num, idx, scale, block_size, kvl, schedule, kv_unit, order, flags = (
            a.cuda() if isinstance(a, torch.Tensor) else a for a in reordering_case(seed))
        got = op(q, k, v, num, idx, scale, block_size, kvl, schedule, kv_unit, order, flags)
        monkeypatch.setattr(tbs, "_direct_launch", False)
        want = op(q, k, v, num, idx, scale, block_size, kvl, schedule, kv_unit, order, flags)
        monkeypatch.setattr(tbs, "_direct_launch", True)
        assert torch.equal(got, want)
    assert len(tbs._launches) == 1
    launch, = tbs._launches.values()
    assert launch.launch.direct and all(move.launch.direct for move in launch.gather + launch.scatter), \
        "Triton's runner, not the C launch"


def attend_computed_inputs(q, k, v, num, idx, schedule, order, flags):
    """The op on a mask, schedule, token order and q, k, v computed in the graph, as the rewrite's are: under CUDA
    graphs they are memory of the graphs' pool."""
    return torch.ops.vsparse.block_sparse_attention(q * 1, k * 1, v * 1, num + 0, idx + 0, 0.125, 64, None,
                                                    schedule + 0, None, order + 0, flags.clone())


@pytest.mark.gpu
def test_gpu_recorded_launches_under_cuda_graphs(monkeypatch):
    """Launches recorded inside a CUDA-graph region replay there: the recorded argument list kept the recording
    call's tensors, pool memory no output tracked, and cudagraph trees refused to record (the small Wan model's
    reduce-overhead forward failed, H100, f902839)."""
    monkeypatch.setattr(tbs, "_launches", {})
    monkeypatch.setattr(attention_op, "_check_mask_values_on_cuda", False)
    q, k, v, num, idx, _, _, _, schedule, _, order, flags = (
        a.cuda() if isinstance(a, torch.Tensor) else a for a in reordering_case(0))
    want = attend_computed_inputs(q, k, v, num, idx, schedule, order, flags)
    tbs._launches.clear()  # the graph's first call records its own
    torch._dynamo.reset()
    compiled = torch.compile(attend_computed_inputs, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, recording, replays
        torch.testing.assert_close(compiled(q, k, v, num, idx, schedule, order, flags), want)
    torch._dynamo.reset()
    assert tbs._launches and all(launch.launch.direct for launch in tbs._launches.values())


@pytest.mark.skipif(not tbs.INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_triton_kernel_copies_a_misaligned_contiguous_base():
    """`contiguous()` returned such a tensor as it was, and TensorDescriptor refused the base."""
    q, k, v, num, idx, scale, block_size, _, order = case(dtype=torch.float32)
    shifted = torch.empty(q.numel() + 2)[2:].view(q.shape).copy_(q)
    assert shifted.data_ptr() % 16
    out = tbs.triton_block_sparse_attention(shifted, k, v, num, idx, scale, block_size, q_block_order=order)
    torch.testing.assert_close(out, attention_op.reference_block_sparse_attention(q, k, v, num, idx, scale,
                                                                                   block_size), atol=1e-4, rtol=1e-4)


def test_host_cost_benchmark_runs_without_a_gpu():
    """benchmarks/op_host_cost_cpu.py stubs the launches and times the host path: it had kept an old signature of
    block_mask.validate and raised before timing anything."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/op_host_cost_cpu.py", "--calls", "20"], cwd=root,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert all(result[name] > 0 for name in ("library_op_normal_path_us", "library_op_direct_path_us",
                                              "library_op_direct_path_reordering_us"))
