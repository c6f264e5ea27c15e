"""benchmarks/plan_reuse.py on the CPU's small config: the three variants run interleaved, and the reusing variant's
calls split into classifying and reusing ones as plan_refresh says."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_cpu_smoke_run_splits_the_reusing_variants_calls(tmp_path):
    out = tmp_path / "plan_reuse.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_reuse.py"), "--config", "small", "--rounds", "3",
                    "--refresh", "3", "--out", str(out)], check=True, capture_output=True, timeout=600)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"inductor", "vsparse plan_refresh=1", "vsparse plan_refresh=3"}
    assert all(r["calls"] == 3 and r["forward_ms"] > 0 for r in rows.values())
    assert (rows["vsparse plan_refresh=1"]["classifying_calls"], rows["vsparse plan_refresh=1"]["reusing_calls"]) == (3, 0)
    # The untimed first call classified; the timed ones find ages 1, 2, 3: reuse, reuse, classify.
    assert (rows["vsparse plan_refresh=3"]["classifying_calls"], rows["vsparse plan_refresh=3"]["reusing_calls"]) == (1, 2)
