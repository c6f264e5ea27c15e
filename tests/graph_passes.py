"""Running one pass on a captured Dynamo graph, and compiling a model with the backend's dump, for the pass tests."""
import json

import torch


def capture(rewrite, fn, *args):
    """fn's Dynamo graph with `rewrite(gm)` applied, run as captured, under no_grad: (outputs, what `rewrite`
    returned, the rewritten graph)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["result"] = rewrite(gm)
        seen["graph"] = gm.graph
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, seen["result"], seen["graph"]


def compile_dumped(model, inputs, tmp_path, **options):
    """The model compiled by vsparse with a dump in tmp_path: (its output, the eager output, the dump's notes, the
    rewritten graphs' code)."""
    torch._dynamo.reset()
    tmp_path.mkdir(exist_ok=True)
    compiled = torch.compile(model, backend="vsparse", options=dict(options, dump_dir=str(tmp_path)), fullgraph=True)
    with torch.no_grad():
        got, expected = compiled(**inputs)[0], model(**inputs)[0]
    graph_dirs = sorted(d for d in tmp_path.iterdir() if d.is_dir())
    notes = [n for d in graph_dirs for n in json.loads((d / "analysis.json").read_text())["notes"]]
    rewritten = "".join((d / "rewritten.py").read_text() for d in graph_dirs)
    return got, expected, notes, rewritten
