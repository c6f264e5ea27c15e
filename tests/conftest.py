import os
import sys

# `python -m pytest` puts the working directory first on sys.path. From the repository root that makes this
# repository's `kernels/` folder the top-level `kernels` package and hides Hugging Face's package of that name, which
# transformers (5.25 and later requires it) imports: every test building a diffusers model that loads peft or
# transformers would fail. Our stages import only as dit_compiler.* (pyproject.toml), so the root is never needed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _ROOT]

# Triton's interpreter must be chosen before any @triton.jit runs. GPU runs pass TRITON_INTERPRET=0 explicitly.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests' models are tiny and run on the CPU, where the cost model keeps every site dense: they rewrite through
# the force option (tests/test_cost_model.py checks the model itself, with the option off).
os.environ.setdefault("VSPARSE_FORCE_SPARSE", "1")
# Inductor's on-disk cache does not key on custom ops' fake kernels: tests that compile our ops with plain Inductor
# (no vsparse backend, whose key holds kernels/' sources) met graphs cached by an earlier checkout on the same
# machine and failed their stride assertions. Each session compiles into its own cache.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="vsparse-tests-inductor-")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and TRITON_INTERPRET=0")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def eager_pieces(monkeypatch):
    """Pieces run as captured instead of through Inductor: for tests of recognition, rewrite and run-time behaviour,
    which do not depend on Inductor (tests/test_backend.py compiles with it)."""
    import dit_compiler.backend as backend

    monkeypatch.setattr(backend, "compile_piece", lambda gm, example_inputs, config: gm)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
