"""kernels/triton_launch.Relaunch against Triton's own launcher code (the installed Triton's CudaLauncher and
descriptor wrapper) with the C launch function and the driver's CUDA calls replaced by recorders: a relaunch must
hand the C function exactly what Triton's runner would for the same arguments. test_kernels_direct_launch.py's GPU
tests run the real kernels through it."""
import gc
import types
import weakref

import pytest
import torch
from triton import knobs
from triton.backends.nvidia import driver as nvidia_driver
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from dit_compiler.kernels.triton_launch import Relaunch

SIGNATURE = {"a_desc": "tensordesc<bf16[1, 1, 64, 64]>", "b_desc": "constexpr", "x_ptr": "*i32", "n": "i32",
             "scale": "fp32", "y_ptr": "*i32", "C": "constexpr"}
META = {"swizzle": 3, "elem_size": 2, "elem_type": 9, "block_size": [1, 1, 64, 64], "fp4_padded": False}
GRID = (3, 2, 1)


class TensorMap:
    """What the fake cuTensorMapEncode returns: its inputs, compared by value."""

    def __init__(self, *fields):
        self.fields = fields

    def __eq__(self, other):
        return type(other) is TensorMap and self.fields == other.fields


class FakeDriver:
    def __init__(self):
        self.encoded, self.stream = [], 7001
        fill = lambda ptr, *rest: self.encoded.append(ptr) or TensorMap(ptr, *rest)  # noqa: E731
        self.utils = types.SimpleNamespace(fill_tma_descriptor=fill, fill_tma_descriptor_tiled=fill)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return self.stream


class FakeCompiled:
    """A compiled kernel whose launcher is Triton's CudaLauncher (built without compiling one) around a C launch
    function that records its arguments; its `[grid]` runner records the runner path."""

    def __init__(self, tensordesc_meta, scratch=0):
        self.c_calls, self.runner_calls = [], []
        self.function, self.packed_metadata = 5150, object()
        self.metadata = types.SimpleNamespace(tensordesc_meta=tensordesc_meta)
        run = object.__new__(nvidia_driver.CudaLauncher)
        run.launch = nvidia_driver.wrap_handle_tensordesc(lambda *a: self.c_calls.append(a), SIGNATURE,
                                                          tensordesc_meta)
        run.global_scratch_size, run.profile_scratch_size = scratch, 0
        run.global_scratch_align = run.profile_scratch_align = 1
        run.num_ctas, run.launch_cooperative_grid, run.launch_pdl = 1, False, False
        run.arg_annotations, run.kernel_signature = object(), object()  # Triton 3.7's C function takes them
        self.run = run

    def __getitem__(self, grid):
        return lambda *args: self.runner_calls.append((grid, args))

    def launch_as_triton(self, stream, args):
        """What Triton's runner hands the C function (no launch hooks registered)."""
        self.run(*GRID, stream, self.function, self.packed_metadata, None, None, None, *args)
        return self.c_calls.pop()


@pytest.fixture
def fake_driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(driver, "_active", fake)
    return fake


def arguments(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(1, 2, 128, 64, generator=g).to(torch.bfloat16)
    x, y = (torch.randint(0, 9, (4,), generator=g, dtype=torch.int32) for _ in range(2))
    return a, x, y, 0.25 * (seed + 1)


def with_descriptor(a, x, y, scale):
    return (TensorDescriptor(a, list(a.shape), list(a.stride()), [1, 1, 64, 64]), None, x, 128, scale, y, 4)


def flat(final):
    return [*final[:-1], *final[-1]] if isinstance(final[-1], list) else list(final)


def assert_same_call(got, want):
    got, want = flat(got), flat(want)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        same = (g is w) if isinstance(w, torch.Tensor) else (type(g) is type(w) and g == w)
        assert same, f"entry {i}: {g!r} vs {w!r}"


@pytest.mark.parametrize("tensordesc_meta", [[META], None], ids=["tma-maps", "no-metadata"])
def test_a_relaunch_hands_the_c_launch_what_triton_would(fake_driver, tensordesc_meta):
    compiled = FakeCompiled(tensordesc_meta)
    relaunch = Relaunch(compiled, GRID, with_descriptor(*arguments(0)))
    assert relaunch.direct and not compiled.c_calls, "recording launched something"
    for seed, stream in ((1, 7002), (2, 7003)):  # other tensors, scale and stream each time
        fake_driver.stream = stream
        a, x, y, scale = arguments(seed)
        relaunch(a, None, x, 128, scale, y, 4)
        got = compiled.c_calls.pop()
        assert_same_call(got, compiled.launch_as_triton(stream, with_descriptor(a, x, y, scale)))
    assert not compiled.runner_calls


def test_a_tensor_map_is_encoded_once_per_base_address(fake_driver):
    compiled = FakeCompiled([META])
    relaunch = Relaunch(compiled, GRID, with_descriptor(*arguments(0)))
    a, x, y, scale = arguments(1)
    b = arguments(2)[0]
    fake_driver.encoded.clear()
    for base in (a, a, b, a.view(a.shape), b):
        relaunch(base, None, x, 128, scale, y, 4)
    assert fake_driver.encoded == [a.data_ptr(), b.data_ptr()]


def test_launch_hooks_send_calls_through_the_runner(fake_driver):
    compiled = FakeCompiled([META])
    relaunch = Relaunch(compiled, GRID, with_descriptor(*arguments(0)))
    a, x, y, scale = arguments(1)
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        relaunch(a, None, x, 128, scale, y, 4)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert not compiled.c_calls
    (grid, args), = compiled.runner_calls
    assert grid == GRID and isinstance(args[0], TensorDescriptor) and args[0].base is a
    assert args[0].block_shape == [1, 1, 64, 64] and args[1:] == (None, x, 128, scale, y, 4)


def test_a_launcher_it_cannot_take_apart_keeps_the_runner(fake_driver):
    compiled = FakeCompiled([META], scratch=16)  # a kernel that needs global scratch per launch
    relaunch = Relaunch(compiled, GRID, with_descriptor(*arguments(0)))
    assert not relaunch.direct
    a, x, y, scale = arguments(1)
    relaunch(a, None, x, 128, scale, y, 4)
    assert not compiled.c_calls and len(compiled.runner_calls) == 1


def test_a_relaunch_keeps_no_tensor_of_the_recorded_call_alive(fake_driver):
    """The recorded argument list held the first call's tensors: under CUDA graphs, memory of the graphs' pool that
    no output tracked, and cudagraph trees refused to record the small Wan model with the defaults (H100, f902839)."""
    compiled = FakeCompiled([META])
    a, x, y, scale = arguments(0)
    relaunch = Relaunch(compiled, GRID, with_descriptor(a, x, y, scale))
    refs = [weakref.ref(t) for t in (a, x, y)]
    del a, x, y
    gc.collect()
    assert relaunch.direct and all(ref() is None for ref in refs), "the relaunch keeps a recorded tensor alive"
