"""The repository's modules that are in no package (benchmarks/, examples/), loaded by path for the tests."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(relative: str):
    """The module at `relative` (to the repository root), registered under its file's stem: dataclasses look their
    module up while a class is created."""
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
