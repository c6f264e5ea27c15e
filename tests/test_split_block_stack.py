"""The head / stack / tail split (passes/split_block_stack.py) on hand-written DiTs: global state (autocast, grad
mode) kept per node, data-dependent sizes passed between pieces, vmap levels kept whole."""
import pytest
import torch

import tiny_models
from dit_compiler import backend, vsparse

ORIGIN = "test_origin"  # node meta: the node's name in Dynamo's graph


def node_states(gm: torch.fx.GraphModule, ambient_grad: bool) -> tuple[dict, tuple]:
    """Per computing node of Dynamo's graph (its name there, which the split's copies carry in their meta), the
    autocast regions (their arguments, outermost first) and grad mode it runs under; and the state left at the end
    of the graph."""
    regions, grad, states = [], ambient_grad, {}
    for node in gm.graph.nodes:
        if node.target is torch.amp._enter_autocast:
            regions.append(node)
        elif node.target is torch.amp._exit_autocast:
            regions.remove(node.args[0])
        elif node.target is torch._C._set_grad_enabled:
            grad = node.args[0]
        elif node.op in ("call_function", "call_method", "call_module") and ORIGIN in node.meta:
            states[node.meta[ORIGIN]] = (tuple(r.args for r in regions), grad)
    return states, (tuple(r.args for r in regions), grad)


def compile_split(model, inputs):
    """Compile with the cache split, pieces run as captured; returns (output, states in Dynamo's graph, pieces)."""
    captured, pieces = {}, []

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            node.meta[ORIGIN] = node.name
        captured.update(node_states(gm, torch.is_grad_enabled())[0])
        return vsparse(sparsity="none", cache="easycache")(gm, example_inputs)

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "compile_piece", lambda gm, example_inputs, config: pieces.append(gm) or gm)
        output = torch.compile(model, backend=record, fullgraph=True)(**inputs)[0]
    torch._dynamo.reset()
    return output, captured, pieces


@pytest.mark.parametrize("region", ["embedding", "everything", "no_grad"])
def test_every_node_keeps_its_autocast_and_grad_mode_and_every_piece_closes_its_own(region):
    """The output modulation is a head node after the blocks: with an autocast region or a grad-mode change
    anywhere in the graph, split_module used to refuse the split ("autocast or set_grad_enabled require
    monotonically increasing partitions")."""
    model, inputs = tiny_models.stateful(region)
    expected = model(**inputs)[0]
    assert torch.is_grad_enabled()  # the no_grad region only shows in a graph captured with grad mode on
    output, captured, pieces = compile_split(model, inputs)
    assert torch.is_grad_enabled()
    torch.testing.assert_close(output, expected)  # bf16 where eager ran bf16: a lost region changes the output
    assert len(pieces) == 3
    in_pieces = {}
    for piece in pieces:
        states, end = node_states(piece, ambient_grad=True)
        assert end == ((), True), f"a piece leaves its state open: {end}"
        in_pieces.update(states)
    changed = {name: (state, in_pieces[name]) for name, state in captured.items()
               if name in in_pieces and in_pieces[name] != state}
    assert not changed, changed
    assert any(regions or not grad for regions, grad in captured.values())  # the model does change state


def test_a_data_dependent_prompt_length_entering_the_stack():
    """The prompt stream enters the blocks cut to a length read from its mask: the node that binds its size used
    to go to the stack piece (it reads the entry), which then needed its own output: "cycle exists between
    partitions"."""
    model, inputs = tiny_models.stateful(cut_prompt=True)
    with torch.no_grad():
        expected = model(**inputs)[0]
        output, _, pieces = compile_split(model, inputs)
    torch.testing.assert_close(output, expected)
    assert len(pieces) == 3


def test_a_vmap_level_in_a_block_stays_in_one_piece():
    """Dynamo's vmap-level decrement has no module and no input: it used to go to the head while the level's
    batched values were in the stack, and the split pieces failed (functorch's "!dynamicLayerStack.empty()")."""
    model, inputs = tiny_models.stateful(vmap=True)
    with torch.no_grad():
        expected = model(**inputs)[0]
        output, _, pieces = compile_split(model, inputs)
    torch.testing.assert_close(output, expected)
    assert len(pieces) == 3


def test_a_gather_back_to_natural_order_joins_its_consumers_piece():
    """passes/stack_token_order.py marks its gathers back: one that reads a stack value for the tail must run in
    the tail, or the stack would return a value in another order than its entry's (the cache adds the two)."""
    from dit_compiler.passes.split_block_stack import complete_partition
    from dit_compiler.passes.stack_token_order import PIECE_OF

    gm = torch.fx.symbolic_trace(lambda x: (x + 1) * 2)
    add, mul = (n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_before(mul):
        gather = gm.graph.call_function(torch.flip, (add, [0]))
    mul.replace_input_with(add, gather)
    partition = {add.name: "stack", mul.name: "tail"}
    assert complete_partition(gm, partition)[gather.name] == "stack"  # unmarked: the latest piece of its inputs
    gather.meta[PIECE_OF] = mul.name
    assert complete_partition(gm, partition)[gather.name] == "tail"
