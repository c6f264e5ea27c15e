"""Values every block reads are written once.

Pattern: a tensor computed outside a block stack's blocks (no input, parameter or constant, none of our ops) that
nodes of two or more of its blocks read: Wan's RoPE tables, the text embedding, the timestep projection.
Replacement: `torch.ops.vsparse.materialize(x)` between it and those readers, one contiguous copy a call. Values
broadcast by a zero stride are left alone (their copy would be larger than what computes them).

Why: Inductor inlines a pointwise value into every reader. Wan's RoPE tables (float64 expand and cat of per-axis
frequencies) inlined into each layer's RMS norm and RoPE split that into two kernels under plain Inductor and svg
(10.4 + 9.7 ms a Wan-1.3B 480p forward on the H100), where Draft's order, which gathers the tables once, ran one
(results/h100-2026-12-06/e2e-profile-*). With this pass every vsparse variant runs them as one kernel (5.31 ms a
forward against Inductor's 10.43 + 9.83; `sparsity="none"` 514.6 ms against Inductor's 528.3: H100, d476755,
results/h100-2026-12-06/e2e-timeline-d476755.json).
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dit_compiler.patterns.types import GraphAnalysis


def _broadcast(t: torch.Tensor) -> bool:
    return any(not statically_known_true(size == 1) and statically_known_true(stride == 0)
               for size, stride in zip(t.shape, t.stride()))


def _ours(node: fx.Node) -> bool:
    """Our ops and the functions tracing into them: already written out once."""
    target = node.target
    return (isinstance(target, torch._ops.OpOverload) and target.namespace == "vsparse") or \
        getattr(target, "__module__", "").startswith("dit_compiler.")


def materialize_shared_values(gm: fx.GraphModule, analysis: GraphAnalysis) -> int:
    """Insert the copies; returns how many."""
    count = 0
    for stack in analysis.stacks:
        block_of = {name: i for i, block in enumerate(stack.blocks) for name in block}
        for node in list(gm.graph.nodes):
            value = node.meta.get("example_value")
            if node.op not in ("call_function", "call_method") or node.name in block_of or _ours(node) \
                    or not isinstance(value, torch.Tensor) or _broadcast(value):
                continue
            readers = [user for user in node.users if user.name in block_of]
            if len({block_of[user.name] for user in readers}) < 2:
                continue
            with gm.graph.inserting_after(node):
                copy = gm.graph.call_function(torch.ops.vsparse.materialize.default, (node,))
            copy.meta.update(node.meta)
            copy.meta["example_value"] = value.clone(memory_format=torch.contiguous_format)
            for user in readers:
                user.replace_input_with(node, copy)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
