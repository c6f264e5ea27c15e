"""The dense phase and the call record: what the runtime needs from a call, computed in the graph.

Pattern: the timestep input (`patterns.timestep`) and the per-site visited-block fractions the sparse rewrite made.
Replacement:
- `insert_dense_phase`: a 0-dim bool node, true while the call is in the leading `dense_steps` share of the
  trajectory (`runtime.state.dense_phase` on the timestep's maximum). The sparse rewrite selects full masks with it,
  so the dense phase costs no host read and no second compiled graph.
- `add_call_record`: one float32 vector appended to the graph's outputs, [timestep maximum (NaN without a
  timestep input), dense phase, visited-block fraction per rewritten site], and when dumping one block-bool mask
  per rewritten site after it. The runner keeps the vector on the device; stats and dumps read it.
"""
from __future__ import annotations

from typing import Optional

import torch

from dit_compiler.runtime.runner import GraphOutputs
from dit_compiler.runtime.state import dense_phase, read_timestep

# node.meta key marking values we expose as extra graph outputs (not the model's own).
EXTRA_OUTPUT = "vsparse_extra_output"
# node.meta key marking the call record vector itself (the split places it where every call runs).
CALL_RECORD = "vsparse_call_record"


def _model_device(gm: torch.fx.GraphModule, timestep: Optional[torch.fx.Node]) -> torch.device:
    """The device of the graph's first parameter (where the model runs), else the timestep's, else the CPU."""
    values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    for value in values:
        if isinstance(value, torch.nn.Parameter):
            return value.device
    if timestep is not None:
        return timestep.meta["example_value"].device
    return torch.device("cpu")


def _timestep_max(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return read_timestep(t).to(device)


def _phase(t_max: torch.Tensor, dense_steps: float) -> torch.Tensor:
    return dense_phase(t_max, dense_steps)


def insert_dense_phase(gm: torch.fx.GraphModule, timestep: Optional[torch.fx.Node], dense_steps: float
                       ) -> tuple[torch.fx.Node, Optional[torch.fx.Node]]:
    """(dense phase node, timestep maximum node or None), placed right after the placeholders."""
    device = _model_device(gm, timestep)
    last = list(gm.graph.find_nodes(op="placeholder"))[-1]
    with gm.graph.inserting_after(last):
        if timestep is None:  # every call is a step; only dense_steps=1 makes calls dense
            t_max = None
            dense = gm.graph.call_function(torch.full, ((), dense_steps >= 1),
                                           {"dtype": torch.bool, "device": device})
        else:
            t_max = gm.graph.call_function(_timestep_max, (timestep, device))
            with gm.graph.inserting_after(t_max):
                dense = gm.graph.call_function(_phase, (t_max, dense_steps))
    return dense, t_max


def _record(t_max: Optional[torch.Tensor], dense: torch.Tensor, *densities: torch.Tensor) -> torch.Tensor:
    head = torch.full((), float("nan"), device=dense.device) if t_max is None else t_max
    return torch.stack([head, dense.float(), *(d.float() for d in densities)])


def add_call_record(gm: torch.fx.GraphModule, t_max: Optional[torch.fx.Node], dense: torch.fx.Node,
                    site_names: list[str], densities: list[torch.fx.Node],
                    masks: list[torch.fx.Node]) -> GraphOutputs:
    """Append the call record (and masks, when given) to the graph's output tuple."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0]
    if not isinstance(values, (tuple, list)):
        raise TypeError(f"expected the captured graph to return a tuple, got {type(values).__name__}")
    with gm.graph.inserting_before(output):
        record = gm.graph.call_function(_record, (t_max, dense, *densities))
    for node in (record, *densities, *masks):
        node.meta[EXTRA_OUTPUT] = True
    record.meta[CALL_RECORD] = True
    output.args = (tuple(values) + (record,) + tuple(masks),)
    gm.graph.lint()
    gm.recompile()
    return GraphOutputs(num_user=len(values), record=len(values), site_names=list(site_names),
                        masks=len(values) + 1 if masks else None)
