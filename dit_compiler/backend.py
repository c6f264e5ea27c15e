"""The `vsparse` torch.compile backend: recognize, rewrite, split, compile with Inductor, wrap in the runner."""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Optional

import torch
from torch._inductor.compile_fx import compile_fx

from dit_compiler import patterns
from dit_compiler.dump import Dump, render_report
from dit_compiler.options import Options, parse_options
from dit_compiler.passes.sparse_attention import EXTRA_OUTPUT, rewrite_sparse_attention
from dit_compiler.passes.split_block_stack import PIECES, split_block_stack
from dit_compiler.runtime.easycache import EasyCache
from dit_compiler.runtime.runner import CachedStack, DiTRunner, SparseSiteOutputs

_graph_ids = itertools.count()


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy whose graph we may rewrite (Inductor takes ownership of what we hand it; Dynamo keeps the original).

    Node meta is copied shallowly: fake example values are shared, not cloned.
    """
    graph = torch.fx.Graph()
    value_map: dict = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    for old, new in value_map.items():
        new.meta = dict(old.meta)
    return torch.fx.GraphModule(gm, graph, gm.__class__.__name__)


def _inductor_config(opts: Options, dynamic: bool) -> dict:
    if opts.mode in (None, "default"):
        return {}
    return torch._inductor.list_mode_options(opts.mode, dynamic)


def _device_of(values) -> torch.device:
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _example_value(node: torch.fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))


def _add_input(gm: torch.fx.GraphModule, name: str, example) -> torch.fx.Node:
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    node.meta["example_value"] = example
    return node


def _add_outputs(gm: torch.fx.GraphModule, extra: list[torch.fx.Node]) -> int:
    """Append `extra` to the graph's output tuple; return how many outputs the model itself has."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0]
    if not isinstance(values, (tuple, list)):
        raise TypeError(f"expected the captured graph to return a tuple, got {type(values).__name__}")
    output.args = (tuple(values) + tuple(extra),)
    gm.recompile()
    return len(values)


def _complete_partition(gm: torch.fx.GraphModule, partition: dict[str, str]) -> dict[str, str]:
    """Place nodes our passes added: each goes to the latest piece among its inputs, which keeps the split acyclic."""
    rank = {p: i for i, p in enumerate(PIECES)}
    complete = dict(partition)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node.name in complete:
            continue
        inputs = [complete.get(a.name, "head") for a in node.all_input_nodes if a.op != "placeholder"]
        complete[node.name] = max(inputs, key=rank.__getitem__, default="head")
    return complete


def _piece_example_inputs(parent: torch.fx.GraphModule, example_inputs: list) -> dict[str, list]:
    """Fake example values for each split piece, propagated through the parent graph.

    Uses the fake mode Dynamo gives the backend (not the one of the captured nodes' example values) and keeps each
    input's symbolic sizes, as Dynamo's DDP optimizer does when it compiles split pieces.
    """
    from torch._dynamo.utils import to_fake_tensor
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class Propagate(FakeTensorProp):
        def get_attr(self, target, args, kwargs):  # our constant buffers (e.g. window permutations) are real
            return fake_mode.from_tensor(super().get_attr(target, args, kwargs), static_shapes=True)

    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    fake_args = [to_fake_tensor(x, fake_mode) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    Propagate(parent, fake_mode).propagate_dont_convert_inputs(*fake_args)
    return {node.target.removeprefix("submod_"): [a.meta["val"] for a in node.args]
            for node in parent.graph.nodes if node.op == "call_module"}


def _compile(gm: torch.fx.GraphModule, example_inputs, config: dict):
    return compile_fx(gm, list(example_inputs), config_patches=config)


def vsparse_backend(gm: torch.fx.GraphModule, example_inputs, *, options: Optional[dict] = None,
                    mode: Optional[str] = None):
    """torch.compile backend entry (`backend="vsparse"`); `options` as in DESIGN.md / README."""
    started = time.perf_counter()
    opts = parse_options(options, mode)
    gm = copy_graph_module(gm)
    analysis = patterns.analyze(gm, example_inputs)
    graph_name = f"{analysis.model}_{next(_graph_ids)}"
    dump = Dump(opts.dump_dir, graph_name) if opts.dump_dir else None
    if dump:
        dump.write_text("captured.py", gm.print_readable(print_output=False))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_args = [_example_value(n) for n in placeholders]
    dynamic = any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(
        isinstance(d, torch.SymInt) for d in v.shape)) for v in fake_args)
    notes = list(analysis.notes)

    # Partition first: the rewrite adds nodes the recognizers never saw.
    partition = None
    if opts.splits_block_stack:
        if analysis.stacks:
            partition = patterns.partition(gm, analysis)
        else:
            notes.append("cache disabled: no transformer block stack recognized")

    decisions, sites_out, uses_flag, extra_outputs = {}, None, False, []
    if opts.rewrites_attention:
        device = _device_of(example_inputs)
        fake_mode = torch._guards.detect_fake_mode(fake_args)
        flag = torch.tensor(False, device=device)
        dense_flag = _add_input(gm, "vsparse_dense", fake_mode.from_tensor(flag) if fake_mode else flag)
        site_decisions, densities, masks = rewrite_sparse_attention(gm, analysis, opts, dense_flag, device,
                                                                    collect_stats=dump is not None)
        decisions = {d.node: d for d in site_decisions}
        uses_flag = any(d.rewritten for d in site_decisions)
        if uses_flag and dump:
            extra_outputs = densities + masks
            sites_out = SparseSiteOutputs(names=[d.node for d in site_decisions if d.rewritten],
                                          start=len(next(n for n in gm.graph.nodes if n.op == "output").args[0]))
        if not uses_flag:
            gm.graph.erase_node(dense_flag)
            gm.recompile()
    num_user = _add_outputs(gm, extra_outputs)
    if dump:
        dump.write_text("rewritten.py", gm.print_readable(print_output=False))

    config = _inductor_config(opts, dynamic)
    runner_args = dict(num_user_outputs=num_user, timestep_index=analysis.timestep_index,
                       dense_steps=opts.dense_steps, uses_dense_flag=uses_flag, sites=sites_out, dump=dump)
    inputs = list(example_inputs)
    if uses_flag:
        inputs.append(torch.tensor(False, device=_device_of(inputs)))
    if partition is not None:
        runner = _compile_split(gm, _complete_partition(gm, partition), analysis, opts, config, inputs,
                                runner_args, notes)
    else:
        runner = DiTRunner(compiled=_compile(gm, inputs, config), **runner_args)

    if dump:
        _write_analysis(dump, graph_name, analysis, opts, decisions, notes, time.perf_counter() - started)
    return runner


def _compile_split(gm, partition, analysis, opts, config, example_inputs, runner_args, notes) -> DiTRunner:
    split = split_block_stack(gm, partition)
    piece_inputs = _piece_example_inputs(split.parent, example_inputs)
    runner = DiTRunner(compiled=split.parent, cache=EasyCache(opts.cache_threshold), **runner_args)
    stack = split.pieces["stack"]  # read before compiling: Inductor rewrites a single output into a tuple
    stack_inputs = [n.name for n in stack.graph.nodes if n.op == "placeholder"]
    entry = analysis.stacks[0].entry[0]
    if entry not in stack_inputs:
        raise RuntimeError(f"stack entry {entry} is not an input of the stack piece ({stack_inputs[:8]}...)")
    entry_index = stack_inputs.index(entry)
    entry_shape = piece_inputs["stack"][entry_index].shape
    outputs = next(n for n in stack.graph.nodes if n.op == "output").args[0]
    single_output = not isinstance(outputs, (tuple, list))
    outputs = [outputs] if single_output else list(outputs)
    like_entry = [getattr(_example_value(o), "shape", None) == entry_shape for o in outputs]
    for o, like in zip(outputs, like_entry):
        if not like and not o.meta.get(EXTRA_OUTPUT):  # our per-site mask outputs are not logged on skipped steps
            notes.append(f"cache: stack output {o.name} is not shaped like the entry {entry}; a skipped step reuses "
                         "its last computed value as is")
    for name, piece in split.pieces.items():
        fn = _compile(piece, piece_inputs[name], config)
        module = CachedStack(fn, runner, entry_index, like_entry, single_output) if name == "stack" else _Compiled(fn)
        setattr(split.parent, f"submod_{name}", module)
    return runner


class _Compiled(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _write_analysis(dump: Dump, graph_name: str, analysis, opts: Options, decisions: dict, notes: list[str],
                    seconds: float) -> None:
    sites = []
    for site in analysis.sites:
        row = dataclasses.asdict(site)
        decision = decisions.get(site.node)
        row["rewritten"] = bool(decision and decision.rewritten)
        row["decision_reason"] = decision.reason if decision else (
            "sparsity='none'" if not opts.rewrites_attention else site.reason)
        sites.append(row)
    data = analysis.to_json()
    data["sites"] = sites
    data["options"] = dataclasses.asdict(opts)
    data["notes"] = notes
    data["backend_seconds"] = round(seconds, 3)
    dump.write_json("analysis.json", data)
    dump.write_text("report.md", render_report(analysis.model, graph_name, dataclasses.asdict(opts), sites,
                                               data["stacks"], notes + [f"backend + Inductor compile: {seconds:.1f} s"]))


def vsparse(**options: Any):
    """`torch.compile(model, backend=dit_compiler.vsparse(sparsity="draft", density=0.25, ...))`."""
    parse_options(options)  # fail at configuration time, not at the first call

    def backend(gm, example_inputs):
        return vsparse_backend(gm, example_inputs, options=options)

    backend.__name__ = "vsparse"
    return backend
