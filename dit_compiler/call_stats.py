"""`dit_compiler.stats(model)`: what vsparse did for a model, per generation and CFG branch.

Reads the runner's bounded call history (the last `runtime.runner.HISTORY` calls per model) in one host transfer;
calls whose position was not read at run time (no cache, no dump) are placed by replaying the step tracker over
their timesteps, which gives the same positions the runtime would have read.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from dit_compiler.runtime.runner import runners
from dit_compiler.runtime.state import StepTracker


def stats(model: torch.nn.Module) -> list[dict]:
    """One row per (compiled graph, generation, branch) the model ran through vsparse:

    graph, generation, branch, calls, computed (block-stack runs computed), reused (skipped by the cache),
    dense_calls (calls in the dense phase), dense_computed (those whose block stack ran), density (mean visited-block fraction per rewritten site over computed
    calls, dense-phase calls included).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"stats expects the compiled model (a torch.nn.Module), got {type(model).__name__}")
    params = list(model.parameters())
    rows = []
    for graph, runner in enumerate(sorted(runners(), key=id)):
        for state in runner.states.find(params):
            rows += _rows(graph, runner, list(state.history))
    return rows


def _rows(graph: int, runner, history) -> list[dict]:
    if not history:
        return []
    vectors = None
    if history[0].vector is not None:
        vectors = torch.stack([r.vector for r in history]).float().tolist()  # one transfer, not one per call
    tracker = StepTracker()
    groups: dict = defaultdict(lambda: {"calls": 0, "computed": 0, "reused": 0, "dense_calls": 0,
                                          "dense_computed": 0, "sums": None})
    for i, record in enumerate(history):
        values = vectors[i] if vectors is not None else None
        position = record.position
        if position is None:
            timestep = None if values is None or values[0] != values[0] else values[0]
            position = tracker.observe(timestep)
        group = groups[(position.generation, position.branch)]
        group["calls"] += 1
        reused = record.cache is not None and record.cache.reused
        group["reused" if reused else "computed"] += 1
        if values is not None and values[1]:
            group["dense_calls"] += 1
            group["dense_computed"] += not reused
        if values is not None and not reused:
            densities = values[2:]
            group["sums"] = densities if group["sums"] is None else [a + b for a, b in zip(group["sums"], densities)]
    rows = []
    for (generation, branch), group in sorted(groups.items()):
        sums = group.pop("sums")
        density = {} if sums is None else {name: round(s / group["computed"], 4)
                                           for name, s in zip(runner.outputs.site_names, sums)}
        rows.append({"graph": graph, "generation": generation, "branch": branch, **group, "density": density})
    return rows
