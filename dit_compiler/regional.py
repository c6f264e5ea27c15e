"""Regional compilation with sparse attention: `dit_compiler.compile_repeated_blocks(transformer, **options)`.

diffusers' `transformer.compile_repeated_blocks(backend="vsparse")` hands Dynamo one transformer block at a time. A
block's graph holds no patch embedding (so no token grid), no timestep and no layer index, so the backend keeps its
attention dense and says why (backend.py). This entry gives the blocks the whole model's analysis:

recognize  at the first call with new input shapes, a copy of the model whose parameters and buffers are `meta`
           tensors (no data copied, nothing computed) is captured whole by Dynamo on `meta` copies of the inputs
           and analyzed by `patterns.analyze`, as the backend analyzes a whole-model graph: sites, token layouts,
           block stacks, layers, the timestep input. The real call then runs the compiled blocks: the model's
           compute runs once.
plan       the repeated blocks are the modules whose class the model's `_repeated_blocks` names (as diffusers
           selects them), or, for a model that names none (CogVideoX), the blocks of the recognized main block
           stacks. Each is placed by its module path (`<stack>.<i>`) in a recognized stack and gets that block's
           whole-model sites, in graph order. A block is sparse when its layer is past `dense_layers` and a site of it is eligible; the rest
           (the leading layers, blocks outside a main stack) are dense.
compile    one Dynamo backend per role and plan, shared process-wide (Dynamo matches compiled code to its backend,
           so blocks of one class under one plan share one artifact, and a new layout compiles anew even when the
           block's shapes are unchanged, e.g. height and width swapped). Sparse: the block graph's sites are matched
           to the plan by order and shape, rewritten by `passes/sparse_attention.py` with the whole model's layout,
           and the dense phase becomes the graph's last input. Dense: plain Inductor.
run        the model's forward pre-hook computes the dense phase on the device from its timestep (no host read, no
           recompile); block runners (runtime/regional.py) feed it to their graph and tell the model from the block's
           parameters; the forward hook stacks one call record per model call for `dit_compiler.stats`.

The cache is off (refused when asked for): EasyCache skips the block stack as one piece (head / stack / tail of one
graph), and under regional compilation no graph holds the stack, the model's own Python loop runs the blocks one by
one.
"""
from __future__ import annotations

import copy
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from dit_compiler import backend as _backend
from dit_compiler import patterns
from dit_compiler.options import Options, parse_options
from dit_compiler.passes.call_record import add_call_record
from dit_compiler.passes.sparse_attention import rewrite_sparse_attention
from dit_compiler.patterns.types import AttentionSite, GraphAnalysis
from dit_compiler.runtime.regional import OWNERS, BlockRunner, CallHistory, ModelCall
from dit_compiler.runtime.state import dense_phase, read_timestep

log = logging.getLogger("dit_compiler")
_LAYOUT_SIZES = ("frames", "height", "width", "text_before", "text_after")


def compile_repeated_blocks(transformer: torch.nn.Module, **options: Any) -> torch.nn.Module:
    """Compile the repeated blocks of `transformer` (the classes its `_repeated_blocks` names, else the blocks of its
    recognized block stacks) with vsparse, sparse attention placed by a whole-model analysis. Options as `backend="vsparse"` takes them, except `cache` (off here,
    refused when asked for) and `dump_dir` (not written yet). Returns `transformer`, compiled in place; calling it again replaces the
    earlier set-up."""
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"compile_repeated_blocks expects the transformer (a torch.nn.Module), got "
                        f"{type(transformer).__name__}")
    if options.get("dump_dir") is not None:
        raise ValueError("vsparse option 'dump_dir' is not supported by compile_repeated_blocks yet: compile the "
                         "model whole (torch.compile(transformer, backend='vsparse')) for a dump")
    opts = parse_options({"cache": "none", **options})  # the default cache needs the whole stack in one graph
    if opts.splits_block_stack:
        raise ValueError(
            f"vsparse option cache={opts.cache!r} cannot work under regional compilation: the cache skips the whole "
            f"block stack as one compiled piece, and compile_repeated_blocks compiles one block at a time while the "
            f"model's own Python loop runs them, so no graph holds the stack. Use torch.compile(transformer, "
            f"backend='vsparse', options={{'cache': {opts.cache!r}, ...}}) for the cache")
    names = getattr(transformer, "_repeated_blocks", None)
    blocks = None  # found in the first whole-model analysis
    if names:
        blocks = {path: m for path, m in transformer.named_modules() if type(m).__name__ in names}
        if not blocks:
            raise ValueError(f"{type(transformer).__name__} holds no module of its `_repeated_blocks` classes {names}")
    earlier = _REGIONAL.pop(transformer, None)
    if earlier is not None:
        earlier.remove()
    _REGIONAL[transformer] = RegionalCompilation(transformer, blocks, opts)
    return transformer


_REGIONAL: "weakref.WeakKeyDictionary[torch.nn.Module, RegionalCompilation]" = weakref.WeakKeyDictionary()


@dataclass
class BlockPlan:
    path: str
    layer: Optional[int]
    sites: list[AttentionSite]  # the whole-model sites of this block, in graph order
    sparse: bool
    reason: str  # why dense, or what goes sparse


@dataclass
class Plan:
    """What one input signature's whole-model analysis decided for the blocks."""

    analysis: GraphAnalysis
    timestep_source: Any  # Dynamo's source of the timestep input (an argument of the model's call), or None
    blocks: dict[str, BlockPlan]
    backends: dict[str, "BlockBackend"]  # per block path
    histories: dict = field(default_factory=dict)  # CallHistory per tuple of sparse site names


class RegionalCompilation:
    """The set-up of one model: its hooks, its blocks, a plan per input signature and the call in flight."""

    def __init__(self, model: torch.nn.Module, blocks: Optional[dict[str, torch.nn.Module]], opts: Options) -> None:
        self.blocks: dict[str, torch.nn.Module] = {}
        self.opts = opts
        self.plans: dict[tuple, Plan] = {}
        self.installed: dict[str, BlockBackend] = {}
        self.current: Optional[ModelCall] = None
        if blocks is not None:
            self._add_blocks(blocks)
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after, with_kwargs=True, always_call=True)]

    def _add_blocks(self, blocks: dict[str, torch.nn.Module]) -> None:
        self.blocks = blocks
        for path, block in blocks.items():
            OWNERS.add(block, self, path)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        OWNERS.remove(self)
        for block in self.blocks.values():
            block._compiled_call_impl = None  # what nn.Module.compile set: the block runs eagerly again

    def _before(self, model, args, kwargs):
        key = _signature(args, kwargs)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._plan(model, args, kwargs)
        for path, block in self.blocks.items():
            chosen = plan.backends[path]
            if self.installed.get(path) is not chosen:
                block.compile(backend=chosen, fullgraph=True, dynamic=False)
                self.installed[path] = chosen
        device = _model_device(model)
        timestep = _argument(plan.timestep_source, args, kwargs)
        if isinstance(timestep, torch.Tensor):
            t_max = read_timestep(timestep).to(device)
            dense = dense_phase(t_max, self.opts.dense_steps)
        else:  # no timestep: every call is a step, dense only with dense_steps=1 (as the whole-model backend)
            t_max, dense = None, torch.full((), self.opts.dense_steps >= 1, dtype=torch.bool, device=device)
        self.current = ModelCall(plan, t_max, dense)
        return None

    def _after(self, model, args, kwargs, output):
        call, self.current = self.current, None
        if call is None:
            return None
        plan = call.plan
        names = tuple(plan.blocks[path].sites[i].node for path, rewritten, _ in call.blocks for i in rewritten)
        history = plan.histories.get(names)
        if history is None:
            history = plan.histories[names] = CallHistory(list(names))
        history.record(next(model.parameters()), call)
        return None

    def _plan(self, model, args, kwargs) -> Plan:
        started = time.perf_counter()
        gm, example_inputs = self._capture(model, args, kwargs)
        analysis = patterns.analyze(gm, example_inputs)
        timestep = next((n for n in gm.graph.find_nodes(op="placeholder") if n.name == analysis.timestep_input), None)
        source = getattr(timestep, "_dynamo_source", None)
        if timestep is not None and not isinstance(_argument(source, args, kwargs), torch.Tensor):
            log.warning("vsparse: the timestep input %s of %s is not a tensor argument of its call; every call "
                        "counts as a step and dense_steps keeps none dense", source, analysis.model)
            source = None
        if not self.blocks:
            found = {f"{stack.name}.{i}": model.get_submodule(f"{stack.name}.{i}")
                     for stack in analysis.stacks for i in range(len(stack.blocks))}
            if not found:
                raise ValueError(f"{analysis.model} names no `_repeated_blocks` and holds no recognized block stack: "
                                 f"nothing to compile regionally; compile it whole with torch.compile(transformer, "
                                 f"backend='vsparse')")
            self._add_blocks(found)
        blocks = {path: self._block_plan(path, analysis) for path in self.blocks}
        backends = {path: _block_backend(self.opts, block) for path, block in blocks.items()}
        sparse = [p for p in blocks.values() if p.sparse]
        log.info("vsparse: %s recognized whole in %.1f s for regional compilation: %d of %d repeated blocks sparse; "
                 "dense: %s", analysis.model, time.perf_counter() - started, len(sparse), len(blocks),
                 "; ".join(f"{p.path} ({p.reason})" for p in blocks.values() if not p.sparse) or "none")
        return Plan(analysis, source, blocks, backends)

    def _capture(self, model, args, kwargs) -> tuple[torch.fx.GraphModule, list]:
        """Dynamo's whole-model graph on a copy with `meta` parameters, buffers and inputs (nothing is computed)."""
        memo: dict = {id(self): self}  # the hooks' owner is not copied
        for tensor in [*model.parameters(), *model.buffers()]:
            memo[id(tensor)] = _meta(tensor)
        for module in model.modules():  # compiled blocks run the original block: the copy runs its own forward
            if module._compiled_call_impl is not None:
                memo[id(module._compiled_call_impl)] = None
        twin = copy.deepcopy(model, memo)
        for hooks in (twin._forward_pre_hooks, twin._forward_hooks, twin._forward_pre_hooks_with_kwargs,
                      twin._forward_hooks_with_kwargs, twin._forward_hooks_always_called):
            for handle in self.handles:
                hooks.pop(handle.id, None)
        captured = []

        def record(gm, example_inputs):
            captured.append((gm, list(example_inputs)))
            return gm.forward

        meta_args, meta_kwargs = pytree.tree_map_only(torch.Tensor, _meta, (args, kwargs))
        try:
            with torch.no_grad():
                torch.compile(twin, backend=record, fullgraph=True, dynamic=False)(*meta_args, **meta_kwargs)
        except Exception as error:
            raise RuntimeError(f"compile_repeated_blocks: {type(model).__name__} could not be captured whole "
                               f"(fullgraph) for recognition: {error}") from error
        return captured[0]

    def _block_plan(self, path: str, analysis: GraphAnalysis) -> BlockPlan:
        stack, _, index = path.rpartition(".")
        in_stack = index.isdigit() and any(s.name == stack and int(index) < len(s.blocks) for s in analysis.stacks)
        sites = [s for s in analysis.sites if in_stack and s.stack == stack and s.block == int(index)]
        layer = sites[0].layer if sites else None
        eligible = [s for s in sites if s.eligible]
        if not in_stack:
            reason = "not a block of a recognized main block stack"
        elif not self.opts.rewrites_attention:
            reason = "sparsity='none'"
        elif self.opts.dense_steps >= 1:
            reason = "dense_steps=1: every step is dense"
        elif layer is not None and layer < self.opts.dense_layers:
            reason = f"layer {layer} < dense_layers={self.opts.dense_layers}"
        elif not eligible:
            reason = "; ".join(s.reason for s in sites) or "no attention site"
        else:
            return BlockPlan(path, layer, sites, True, f"{len(eligible)} eligible sites")
        return BlockPlan(path, layer, sites, False, reason)


def _signature(args, kwargs) -> tuple:
    """What decides a new whole-model analysis: tensor shapes, dtypes and devices, and the other arguments' values
    (floats only by type: a Python timestep changes every call)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        elif isinstance(leaf, (bool, int, str, type(None))):
            key.append(leaf)
        else:
            key.append(type(leaf))
    return tuple(key), str(spec)


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    meta = tensor.detach().to("meta")
    return torch.nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else meta


def _model_device(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _argument(source, args, kwargs):
    """The value Dynamo's `source` names among the call's arguments (the capture compiles `Module._call_impl`, whose
    locals are `args` and `kwargs`); None where it names something else."""
    from torch._dynamo.source import DictGetItemSource, GetItemSource, LocalSource

    if isinstance(source, LocalSource):
        return {"args": args, "kwargs": kwargs}.get(source.local_name)
    if isinstance(source, (GetItemSource, DictGetItemSource)) and not getattr(source, "index_is_slice", False):
        base = _argument(source.base, args, kwargs)
        try:
            return None if base is None else base[source.index]
        except (KeyError, IndexError, TypeError):
            return None
    return None


def _site_key(site: AttentionSite) -> tuple:
    layout = site.layout
    sizes = None if layout is None else tuple(getattr(layout, k) for k in _LAYOUT_SIZES)
    return site.eligible, tuple(site.q_shape), tuple(site.kv_shape), site.head_dim, site.mask, sizes


_BACKENDS: dict = {}


def _block_backend(opts: Options, plan: BlockPlan) -> "BlockBackend":
    """One backend per options, role and site plan, process-wide: blocks (and models) that agree share it, and with
    it Dynamo's compiled artifact."""
    key = (opts, tuple(_site_key(s) for s in plan.sites)) if plan.sparse else (opts, None)
    chosen = _BACKENDS.get(key)
    if chosen is None:
        chosen = _BACKENDS[key] = BlockBackend(opts, plan.sites if plan.sparse else None)
    return chosen


class BlockBackend:
    """The Dynamo backend of one group of blocks: dense (`sites` None: plain Inductor) or sparse with the whole
    model's sites of a representative block."""

    def __init__(self, opts: Options, sites: Optional[list[AttentionSite]]) -> None:
        self.opts = opts
        self.sites = sites
        self.__name__ = "vsparse_block"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        started = time.perf_counter()
        opts = self.opts
        gm = _backend.copy_graph_module(gm)
        inputs = list(example_inputs)
        config = _backend._inductor_config(opts, _backend._is_dynamic(gm))
        if self.sites is None:
            return _backend.compile_piece(gm, inputs, config)
        if _backend._requires_grad(inputs):
            log.warning("vsparse: grad mode: block graph compiled dense (no sparse backward); wrap inference in "
                        "torch.no_grad() for sparse attention")
            return _backend.compile_piece(gm, inputs, config)
        analysis = patterns.analyze(gm, inputs)
        analysis.sites = _carry_plan(analysis.sites, self.sites)
        device = _backend._device_of(inputs)
        dense, dense_example = _add_dense_input(gm, device)
        decisions, densities, _ = rewrite_sparse_attention(
            gm, analysis, opts, dense if 0 < opts.dense_steps < 1 else None, device,
            cuda_graphs=bool(config.get("triton.cudagraphs")))
        rewritten = [i for i, d in enumerate(decisions) if d.rewritten]
        outputs = add_call_record(gm, None, dense, [decisions[i].node for i in rewritten], densities, [])
        _backend.carry_dynamo_metadata(gm, gm)
        key_index = _backend._model_key_index(inputs)
        if key_index is None:
            raise ValueError(f"block graph of {analysis.model} has no parameter input to tell its model by")
        compiled = _backend.compile_piece(gm, inputs + [dense_example], config)
        log.info("vsparse: %s block graph compiled in %.1f s: %d of %d attention sites sparse%s", analysis.model,
                 time.perf_counter() - started, len(rewritten), len(decisions),
                 "".join(f"; {d.node} dense: {d.reason}" for d in decisions if not d.rewritten))
        return BlockRunner(compiled, outputs, rewritten, key_index, always_dense=opts.dense_steps >= 1,
                           copies_outputs=bool(config.get("triton.cudagraphs")))


def _carry_plan(block_sites: list[AttentionSite], plan: list[AttentionSite]) -> list[AttentionSite]:
    """The block graph's sites with the whole model's layout and eligibility, matched by order within the block;
    a site that does not match (count, shapes, self-attention, mask) stays dense with the reason."""
    if len(block_sites) != len(plan):
        why = f"the block graph holds {len(block_sites)} attention sites, the whole model's block {len(plan)}"
        return [_dense(s, why) for s in block_sites]
    carried = []
    for site, whole in zip(block_sites, plan):
        if not whole.eligible:
            carried.append(_dense(site, f"whole model: {whole.reason}"))
        elif not site.self_attention or list(site.q_shape) != list(whole.q_shape) or \
                list(site.kv_shape) != list(whole.kv_shape):
            carried.append(_dense(site, f"does not match the whole model's site {whole.node} (shapes {site.q_shape}"
                                        f", {site.kv_shape} against {whole.q_shape}, {whole.kv_shape})"))
        elif site.mask != "none" or whole.mask != "none":
            carried.append(_dense(site, f"mask {whole.mask} in the whole model, {site.mask} in the block graph: "
                                        f"masks are not carried into block graphs yet"))
        elif not all(isinstance(getattr(whole.layout, k), int) for k in _LAYOUT_SIZES):
            carried.append(_dense(site, "symbolic token grid: regional compilation takes static shapes"))
        else:
            site.layout, site.layer, site.eligible = whole.layout, None, True
            site.reason = f"whole model's site {whole.node}: {whole.reason}"
            carried.append(site)
    return carried


def _dense(site: AttentionSite, reason: str) -> AttentionSite:
    site.eligible, site.reason = False, reason
    return site


def _add_dense_input(gm: torch.fx.GraphModule, device: torch.device) -> tuple[torch.fx.Node, torch.Tensor]:
    """A last placeholder for the dense phase (0-dim bool), with a fake example value of the graph's fake mode."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    fake_mode = next(v.fake_mode for v in (n.meta.get("example_value") for n in placeholders)
                     if hasattr(v, "fake_mode"))
    example = torch.zeros((), dtype=torch.bool, device=device)
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder("vsparse_dense")
    node.meta["example_value"] = fake_mode.from_tensor(example)
    return node, example


__all__ = ["compile_repeated_blocks"]
