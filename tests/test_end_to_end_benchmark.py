"""benchmarks/end_to_end.py on its CPU config: a vsparse variant runs, and --profile records the forward's ops,
Draft's block ranking and the block-sparse op among them, and the time they keep the device busy; the row breaks the
compile down."""
from repo_modules import load

end_to_end = load("benchmarks/end_to_end.py")


def test_a_profiled_draft_forward_lists_the_ranking_and_the_attention_ops():
    row = end_to_end.measure("vsparse-draft-0.1", "small", repeats=1, profile=True)
    assert row["forward_ms"] > 0 and row["rel_error_vs_eager"] < 0.05
    # The compile's breakdown: Inductor generated kernels, and its phases' times are recorded.
    assert row["kernels_generated"] > 0 and row["compile_phases_s"]
    # Counted from this measurement on (earlier compiles in the process left out): Dynamo's top-level phase, which
    # runs on the calling thread, fits in the first call.
    assert row["compile_phases_s"]["_compile.compile_inner"] <= row["first_call_s"]
    names = {name for name, _, _ in row["kernels"]}
    assert "vsparse::block_sparse_attention" in names and "vsparse::descending_order" in names
    # The busy time sums every kernel, the listed ones among them.
    assert 0 < sum(us for _, _, us in row["kernels"]) / 1e3 <= row["device_busy_ms"] + 0.05


def test_the_timeline_finds_the_gaps_the_host_left_and_what_it_did_then():
    """A hand-made trace: three kernels on the device with a 40 µs gap (the host launched the third one 30 µs after
    the second ended, inside the block-sparse op) and a 10 µs one (the host sat in a synchronize, then launched the second kernel 5 µs into the gap), and a copy
    overlapping the first kernel (counted once in the busy time)."""
    profiling = load("benchmarks/profiling.py")

    def event(cat, name, ts, dur, correlation=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,
                "args": {} if correlation is None else {"correlation": correlation}}

    trace = {"traceEvents": [
        event("kernel", "gemm", 100, 50, 1), event("gpu_memcpy", "copy", 120, 40, 2),
        event("kernel", "norm", 170, 20, 3), event("kernel", "_block_sparse_attention_kernel", 230, 100, 4),
        event("cuda_runtime", "cudaLaunchKernel", 90, 2, 1), event("cuda_runtime", "cudaMemcpyAsync", 91, 2, 2),
        event("cuda_runtime", "cudaStreamSynchronize", 150, 13),
        event("cuda_driver", "cuLaunchKernelEx", 165, 3, 3), event("cuda_runtime", "cudaLaunchKernel", 220, 3, 4),
        event("cpu_op", "Torch-Compiled Region", 50, 400), event("cpu_op", "vsparse::block_sparse_attention", 200, 30),
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 0},
    ]}
    timeline = profiling.idle_gaps(trace, min_us=5)
    assert timeline["span_ms"] == 0.23 and timeline["busy_ms"] == 0.18 and timeline["idle_ms"] == 0.05
    assert [g["gap_us"] for g in timeline["gaps"]] == [40, 10]
    late, waited = timeline["gaps"]
    assert (late["before"], late["after"]) == ("norm", "_block_sparse_attention_kernel")
    assert late["launched_late_us"] == 30 and late["launched_by"] == "vsparse::block_sparse_attention"
    assert waited["host_waits"] == ["cudaStreamSynchronize"] and waited["launched_late_us"] == 5
    assert profiling.idle_gaps({"traceEvents": []})["gaps"] == []
