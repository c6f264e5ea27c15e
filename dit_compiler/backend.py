"""The `vsparse` torch.compile backend: parse → analyze → rewrite → split → compile → run.

parse    options (dit_compiler/options.py) and a private copy of the Dynamo graph
analyze  patterns.analyze: attention sites, token grids, block stacks, the timestep input
rewrite  passes: the dense phase and sparse attention (passes/sparse_attention.py), the block stack in the
         planner's token order (passes/stack_token_order.py), RoPE's fill as one interleaving
         (passes/interleaved_fill.py), shared values written once (passes/shared_values.py), linear + tanh-GELU
         as one product (passes/linear_gelu.py), the call record (passes/call_record.py)
split    passes/split_block_stack.py: head / stack / tail when a cache policy is on
compile  each piece with Inductor (`compile_piece`)
run      runtime/runner.py: a DiTRunner keeping state per model instance
A grad-mode graph (training, LoRA fine-tuning) is compiled dense and without the cache: the sparse op has no
backward and a reused stack would carry no gradient.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass

import dit_compiler.kernels
from dit_compiler import patterns
from dit_compiler.dump import Dump, DumpObserver, render_report
from dit_compiler.options import Options, parse_options
from dit_compiler.passes.call_record import add_call_record, insert_dense_phase
from dit_compiler.passes.interleaved_fill import rewrite_interleaved_fills
from dit_compiler.passes.linear_gelu import fuse_linear_gelus
from dit_compiler.passes.plan_reuse import add_plan_reuse
from dit_compiler.passes.shared_values import materialize_shared_values
from dit_compiler.passes.cost_model import why_cache_does_not_pay
from dit_compiler.passes.sparse_attention import rewrite_sparse_attention
from dit_compiler.passes.split_block_stack import (complete_partition, piece_example_inputs, split_block_stack,
                                                   stack_interface)
from dit_compiler.passes.stack_token_order import hoist_token_order
from dit_compiler.runtime.cache import make_policy
from dit_compiler.runtime.runner import CachedStack, DiTRunner

log = logging.getLogger("dit_compiler")
_graph_ids = itertools.count()
_warned_no_stack: list = []  # once per process: Dynamo calls the backend once per graph fragment
_warned_block_graph: list = []
_warned_dynamic_cache: list = []
DYNAMIC_CACHE_NOTE = (
    "symbolic shapes (dynamic=True): compiling the split block-stack pieces fails there (AOTAutograd's \"output spec "
    "mismatch\" on a piece; not diagnosed yet), so the graph runs whole, sparse where the rewrite put it")
BLOCK_GRAPH_NOTE = (
    "no block stack, timestep input or video token grid in this graph: it is one transformer block (regional "
    "compilation, diffusers' compile_repeated_blocks) or a piece between graph breaks, and nothing in it tells the "
    "token grid, the denoising step or the layer, so its attention stays dense. For regional compilation with sparse "
    "attention use dit_compiler.compile_repeated_blocks(transformer, **options), which recognizes the whole model "
    "first")


def _sees_part_of_a_model(analysis) -> bool:
    """Attention without anything a whole DiT graph shows: a block stack, a timestep, a token grid."""
    return bool(analysis.sites) and not analysis.stacks and analysis.timestep_input is None and not any(
        site.layout is not None for site in analysis.sites)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy whose graph we may rewrite (Inductor takes ownership of what we hand it; Dynamo keeps the original).

    Node meta is copied shallowly: fake example values are shared, not cloned. Dynamo's graph metadata comes along
    (`carry_dynamo_metadata`), but not its `grapharg` entries, which Dynamo deletes from its own graph once compiled:
    they hold weak references to the real parameters, and `torch.utils.swap_tensors` (what `Module.to()` uses for
    tensor-subclass parameters, and under `set_swap_module_params_on_conversion`) refuses a tensor that has one.
    """
    graph = torch.fx.Graph()
    value_map: dict = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    for old, new in value_map.items():
        new.meta = {key: value for key, value in old.meta.items() if key != "grapharg"}
    copy = torch.fx.GraphModule(gm, graph, gm.__class__.__name__)
    carry_dynamo_metadata(gm, copy)
    return copy


def carry_dynamo_metadata(source: torch.fx.GraphModule, target: torch.fx.GraphModule) -> None:
    """Mark `target` (a copy or split piece of Dynamo's graph) as Dynamo's, as Dynamo's DDP optimizer marks its pieces.

    AOTAutograd reads the graph's `dynamo_compile_id` meta, `_param_name_to_source` and each placeholder's
    `_dynamo_source` to tell parameters from data; without them no input is static, so CUDA graphs copy every
    parameter on every replay. Placeholders with no source of their own (values a split passes between pieces) get
    None; constants our passes registered get a source named after them.
    """
    if "dynamo_compile_id" not in source.meta:
        return
    target.meta.update(source.meta)
    sources = dict(getattr(source, "_param_name_to_source", {}))
    from torch._dynamo.source import ConstantSource

    for name, _ in itertools.chain(target.named_parameters(), target.named_buffers()):
        sources.setdefault(name, ConstantSource(f"vsparse_{name}"))
    target._param_name_to_source = sources
    by_name = {n.name: getattr(n, "_dynamo_source", None) for n in source.graph.find_nodes(op="placeholder")}
    for node in target.graph.find_nodes(op="placeholder"):
        node._dynamo_source = by_name.get(node.name)


class _KernelsCacheKey(CustomGraphPass):
    """Inductor's FX graph cache keys a compiled graph on torch, the graph and the config, not on what our ops'
    fake kernels say: after an upgrade that changed one (the block-sparse output's strides did), a cached graph
    would assert the old strides. The hash of kernels/' sources enters the key as this do-nothing post-grad pass's
    uuid. Installed only where no such pass of the user's is set, which it would replace."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return _kernels_source_hash()


@functools.lru_cache(maxsize=None)
def _kernels_source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(dit_compiler.kernels.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _inductor_config(opts: Options, dynamic: bool) -> dict:
    config = {} if opts.mode in (None, "default") else dict(torch._inductor.list_mode_options(opts.mode, dynamic))
    if torch._inductor.config.post_grad_custom_post_pass is None:
        config["post_grad_custom_post_pass"] = _KernelsCacheKey()
    return config


def _device_of(values) -> torch.device:
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def compile_piece(gm: torch.fx.GraphModule, example_inputs, config: dict):
    """Hand one graph (or split piece) to Inductor."""
    return compile_fx(gm, list(example_inputs), config_patches=config)


def _is_dynamic(gm: torch.fx.GraphModule) -> bool:
    values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    return any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(
        isinstance(d, torch.SymInt) for d in v.shape)) for v in values)


def _static_examples(tensors, example_inputs) -> tuple:
    """Example values of inputs the backend adds (the plan state): fake tensors of Dynamo's mode with static shapes.
    Real tensors would be fakified by AOTAutograd with sizes of fresh symbols that no Dynamo input has, and a guard
    Inductor puts on them (32-bit indexing on CUDA) makes Dynamo's guard building fail."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    return tuple(tensors) if fake_mode is None else tuple(fake_mode.from_tensor(t, static_shapes=True)
                                                           for t in tensors)


def _model_key_index(example_inputs) -> Optional[int]:
    """Position of the first parameter among the graph inputs: its identity tells which model instance calls."""
    return next((i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)), None)


def _requires_grad(example_inputs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def vsparse_backend(gm: torch.fx.GraphModule, example_inputs, *, options: Optional[dict] = None,
                    mode: Optional[str] = None):
    """torch.compile backend entry (`backend="vsparse"`); options as in README.md."""
    started = time.perf_counter()
    opts = parse_options(options, mode)
    gm = copy_graph_module(gm)
    analysis = patterns.analyze(gm, example_inputs)
    graph_name = f"{analysis.model}_{next(_graph_ids)}"
    dump = Dump(opts.dump_dir, graph_name) if opts.dump_dir else None
    if dump:
        dump.write_text("captured.py", gm.print_readable(print_output=False))
    config = _inductor_config(opts, _is_dynamic(gm))
    notes = list(analysis.notes)
    inputs = list(example_inputs)
    if _sees_part_of_a_model(analysis):
        notes.append(BLOCK_GRAPH_NOTE)
        if not _warned_block_graph:
            _warned_block_graph.append(True)
            log.warning("vsparse: graph %s: %s", graph_name, BLOCK_GRAPH_NOTE)

    if _requires_grad(example_inputs):
        reason = "grad mode: compiled dense and without the cache (no sparse backward)"
        log.warning("vsparse: %s; wrap inference in torch.no_grad() for sparse attention and the cache", reason)
        compiled = compile_piece(gm, inputs, config)
        if dump:
            _write_analysis(dump, graph_name, analysis, opts, {}, notes + [reason], time.perf_counter() - started,
                            default_reason=reason)
        return compiled

    # The partition is taken before the rewrite: the recognizers never saw the nodes it adds.
    partition = None
    if opts.splits_block_stack:
        if _is_dynamic(gm):
            notes.append(f"cache disabled: {DYNAMIC_CACHE_NOTE}")
            if not _warned_dynamic_cache:
                _warned_dynamic_cache.append(True)
                log.warning("vsparse: graph %s: cache disabled: %s", graph_name, DYNAMIC_CACHE_NOTE)
        elif analysis.stacks:
            partition = patterns.partition(gm, analysis)
            reason, words = why_cache_does_not_pay(
                (n for n in gm.graph.nodes if partition[n.name] == "stack"), _device_of(inputs),
                bool(config.get("triton.cudagraphs")))
            if reason and not opts.force_cache:
                partition = None
                notes.append(f"cache disabled: {reason}")
                log.info("vsparse: graph %s: %s", graph_name, reason)
            elif words:
                notes.append(f"cache kept: {words}" + (" (force_cache)" if reason else ""))
        else:
            notes.append("cache disabled: no transformer block stack recognized")
            if not _warned_no_stack:
                _warned_no_stack.append(True)
                log.warning("vsparse: cache=%r asked for, but graph %s holds no transformer block stack, so nothing "
                            "is cached (graph breaks split the stack across graphs: a diffusers cache hook from "
                            "enable_cache does that; compile with fullgraph=True to find them)", opts.cache, graph_name)

    timestep = next((n for n in gm.graph.find_nodes(op="placeholder") if n.name == analysis.timestep_input), None)
    dense, t_max = insert_dense_phase(gm, timestep, opts.dense_steps)
    decisions, densities, masks = [], [], []
    if opts.rewrites_attention:
        decisions, densities, masks = rewrite_sparse_attention(
            gm, analysis, opts, dense if 0 < opts.dense_steps < 1 else None, _device_of(inputs),
            collect_masks=dump is not None, cuda_graphs=bool(config.get("triton.cudagraphs")))
    site_names = [d.node for d in decisions if d.rewritten]
    entry = analysis.stacks[0].entry[0] if analysis.stacks else None
    if site_names:
        order = hoist_token_order(gm, analysis, None if partition is None else complete_partition(gm, partition))
        notes.append(order.note)
        entry = order.entry or entry
    # After the token order, which follows RoPE's fill through its setitems.
    fills = rewrite_interleaved_fills(gm)
    if fills:
        notes.append(f"{fills} strided fills of a fresh buffer written as one interleaving (RoPE's rotated pairs)")
    shared = materialize_shared_values(gm, analysis)
    if shared:
        notes.append(f"{shared} values the blocks share written out once")
    gelus = fuse_linear_gelus(gm)
    if gelus:
        notes.append(f"{gelus} linear + tanh-GELU pairs as one product with the GELU in its epilogue")
    outputs = add_call_record(gm, t_max, dense, site_names, densities, masks)
    if site_names:
        plan_state, note = add_plan_reuse(gm, t_max, opts.plan_every)
        notes.append(note)
        if plan_state is not None:
            outputs.plan_state, outputs.plan_init = plan_state.output, plan_state.init
            inputs += _static_examples(plan_state.init(), inputs)
    if dump:
        dump.write_text("rewritten.py", gm.print_readable(print_output=False))
    carry_dynamo_metadata(gm, gm)  # sources for the constants the rewrite registered

    runner = DiTRunner(None, outputs, timestep_index=analysis.timestep_index,
                       model_key_index=_model_key_index(example_inputs),
                       copies_outputs=bool(config.get("triton.cudagraphs")),
                       observers=[DumpObserver(dump, site_names)] if dump else [])
    if partition is None:
        runner.compiled = compile_piece(gm, inputs, config)
    else:
        runner.compiled = _compile_split(gm, partition, entry, opts, config, inputs, runner, notes)
    if dump:
        _write_analysis(dump, graph_name, analysis, opts, {d.node: d for d in decisions}, notes,
                        time.perf_counter() - started)
    log.info("vsparse: %s compiled in %.1f s: %d of %d attention sites sparse%s%s", graph_name,
             time.perf_counter() - started, len(site_names), len(analysis.sites),
             ", block stack cached" if partition is not None else "",
             " (one block or a graph-break piece: see dit_compiler.compile_repeated_blocks)"
             if _sees_part_of_a_model(analysis) else "")
    return runner


def _compile_split(gm, partition, entry: str, opts, config, inputs, runner, notes) -> torch.fx.GraphModule:
    split = split_block_stack(gm, partition)
    piece_inputs = piece_example_inputs(split.parent, inputs)
    interface = stack_interface(split.pieces["stack"], entry, piece_inputs["stack"])
    notes.extend(interface.notes)
    policy = make_policy(opts.cache, opts.cache_threshold)
    for name, piece in split.pieces.items():
        carry_dynamo_metadata(gm, piece)
        fn = compile_piece(piece, piece_inputs[name], config)
        module = (CachedStack(fn, runner, policy, interface.entry_index, interface.like_entry,
                              interface.single_output, start=opts.cache_start,
                              passed_through=interface.passed_through) if name == "stack" else _Compiled(fn))
        setattr(split.parent, f"submod_{name}", module)
    return split.parent


class _Compiled(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _write_analysis(dump: Dump, graph_name: str, analysis, opts: Options, decisions: dict, notes: list[str],
                    seconds: float, default_reason: Optional[str] = None) -> None:
    sites = []
    for site in analysis.sites:
        row = dataclasses.asdict(site)
        decision = decisions.get(site.node)
        row["rewritten"] = bool(decision and decision.rewritten)
        row["decision_reason"] = decision.reason if decision else default_reason or (
            "sparsity='none'" if not opts.rewrites_attention else site.reason)
        sites.append(row)
    data = analysis.to_json()
    data["sites"] = sites
    data["options"] = dataclasses.asdict(opts)
    data["notes"] = notes
    data["backend_seconds"] = round(seconds, 3)
    dump.write_json("analysis.json", data)
    notes = notes + [f"backend + Inductor compile: {seconds:.1f} s"]
    dump.write_text("report.md", render_report(analysis.model, graph_name, dataclasses.asdict(opts), sites,
                                               data["stacks"], notes))


def vsparse(**options: Any):
    """`torch.compile(model, backend=dit_compiler.vsparse(sparsity="draft", density=0.25, ...))`."""
    parse_options(options)  # fail at configuration time, not at the first call

    def backend(gm, example_inputs):
        return vsparse_backend(gm, example_inputs, options=options)

    backend.__name__ = "vsparse"
    return backend
