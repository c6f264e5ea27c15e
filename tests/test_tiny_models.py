import pytest
import torch

from tiny_models import BUILDERS


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_tiny_model_runs_eager(name):
    model, inputs = BUILDERS[name]()
    with torch.no_grad():
        out = model(**inputs)[0]
    assert out.shape == inputs["hidden_states"].shape
    assert torch.isfinite(out).all()
