"""passes/interleaved_fill.py: a fresh buffer filled through k strided slices is rewritten into one interleaving with
the same values; fills it cannot prove complete and alone are left as they are."""
import json
import operator

import torch
from hypothesis import given, settings, strategies as st

from dit_compiler.passes.interleaved_fill import interleave, rewrite_interleaved_fills
import graph_passes
from tiny_models import wan


def capture(fn, *args):
    """fn's Dynamo graph with the pass applied, run as captured: (outputs, matches, the rewritten graph)."""
    return graph_passes.capture(rewrite_interleaved_fills, fn, *args)


def calls(graph, target):
    return sum(n.op == "call_function" and n.target is target for n in graph.nodes)


def strided_index(ndim: int, dim: int, start: int, step: int, form: str) -> tuple:
    cut = slice(start, None, step)
    if form == "ellipsis":  # ..., cut, then full slices to the end
        return (Ellipsis, cut) + (slice(None),) * (ndim - 1 - dim)
    return (slice(None),) * dim + (cut,)


@settings(max_examples=12, deadline=None)
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), dim_pick=st.integers(0, 3),
       step=st.integers(2, 3), form=st.sampled_from(["ellipsis", "leading"]), reverse=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_a_complete_strided_fill_becomes_one_interleaving_with_the_same_values(shape, dim_pick, step, form, reverse,
                                                                               dtype, seed):
    dim = dim_pick % (len(shape) + 1)
    shape = list(shape)
    shape.insert(dim, step * 2)  # the filled dim, a multiple of step
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(())  # float32: the values are cast to x's dtype by setitem
    order = range(step - 1, -1, -1) if reverse else range(step)

    def fill(x, w):
        parts = x.unflatten(dim, (-1, step)).unbind(dim + 1)  # each of the slice's shape
        out = torch.empty_like(x)
        for j in order:
            out[strided_index(x.dim(), dim, j, step, form)] = parts[(j + 1) % step] * w - parts[j]
        return out.type_as(x) * 2

    got, matches, graph = capture(fill, x, w)
    assert matches == 1 and calls(graph, operator.setitem) == 0 and calls(graph, torch.empty_like) == 0
    assert calls(graph, interleave) == 1
    assert torch.equal(got, fill(x, w))  # bit for bit


def test_fills_that_are_not_complete_and_alone_are_kept():
    x = torch.randn(2, 3, 8)
    half = x[..., ::2]

    def read_between(x):
        out = torch.empty_like(x)
        out.zero_()  # a use before the fill: the buffer is not fresh
        out[..., 0::2] = half * 2
        out[..., 1::2] = half * 3
        return out

    def partial(x):
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 1::2]
        return out[..., 0::2] + 1  # reads only what was written

    def broadcast(x):
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., :1]  # broadcast into the slice
        out[..., 1::2] = x[..., 1::2]
        return out

    def strided_source(x):
        out = torch.empty_like(x.transpose(0, 1))  # not contiguous: the buffer keeps x's strides
        out[..., 0::2] = x.transpose(0, 1)[..., 1::2]
        out[..., 1::2] = x.transpose(0, 1)[..., 0::2]
        return out

    def twice(x):
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 1::2]
        out[..., 0::2] = x[..., 0::2]  # the same slice again: the odd half stays unwritten
        return out[..., 0::2]

    for fn in (read_between, partial, broadcast, strided_source, twice):
        got, matches, graph = capture(fn, x)
        assert matches == 0 and calls(graph, operator.setitem) > 0, fn.__name__
        torch.testing.assert_close(got, fn(x), rtol=0, atol=0, msg=fn.__name__)


def test_wan_rope_fill_is_rewritten_in_the_compiled_model(tmp_path):
    """Both RoPE fills of every layer (query and key) become interleavings; the output matches eager."""
    model, inputs = wan(frames=3, height=8, width=8, layers=2, head_dim=32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vsparse", options=dict(sparsity="none", cache="none",
                                                                    dump_dir=str(tmp_path)), fullgraph=True)
    with torch.no_grad():
        got, expected = compiled(**inputs)[0], model(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    (graph_dir,) = sorted(d for d in tmp_path.iterdir() if d.is_dir())
    notes = json.loads((graph_dir / "analysis.json").read_text())["notes"]
    assert "4 strided fills of a fresh buffer written as one interleaving (RoPE's rotated pairs)" in notes, notes
    rewritten = (graph_dir / "rewritten.py").read_text()
    assert rewritten.count("interleave(") == 4 and "setitem" not in rewritten
