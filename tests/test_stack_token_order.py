"""passes/stack_token_order.py: the block stack run in Draft's window order once, against every site permuting."""
import json

import pytest
import torch

import dit_compiler.backend as backend
from dit_compiler.passes.planners import PLANNERS
from dit_compiler.passes.sparse_attention import sparse_attention
from dit_compiler.passes.stack_token_order import TokenOrderResult, _indexed_dim
from tiny_models import BUILDERS, wan

pytestmark = pytest.mark.slow
DRAFT = dict(sparsity="draft", density=0.3, block_size=64, dense_layers=0, dense_steps=0.0, force_sparse=True)


def per_site(monkeypatch):
    monkeypatch.setattr(backend, "hoist_token_order", lambda gm, analysis, partition=None: TokenOrderResult(
        "token order per site: turned off by the test"))


def compile_and_run(model, calls, dump_dir=None, **options):
    torch._dynamo.reset()
    if dump_dir is not None:
        options["dump_dir"] = str(dump_dir)
    compiled = torch.compile(model, backend="vsparse", options=options, fullgraph=True)
    with torch.no_grad():
        return [compiled(**inputs)[0] for inputs in calls]


def report(dump_dir):
    (graph_dir,) = sorted(d for d in dump_dir.iterdir() if d.is_dir())
    return json.loads((graph_dir / "analysis.json").read_text()), (graph_dir / "rewritten.py").read_text()


def hoisted_note(analysis):
    return next((n for n in analysis["notes"] if n.startswith("token order")), None)


def assert_same(hoisted, reference):
    for a, b in zip(hoisted, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense_layers,dense_steps", [(0, 0.0), (1, 0.5)])
def test_wan_stack_in_window_order_equals_per_site_permutation(dense_layers, dense_steps, tmp_path, monkeypatch):
    """Same masks, same outputs; no site permutes, the graph gathers the entry, the RoPE tables and the output."""
    model, inputs = wan(frames=3, height=16, width=20, layers=3, head_dim=64)
    calls = [dict(inputs, timestep=torch.full((1,), t)) for t in (900.0, 300.0)]  # dense phase, then sparse
    options = dict(DRAFT, dense_layers=dense_layers, dense_steps=dense_steps, cache="none")
    hoisted = compile_and_run(model, calls, tmp_path / "hoisted", **options)
    analysis, rewritten = report(tmp_path / "hoisted")
    note = hoisted_note(analysis)
    assert note and note.startswith("token order hoisted to the block stack: "
                                    f"{3 - dense_layers} sparse sites"), note
    assert rewritten.count("in_plan_order = True") == 3 - dense_layers
    # The entry and two RoPE tables (cos, sin) at their roots written out once, the output gathered back before
    # unpatchify; nothing per layer.
    assert rewritten.count("gather_rows(") == 3 and rewritten.count("torch.index_select(") == 1, rewritten
    per_site(monkeypatch)
    reference = compile_and_run(model, calls, **options)
    assert_same(hoisted, reference)


def test_wan_with_the_cache_keeps_the_stack_exit_in_the_entry_order(tmp_path, monkeypatch):
    """The split stack: the gathered entry is the stack's residual entry, the gather back lands in the tail, and
    reused steps add a residual of two values in one order."""
    model, inputs = wan(frames=3, height=16, width=20, layers=3, head_dim=64)
    calls = [dict(inputs, timestep=torch.full((1,), t), hidden_states=inputs["hidden_states"] * (1 + t / 1e4))
             for t in (900.0, 890.0, 880.0, 870.0, 860.0)]  # inputs that barely move: the cache reuses
    options = dict(DRAFT, cache="easycache", cache_threshold=0.5, cache_start=0.0, force_cache=True)
    hoisted = compile_and_run(model, calls, tmp_path / "hoisted", **options)
    analysis, _ = report(tmp_path / "hoisted")
    assert hoisted_note(analysis).startswith("token order hoisted"), analysis["notes"]
    (graph_dir,) = sorted(d for d in (tmp_path / "hoisted").iterdir() if d.is_dir())
    records = [json.loads(line) for line in (graph_dir / "runtime.jsonl").read_text().splitlines()]
    assert any(r["cache"] == "reuse" for r in records), records  # the cache reused the stack at least once
    per_site(monkeypatch)
    reference = compile_and_run(model, calls, **options)
    assert_same(hoisted, reference)


class _TokenCumsum(torch.nn.Module):
    """Mixes tokens along the sequence (no rule keeps the order through it): the value leaves the order there and
    its result comes back in through a gather."""

    def forward(self, x):
        return x + 0.01 * x.cumsum(1)


def test_op_without_a_rule_leaves_the_order_and_comes_back(tmp_path, monkeypatch):
    model, inputs = wan(frames=3, height=16, width=20, layers=3, head_dim=64)
    for block in model.blocks:
        block.norm2 = torch.nn.Sequential(block.norm2, _TokenCumsum())
    hoisted = compile_and_run(model, [inputs], tmp_path / "hoisted", **DRAFT, cache="none")
    analysis, rewritten = report(tmp_path / "hoisted")
    assert hoisted_note(analysis).startswith("token order hoisted"), analysis["notes"]
    assert "in_plan_order = True" in rewritten
    per_site(monkeypatch)
    assert_same(hoisted, compile_and_run(model, [inputs], **DRAFT, cache="none"))


class _InPlaceScale(torch.nn.Module):
    def forward(self, x):
        return x.mul_(1.0)


def test_in_place_write_after_the_entry_keeps_per_site_permutations(tmp_path):
    model, inputs = wan(frames=3, height=16, width=20, layers=2, head_dim=64)
    for block in model.blocks:
        block.norm2 = torch.nn.Sequential(block.norm2, _InPlaceScale())
    expected = compile_and_run(model, [inputs], **DRAFT, cache="none")
    out = compile_and_run(model, [inputs], tmp_path, **DRAFT, cache="none")
    analysis, rewritten = report(tmp_path)
    assert "in-place op" in hoisted_note(analysis) and "in_plan_order" not in rewritten
    assert_same(out, expected)


@pytest.mark.parametrize("name,sparsity,reason", [
    ("wan", "svg", "no sparse site whose planner keeps one fixed order"),
    ("cogvideox", "draft", "text joins the sequence inside the blocks"),
    ("hunyuan", "draft", "text joins the sequence inside the blocks")])
def test_declines_with_the_reason(name, sparsity, reason, tmp_path):
    model, inputs = BUILDERS[name](head_dim=64, frames=3, height=16, width=20)
    compile_and_run(model, [inputs], tmp_path, **dict(DRAFT, sparsity=sparsity), cache="none")
    note = hoisted_note(report(tmp_path)[0])
    assert note and note.startswith("token order per site: ") and reason in note, note


def test_sparse_attention_in_plan_order_needs_a_fixed_order():
    q = torch.randn(1, 2, 64, 16)
    constants = PLANNERS["svg"].constants((1, 8, 8, 0, 0), 16, 0.5, q.device)
    with pytest.raises(ValueError, match="no fixed order"):
        sparse_attention(q, q, q, None, None, constants, (1, 8, 8, 0, 0), planner="svg", density=0.5, block_size=16,
                         scale=0.25, in_plan_order=True)


@pytest.mark.parametrize("index,ndim,dim,expected", [
    ((Ellipsis, slice(0, None, 2)), 4, 1, 1),  # Wan's RoPE slice of the last dim
    ((slice(None), None), 2, 1, 2),  # a new axis before the tokens
    ((0, slice(None)), 3, 1, 0),  # an int drops the batch dim
    ((slice(None), slice(0, 5)), 3, 1, None),  # a slice of the tokens
    ((slice(None), 3), 3, 1, None),  # one token
    ((Ellipsis, None), 3, 1, 1),
])
def test_indexed_dim(index, ndim, dim, expected):
    assert _indexed_dim(index, ndim, dim) == expected


def test_a_dynamic_batch_keeps_the_order_and_adds_no_guard(tmp_path, monkeypatch):
    """A symbolic batch with a static token grid: the pass applies and compares no symbolic size (a guard would
    recompile for the next batch size)."""
    model, _ = wan(frames=3, height=16, width=20, layers=2, head_dim=64)
    calls = [wan(frames=3, height=16, width=20, layers=2, head_dim=64, batch=b)[1] for b in (2, 3)]
    for inputs in calls:
        for name in ("hidden_states", "encoder_hidden_states", "timestep"):
            torch._dynamo.mark_dynamic(inputs[name], 0)
    hoisted = compile_and_run(model, calls, tmp_path / "hoisted", **DRAFT, cache="none")
    analysis, _ = report(tmp_path / "hoisted")  # one graph folder: no recompile for the second batch size
    assert hoisted_note(analysis).startswith("token order hoisted"), analysis["notes"]
    per_site(monkeypatch)
    assert_same(hoisted, compile_and_run(model, calls, **DRAFT, cache="none"))


def test_ltx_rope_built_by_stack_keeps_the_order(tmp_path, monkeypatch):
    """LTX-Video's RoPE pairs the rotated halves with torch.stack (and the tables with cat): both keep the order along
    another dim, so the stack runs in Draft's order there too."""
    import coverage_models

    model, inputs, _ = coverage_models.BUILDERS["ltx_video"](head_dim=64)
    model.eval()
    hoisted = compile_and_run(model, [inputs], tmp_path / "hoisted", **DRAFT, cache="none")
    note = hoisted_note(report(tmp_path / "hoisted")[0])
    assert note.startswith("token order hoisted"), note
    per_site(monkeypatch)
    assert_same(hoisted, compile_and_run(model, [inputs], **DRAFT, cache="none"))
