"""Recognizers on the Dynamo graphs of the tiny diffusers models (odd sizes, symbolic shapes) and a hand-written
explicit-attention DiT. Each configuration is captured once per module."""
import json
import re
from dataclasses import dataclass, field

import networkx as nx
import pytest
import torch
from torch.fx.passes.split_module import split_module

import tiny_models
from dit_compiler.patterns import analyze, key_padding_lengths, partition
from dit_compiler.patterns.graph import dataflow_dag


def node_values(gm, inputs):
    """Every node's value when `gm` runs on `inputs`, by node name."""
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            values[n.name] = super().run_node(n)
            return values[n.name]

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return values


@dataclass
class Case:
    build: object
    args: dict = field(default_factory=dict)
    dynamic: bool = False
    dynamic_dims: tuple = ()  # dims of hidden_states marked dynamic (torch._dynamo.mark_dynamic)
    frames: int = 3
    height: int = 6  # latent pixels; tokens are height // 2
    width: int = 10
    text_before: int = 0
    text_after: int = 0
    sites: int = 0  # all attention sites
    eligible: int = 0  # self-attention over the video grid
    stacks: tuple = ()  # (name, blocks) of the main-stream stacks
    entries: tuple = ()  # entry count per stack
    mask: str = "none"


CASES = {
    "wan": Case(tiny_models.wan, sites=4, eligible=2, stacks=(("blocks", 2),), entries=(1,)),
    "wan_odd": Case(tiny_models.wan, dict(frames=1, height=10, width=14), frames=1, height=10, width=14, sites=4,
                    eligible=2, stacks=(("blocks", 2),), entries=(1,)),
    "wan_dynamic": Case(tiny_models.wan, dynamic=True, sites=4, eligible=2, stacks=(("blocks", 2),), entries=(1,)),
    "wan_dynamic_frames": Case(tiny_models.wan, dynamic_dims=(2,), sites=4, eligible=2, stacks=(("blocks", 2),),
                               entries=(1,)),
    "hunyuan": Case(tiny_models.hunyuan, dict(batch=2, valid_text=[3, 5]), text_after=5, sites=3, eligible=2,
                    stacks=(("transformer_blocks", 1), ("single_transformer_blocks", 1)), entries=(2, 2),
                    mask="key_padding"),
    "hunyuan_odd": Case(tiny_models.hunyuan, dict(frames=1, height=10, width=14, text=3, valid_text=2, layers=2),
                        frames=1, height=10, width=14, text_after=3, sites=4, eligible=3,
                        stacks=(("transformer_blocks", 2), ("single_transformer_blocks", 1)), entries=(2, 2),
                        mask="key_padding"),
    "hunyuan_dynamic": Case(tiny_models.hunyuan, dynamic=True, text_after=5, sites=3, eligible=2,
                            stacks=(("transformer_blocks", 1), ("single_transformer_blocks", 1)), entries=(2, 2),
                            mask="key_padding"),
    "cogvideox": Case(tiny_models.cogvideox, text_before=5, sites=2, eligible=2, stacks=(("transformer_blocks", 2),),
                      entries=(2,)),
    "cogvideox_odd": Case(tiny_models.cogvideox, dict(frames=1, height=10, width=14, text=3), frames=1, height=10,
                          width=14, text_before=3, sites=2, eligible=2, stacks=(("transformer_blocks", 2),),
                          entries=(2,)),
    # batch 2: frames come out of the Conv2d's batch*frames dim by a reshape (batch 1 leaves it unsplit).
    "cogvideox_batch2": Case(tiny_models.cogvideox, dict(batch=2), text_before=5, sites=2, eligible=2,
                             stacks=(("transformer_blocks", 2),), entries=(2,)),
    "explicit": Case(tiny_models.explicit, frames=2, sites=4, eligible=2, stacks=(("blocks", 2),), entries=(1,)),
}


@dataclass
class Captured:
    case: Case
    model: torch.nn.Module
    inputs: dict
    gm: torch.fx.GraphModule
    example_inputs: list
    output: torch.Tensor
    code_before: str
    analysis: object


def capture(model, inputs, dynamic=False):
    # A fresh Dynamo: after an earlier compile of the same code (test_backend runs first), a recompile would turn on
    # automatic dynamic shapes and lift float attributes (an explicit attention's scale) into graph inputs.
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(model, backend=lambda gm, ex: (graphs.append((gm, ex)), gm.forward)[1],
                             fullgraph=True, dynamic=dynamic or None)
    # Every diffusers model's forward runs through one shared wrapper code object: allow more than Dynamo's
    # default 8 captures of it in one session.
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        output = compiled(**inputs)[0]
    assert len(graphs) == 1
    return graphs[0][0], list(graphs[0][1]), output


@pytest.fixture(scope="module", params=sorted(CASES))
def captured(request):
    case = CASES[request.param]
    model, inputs = case.build(**case.args)
    for dim in case.dynamic_dims:
        torch._dynamo.mark_dynamic(inputs["hidden_states"], dim)
    gm, example_inputs, output = capture(model, inputs, case.dynamic)
    code = gm.code
    return Captured(case, model, inputs, gm, example_inputs, output, code, analyze(gm, example_inputs))


def concrete(example_inputs):
    """Example inputs of a dynamic-shape graph hold symbolic ints; run it with their example values."""
    return [e.node.hint if isinstance(e, torch.SymInt) else e for e in example_inputs]


def size_at(gm, ref):
    node = next(n for n in gm.graph.nodes if n.name == ref.node)
    return int(node.meta["example_value"].shape[ref.dim])


def test_model_name_and_no_mutation(captured):
    assert captured.analysis.model == type(captured.model).__name__
    assert captured.gm.code == captured.code_before
    json.dumps(captured.analysis.to_json())


def test_sites_self_cross_and_eligibility(captured):
    case, sites = captured.case, captured.analysis.sites
    assert len(sites) == case.sites
    eligible = [s for s in sites if s.eligible]
    assert len(eligible) == case.eligible, [s.reason for s in sites]
    for site in sites:
        assert (site.q_shape[2] == site.kv_shape[2]) or not site.self_attention
        if site.eligible:
            assert site.self_attention and site.layout is not None and site.mask == case.mask
            assert site.mask_node is None if case.mask == "none" else site.mask_node
        else:
            assert site.reason
    cross = [s for s in sites if not s.self_attention]
    if captured.model.__class__.__name__ in ("WanTransformer3DModel", "ExplicitAttentionDiT"):
        assert len(cross) == len(sites) // 2  # one text cross-attention per block
        assert all("cross-attention" in s.reason for s in cross)
    else:
        assert not cross


def test_layout_matches_the_grid(captured):
    case = captured.case
    expected = dict(frames=case.frames, height=case.height // 2, width=case.width // 2,
                    text_before=case.text_before, text_after=case.text_after)
    for site in captured.analysis.sites:
        if not site.eligible:
            continue
        layout = site.layout
        for key, value in expected.items():
            got = getattr(layout, key)
            if isinstance(got, str):  # symbolic: read the example value where the ref points
                assert layout.refs[key] is not None, key
                assert size_at(captured.gm, layout.refs[key]) == value, key
            else:
                assert got == value, (key, layout)
                assert layout.refs[key] is None  # constants have nothing to read at run time
        assert "==" in layout.proof


def test_symbolic_layouts_are_symbolic(captured):
    case = captured.case
    if not case.dynamic and not case.dynamic_dims:
        pytest.skip("static shapes")
    layout = next(s.layout for s in captured.analysis.sites if s.eligible)
    symbolic = {"frames", "height", "width"} if case.dynamic else {("frames", "height", "width")[d - 2]
                                                                   for d in case.dynamic_dims}
    assert {k for k in ("frames", "height", "width") if isinstance(getattr(layout, k), str)} == symbolic
    assert layout.refs["seq"] is not None


def test_block_stacks_cover_their_blocks(captured):
    stacks = captured.analysis.stacks
    assert [(s.name, len(s.blocks)) for s in stacks] == list(captured.case.stacks)
    for stack in stacks:
        # Independently of the recognizer: nodes run inside `<stack>.<i>` according to Dynamo's raw module paths.
        # (Dynamo writes "L['self'].__dict__['_modules']['blocks'].0" or "L['self'].blocks.0".)
        pattern = re.compile(r"(?:\['%s'\]|\.%s)\.(\d+)$" % (re.escape(stack.name), re.escape(stack.name)))
        expected = {}
        for node in captured.gm.graph.nodes:
            paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
            hits = [pattern.search(p) for p in paths if pattern.search(p)]
            if hits and node.op != "placeholder":
                expected.setdefault(int(hits[0].group(1)), set()).add(node.name)
        assert [set(b) for b in stack.blocks] == [expected[i] for i in sorted(expected)]
    names = [n for s in stacks for b in s.blocks for n in b]
    assert len(names) == len(set(names))
    by_layer = [s for s in captured.analysis.sites if s.layer is not None]
    assert sorted({s.layer for s in by_layer}) == list(range(sum(len(s.blocks) for s in stacks)))


def test_entry_and_exit_are_the_residual_cut(captured):
    gm, stacks = captured.gm, captured.analysis.stacks
    dag = dataflow_dag(gm, tensors_only=True)
    placeholders = gm.graph.find_nodes(op="placeholder")
    latent = next(p.name for p, e in zip(placeholders, captured.example_inputs) if e is captured.inputs["hidden_states"])
    output = next(iter(gm.graph.find_nodes(op="output"))).name
    for stack, entries in zip(stacks, captured.case.entries):
        nodes = {n for b in stack.blocks for n in b}
        assert len(stack.entry) == entries and stack.exit
        assert not set(stack.entry) & nodes and set(stack.exit) <= nodes
        first = set(stack.blocks[0])
        assert all(any(u in first for u in dag.successors(e)) for e in stack.entry)
        assert all(any(u not in nodes for u in dag.successors(x)) for x in stack.exit)
        # Every path from the latent into the stack passes an entry value; every path out passes an exit value.
        no_entry = dag.subgraph(n for n in dag if n not in stack.entry)
        assert not any(nx.has_path(no_entry, latent, n) for n in nodes)
        no_exit = dag.subgraph(n for n in dag if n not in stack.exit)
        assert not any(nx.has_path(no_exit, n, output) for n in nodes - set(stack.exit))


def test_partition_splits_into_runnable_pieces(captured):
    pieces = partition(captured.gm, captured.analysis)
    blocks = {n for s in captured.analysis.stacks for b in s.blocks for n in b}
    assert {n for n, p in pieces.items() if p == "stack"} >= blocks
    assert all(pieces[e] == "head" for e in captured.analysis.stacks[0].entry)
    rank = {"head": 0, "stack": 1, "tail": 2}
    split = split_module(captured.gm, None, lambda n: rank[pieces[n.name]], keep_original_order=True)
    assert len([n for n in split.graph.nodes if n.op == "call_module"]) == 3
    with torch.no_grad():
        out = split(*concrete(captured.example_inputs))
    torch.testing.assert_close(out[0], captured.output)


def test_timestep_input(captured):
    analysis = captured.analysis
    placeholders = list(captured.gm.graph.find_nodes(op="placeholder"))
    assert placeholders[analysis.timestep_index].name == analysis.timestep_input
    value = captured.example_inputs[analysis.timestep_index]
    assert torch.equal(value, captured.inputs["timestep"])  # not HunyuanVideo's guidance (3500)


def test_key_padding_lengths_match_the_mask(captured):
    if captured.case.mask != "key_padding":
        pytest.skip("no key-padding mask")
    values = node_values(captured.gm, concrete(captured.example_inputs))
    site = next(s for s in captured.analysis.sites if s.eligible)
    mask = values[site.mask_node]
    lengths = key_padding_lengths(mask, batch=mask.shape[0])
    valid_text = captured.inputs["encoder_attention_mask"].sum(-1)
    video = (captured.case.frames * (captured.case.height // 2) * (captured.case.width // 2))
    assert lengths.dtype == torch.int32
    assert lengths.tolist() == (valid_text + video).tolist()
    assert lengths.tolist() == mask.reshape(mask.shape[0], -1).sum(-1).tolist()
