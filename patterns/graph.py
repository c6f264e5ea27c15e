"""Helpers every recognizer shares: op names, sizes as sympy, placeholder kinds, module paths, the dataflow DAG.

Nothing here looks at model, class or parameter names: only ops, shapes and Dynamo's node metadata.
"""
from __future__ import annotations

import operator
import re
import sys
from typing import Any, Iterable, Optional

import networkx as nx
import sympy
import torch
import torch.fx as fx

from .types import DimRef, Size

CONV_OPS = {"conv1d", "conv2d", "conv3d"}
# Ops that return their input's values unchanged apart from dtype, memory layout or an identity in eval mode.
PASSTHROUGH_OPS = {
    "contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "double", "type", "type_as", "dropout",
    "alias",
}
# Ops that only re-view the same elements in row-major order (the shapes tell where dims go).
# Inductor's size hint for data-dependent sizes (torch._inductor.config.unbacked_symint_fallback).
_UNBACKED_HINT = 8192
RESHAPE_OPS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze"}


def op_name(node: fx.Node) -> Optional[str]:
    """The op a call node performs, the same for `torch.add`, `operator.add` and `Tensor.add` ("add")."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if node.target in (operator.invert,):
            return "bitwise_not"
        name = getattr(node.target, "__name__", None)
        return name.rstrip("_") if name in ("and_", "or_", "not_") else name
    return None


def einsum_spec(node: fx.Node) -> Optional[tuple[list[str], str, list[Any]]]:
    """(operand subscripts, output subscripts, operands) of an einsum with explicit subscripts, else None."""
    if op_name(node) != "einsum" or not node.args or not isinstance(node.args[0], str):
        return None
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    match = re.fullmatch(r"([a-zA-Z,]+)->([a-zA-Z]*)", equation.replace(" ", ""))
    if match is None:
        return None  # implicit output or "..." broadcasting
    inputs = match.group(1).split(",")
    return (inputs, match.group(2), operands) if len(inputs) == len(operands) else None


def tensor_of(node: Any) -> Optional[torch.Tensor]:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` of a call, whether it was passed by position or keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if index < len(node.args) else default


class Sizes:
    """Sizes as sympy expressions, plus their example values (hints) to order them when they are symbolic."""

    def __init__(self, gm: fx.GraphModule):
        self.var_to_val: dict = {}
        for node in gm.graph.nodes:
            env = _shape_env(node.meta.get("example_value"))
            if env is not None:
                # torch >= 2.13 renamed the map of symbols to their example values.
                self.var_to_val = getattr(env, "backed_var_to_val", None) or env.var_to_val
                break

    @staticmethod
    def expr(size: Any) -> sympy.Expr:
        if isinstance(size, fx.Node):
            size = size.meta.get("example_value")
        if isinstance(size, torch.SymInt):
            return sympy.sympify(size.node.expr)
        if isinstance(size, (int, sympy.Expr)):
            return sympy.sympify(size)
        raise TypeError(f"not a size: {size!r}")

    @staticmethod
    def shape(node: fx.Node) -> list[sympy.Expr]:
        return [Sizes.expr(s) for s in tensor_of(node).shape]

    def hint(self, expr: sympy.Expr) -> int:
        """The example value of a size. Data-dependent (unbacked) sizes have none: they take Inductor's own
        fallback for them, which only orders sizes, as every hint does (it never proves anything)."""
        value = sympy.sympify(expr).xreplace(self.var_to_val)
        if not self.hinted(expr):
            value = value.xreplace({s: _UNBACKED_HINT for s in value.free_symbols})
        return int(value)

    def hinted(self, expr: sympy.Expr) -> bool:
        """Whether the size has an example value (data-dependent sizes have none)."""
        return not sympy.sympify(expr).xreplace(self.var_to_val).free_symbols

    @staticmethod
    def equal(a: Any, b: Any) -> bool:
        return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0

    @staticmethod
    def report(expr: Any) -> Size:
        """An int when the size is a constant, else the sympy expression as a string (GraphAnalysis' `Size`)."""
        expr = sympy.simplify(sympy.sympify(expr))
        return int(expr) if expr.is_Integer else str(expr)

    @staticmethod
    def ref(expr: Any, node: fx.Node, dim: int) -> Optional[DimRef]:
        """Where a symbolic size can be read at run time; None for constants (nothing to read)."""
        return None if sympy.sympify(expr).is_Integer else DimRef(node.name, dim)


def _shape_env(value: Any):
    values = value if isinstance(value, (tuple, list)) else [value]
    for v in values:
        if isinstance(v, torch.SymInt):
            return v.node.shape_env
        if isinstance(v, torch.Tensor):
            for s in v.shape:
                if isinstance(s, torch.SymInt):
                    return s.node.shape_env
    return None


def placeholder_kind(node: fx.Node, example: Any = None) -> str:
    """"param" (parameter or buffer Dynamo lifted), "data" (a real tensor input), "scalar" (a Python number Dynamo
    turned into a 0-d tensor) or "size" (a symbolic int)."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor):
        return "size"
    tensor_dict = node.meta.get("tensor_dict")
    # Dynamo marks module parameters and buffers as static inputs; parameters also arrive as nn.Parameter.
    if isinstance(example, torch.nn.Parameter) or isinstance(value, torch.nn.Parameter):
        return "param"
    if tensor_dict is not None and "_dynamo_static_input_type" in tensor_dict:
        return "param"
    # Real tensor inputs carry their __dict__ snapshot; unspecialized Python floats/ints do not.
    if tensor_dict is None and value.dim() == 0:
        return "scalar"
    return "data"


def data_inputs(gm: fx.GraphModule, example_inputs: Optional[Iterable[Any]]) -> list[fx.Node]:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    examples = list(example_inputs) if example_inputs is not None else []
    examples += [None] * (len(placeholders) - len(examples))
    return [p for p, e in zip(placeholders, examples) if placeholder_kind(p, e) == "data"]


def depends_on(gm: fx.GraphModule, sources: Iterable[fx.Node]) -> set[fx.Node]:
    """Nodes whose value depends on any of `sources` (the sources included), in one pass in graph order. Inputs
    read only for their dtype or device carry no value (Wan casts its timestep embedding `type_as` the text states)."""
    reached = set(sources)
    for node in gm.graph.nodes:
        if node not in reached:
            metadata = _metadata_only_inputs(node)
            if any(i in reached and i not in metadata for i in node.all_input_nodes):
                reached.add(node)
    return reached


def dataflow_dag(gm: fx.GraphModule, tensors_only: bool = False) -> nx.DiGraph:
    """The graph's dataflow as a networkx DAG on node names.

    In-place writes count as dataflow: `setitem(t, ...)` gets an edge to every later reader of `t` (Wan's RoPE fills
    an `empty_like` buffer that way). Inputs read only for their dtype or device (`type_as`, `to(other)`) are not.
    With `tensors_only`, edges out of symbolic sizes are left out: a block that reads a size of the latent does not
    take its values.
    """
    dag = nx.DiGraph()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        dag.add_node(node.name)
        metadata = _metadata_only_inputs(node)
        for source in node.all_input_nodes:
            if (tensors_only and not _carries_tensor(source)) or source in metadata:
                continue
            dag.add_edge(source.name, node.name)
        if op_name(node) in ("setitem", "copy_") and node.args and isinstance(node.args[0], fx.Node):
            target = node.args[0]
            for reader in target.users:
                if order[reader] > order[node]:
                    dag.add_edge(node.name, reader.name)
    return dag


def _metadata_only_inputs(node: fx.Node) -> set:
    """Inputs a call reads only the dtype or device of: `x.type_as(other)`, `x.to(other)` (Cosmos casts its
    timestep embedding to the latent's dtype; that is no dataflow from the latent)."""
    if op_name(node) in ("type_as", "to") and len(node.args) > 1 and isinstance(node.args[1], fx.Node) and \
            isinstance(node.args[1].meta.get("example_value"), torch.Tensor):
        return {node.args[1]}
    return set()


def _carries_tensor(node: fx.Node) -> bool:
    value = node.meta.get("example_value")
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor) or value is None


# Dynamo writes module paths as e.g. "L['self'].__dict__['_modules']['blocks'].0.attn1" (older releases:
# "L['self'].blocks[0].attn1"); the root local comes first.
_MODULES_KEY = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]")
_ITEM = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


def normalize_module_path(raw: str) -> str:
    """"L['self'].__dict__['_modules']['blocks'].0.attn1" -> "blocks.0.attn1"."""
    path = _MODULES_KEY.sub(r".\1", raw)
    path = re.sub(r"^[A-Za-z_]\w*\[['\"][^'\"]+['\"]\]", "", path)  # the root local, L['self']
    path = _ITEM.sub(r".\1", path)
    return path.strip(".")


def module_entries(node: fx.Node) -> list[tuple[str, type]]:
    """(module path, module class) from the outermost module to the innermost, root excluded."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(normalize_module_path(path), cls) for path, cls in stack.values()]


def module_path(node: fx.Node) -> str:
    entries = module_entries(node)
    return entries[-1][0] if entries else ""


def root_class_name(gm: fx.GraphModule) -> Optional[str]:
    """Class name of the compiled root module.

    Dynamo's nn_module_stack lists the submodules the root calls, not the root itself. A node run by a top-level
    submodule has the root's `forward` among its stack-trace frames (outermost first, after any decorator's
    wrapper): the first `forward` frame whose file and line fall inside some Module class's `forward` names it.
    """
    for node in gm.graph.nodes:
        entries = (node.meta.get("nn_module_stack") or {}).values()
        top = [path for path, _ in entries if normalize_module_path(path).count(".") == 0]
        trace = node.meta.get("stack_trace")
        if not top or not trace:
            continue
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', trace)
        for filename, line, function in frames:
            if function == "forward":
                found = _class_with_method_at(filename, int(line))
                if found is not None:
                    return found
    return None


def _class_with_method_at(filename: str, line: int) -> Optional[str]:
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) != filename:
            continue
        for value in vars(module).values():
            if not isinstance(value, type) or not issubclass(value, torch.nn.Module):
                continue
            forward = vars(value).get("forward")
            code = getattr(getattr(forward, "__wrapped__", forward), "__code__", None)
            if code is None or code.co_filename != filename:
                continue
            last = max((ln for _, _, ln in code.co_lines() if ln is not None), default=code.co_firstlineno)
            if code.co_firstlineno <= line <= last:
                return value.__name__
    return None
