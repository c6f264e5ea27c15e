"""The shell scripts parse, and the device script refuses to run without what it needs to name its results."""
import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_device_steps_needs_the_commit_before_doing_anything(tmp_path):
    script = next(p for p in SCRIPTS if p.name == "device_steps.sh")
    env = {key: value for key, value in os.environ.items() if key not in ("COMMIT", "STEPS", "OUT")}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode != 0 and "COMMIT: name the commit of this checkout" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing installed or written
