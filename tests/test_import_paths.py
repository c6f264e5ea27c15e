"""The test process imports the project as installed: the repository's stage folders never become top-level
packages (tests/conftest.py says why)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_is_not_this_repository():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin).resolve() != ROOT / "kernels" / "__init__.py", spec.origin


def test_transformers_hub_kernels_import():
    import transformers.integrations.hub_kernels  # noqa: F401  imports `kernels` where transformers finds it
