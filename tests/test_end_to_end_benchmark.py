"""benchmarks/end_to_end.py on its CPU config: a vsparse variant runs, and --profile records the forward's ops,
Draft's block ranking and the block-sparse op among them, and the time they keep the device busy; the row breaks the
compile down."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("end_to_end", ROOT / "benchmarks" / "end_to_end.py")
end_to_end = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = end_to_end
spec.loader.exec_module(end_to_end)


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
