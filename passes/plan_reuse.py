"""Keep a planner's per-head choice for a few steps instead of sampling it on every call (the `plan_every` option).

Sparse VideoGen samples query rows on every call to class each head spatial or temporal; on the trained harness a
head's class changes between neighbouring steps for ~1% of heads (benchmarks/svg_head_criteria.py --stability), so
sampling every few steps saves the sampled-row kernel on the other calls.

Pattern: the sites the sparse rewrite made, all with a planner that `carries_choice` (passes/planners/), in a graph
with a timestep input whose q has a static batch and head count.
Replacement: three state tensors become graph inputs, their next values graph outputs; the runner keeps them per
model (runtime/runner.py), so models sharing the compiled graph never share a choice:
  clock    float32 [3]: the last call's timestep, how many calls in a row had it, and the generation (counted up
           whenever the timestep rises: it falls within one). CFG's branches share their step's timestep, so the
           n-th call at one timestep is branch n: its slot.
  table    float32 [sites, SLOTS, 2]: per site and slot, the generation its choice was sampled in and how many calls
           have reused it since
  carried  bool [sites, SLOTS, B, H]: per site and slot, the choice
A call samples anew when its slot's choice has served `plan_every` calls, when it was sampled in another generation
and when the call's slot is past SLOTS (more calls at one timestep than branches; then it stores nothing). A call in
the dense phase neither samples nor stores (its plan goes unused). All of it is decided on the device: no host read.
The clock is computed before the block stack, the table and the choice inside it: a call the cache skips leaves both
as they were (runtime/runner.py `CachedStack` passes them through), while the clock still counts it, so the next call
finds its own branch's slot. The backend gives the state's example inputs as static fake tensors (backend.py
`_static_examples`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dit_compiler.passes.call_record import EXTRA_OUTPUT
from dit_compiler.passes.planners import PLANNERS
from dit_compiler.passes.stack_token_order import PIECE_OF
from dit_compiler.runtime.state import MAX_BRANCHES

SLOTS = MAX_BRANCHES  # choices kept per site: one per CFG branch
# node.meta key on a state output: the name of the state input it replaces (a skipped stack passes that through).
STATE_INPUT = "vsparse_plan_state_input"


@dataclass
class PlanState:
    init: Callable[[], tuple]  # the three state tensors a model starts from
    output: int  # index of the first state output among the graph's outputs (clock, table, carried)


def call_slot(t_max: torch.Tensor, clock: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot int64 0-dim: the calls before this one in a row at its timestep, generation 0-dim, next clock)."""
    last, calls, generation = clock.unbind()
    calls = torch.where(t_max == last, calls + 1, torch.ones_like(calls))
    generation = generation + (t_max > last).float()  # NaN (no call yet) compares False
    return (calls - 1).long(), generation, torch.stack([t_max, calls, generation])


def decide(table: torch.Tensor, slot: torch.Tensor, generation: torch.Tensor, dense: Optional[torch.Tensor],
           every: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(resample 0-dim bool, store [SLOTS] bool (the slot this call writes, if any), next table) for one site's
    `table` [SLOTS, 2] (generation sampled in, calls since; NaN: never sampled)."""
    in_range = slot < SLOTS
    index = slot.clamp(max=SLOTS - 1)
    sampled_in, age = table.index_select(0, index[None])[0].unbind()
    resample = ~in_range | (sampled_in != generation) | (age + 1 >= every)  # NaN != anything
    store = (torch.arange(SLOTS, device=table.device) == index) & in_range
    if dense is not None:
        store = store & ~dense
    row = torch.where(resample, torch.stack([generation, torch.zeros_like(age)]),
                      torch.stack([sampled_in, age + 1]))
    return resample, store, torch.where(store[:, None], row, table)


def carry(carried: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The choice of this call's slot among a site's `carried` [SLOTS, B, H] (any past SLOTS: the call samples
    anew there)."""
    return carried.index_select(0, slot.clamp(max=SLOTS - 1)[None])[0]


def stored(carried: torch.Tensor, store: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """`carried` [SLOTS, B, H] with `choice` [B, H] written to the slot `store` [SLOTS] marks (none: unchanged)."""
    return torch.where(store[:, None, None], choice, carried)


def plan_reuse_refused(calls: list, every: int, t_max: Optional[torch.fx.Node]) -> Optional[str]:
    """Why the graph's sites cannot keep their choices (None: they can)."""
    if every == 1 or not calls:
        return "plan_every=1"
    planners = {c.kwargs["planner"] for c in calls}
    if not all(getattr(PLANNERS[p], "carries_choice", False) for p in planners):
        return f"planner {', '.join(sorted(planners))} keeps no choice between calls"
    if t_max is None:
        return "no timestep input: steps and branches cannot be told apart"
    sizes = {tuple(c.args[0].meta["example_value"].shape[:2]) for c in calls}
    if not all(isinstance(d, int) for size in sizes for d in size):
        return f"symbolic batch or head count {sorted(sizes, key=str)[0]}: the kept choices need a fixed size"
    if len(sizes) != 1:
        return f"sites with different batch and head counts {sorted(sizes)}"
    return None


def add_plan_reuse(gm: torch.fx.GraphModule, t_max: Optional[torch.fx.Node], every: int
                   ) -> tuple[Optional[PlanState], str]:
    """Give every rewritten site (a `sparse_attention` call in `gm`) a choice kept between calls; append the state's
    next values to the graph's outputs. Returns (the state, or None when refused, and a note)."""
    from dit_compiler.passes.sparse_attention import sparse_attention

    calls = [n for n in gm.graph.find_nodes(op="call_function", target=sparse_attention)]
    reason = plan_reuse_refused(calls, every, t_max)
    if reason is not None:
        return None, f"head choices sampled every call: {reason}"
    state = []
    for name in ("clock", "table", "carried"):  # after the model's inputs, in this order
        with gm.graph.inserting_after(list(gm.graph.find_nodes(op="placeholder"))[-1]):
            state.append(gm.graph.placeholder(f"vsparse_plan_{name}"))
    clock, table, carried = state
    with gm.graph.inserting_after(t_max):
        step = gm.graph.call_function(call_slot, (t_max, clock))
    with gm.graph.inserting_after(step):
        slot, generation, next_clock = (gm.graph.call_function(operator.getitem, (step, i)) for i in range(3))
    tables, choices = [], []
    for i, call in enumerate(calls):
        with gm.graph.inserting_before(call):
            site_table = gm.graph.call_function(operator.getitem, (table, i))
            site_carried = gm.graph.call_function(operator.getitem, (carried, i))
            decision = gm.graph.call_function(decide, (site_table, slot, generation, call.args[3], every))
            resample, store, next_table = (gm.graph.call_function(operator.getitem, (decision, j)) for j in range(3))
            given = gm.graph.call_function(carry, (site_carried, slot))
            for node in (site_table, site_carried, decision, resample, store, next_table, given):
                node.meta[PIECE_OF] = call.args[0].name  # with the site's q: in the block stack when split
        call.kwargs = {**call.kwargs, "carried": (given, resample)}
        with gm.graph.inserting_after(call):
            choice = gm.graph.call_function(operator.getitem, (call, 3))
        with gm.graph.inserting_after(choice):
            choices.append(gm.graph.call_function(stored, (site_carried, store, choice)))
        tables.append(next_table)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        next_tables = gm.graph.call_function(torch.stack, (tables,))
        next_carried = gm.graph.call_function(torch.stack, (choices,))
    for node, given in ((next_clock, None), (next_tables, table), (next_carried, carried)):
        node.meta[EXTRA_OUTPUT] = True
        if given is not None:
            node.meta[STATE_INPUT] = given.name
    values = tuple(output.args[0])
    output.args = (values + (next_clock, next_tables, next_carried),)
    gm.graph.lint()
    gm.recompile()

    q = calls[0].args[0].meta["example_value"]
    (batch, heads), device = q.shape[:2], q.device

    def init() -> tuple:
        return (torch.tensor([float("nan"), 0.0, 0.0], device=device),
                torch.full((len(calls), SLOTS, 2), float("nan"), device=device),
                torch.zeros(len(calls), SLOTS, batch, heads, dtype=torch.bool, device=device))

    return PlanState(init, len(values)), (f"head choices of {len(calls)} sites sampled every {every} calls of a "
                                              f"CFG branch and kept between them")

