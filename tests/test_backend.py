"""End to end: diffusers video DiTs compiled with backend="vsparse" on CPU, against eager and plain Inductor."""
import json
import subprocess
import sys

import pytest
import torch

import dit_compiler
from tiny_models import BUILDERS, wan

pytestmark = pytest.mark.slow


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def graph_dirs(dump_dir):
    """The per-graph folders of a dump (the root also holds the run's marker file)."""
    return sorted(d for d in dump_dir.iterdir() if d.is_dir())


def compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="vsparse", options=options, fullgraph=True)


def assert_fp32_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_dense_options_equal_plain_inductor(name):
    model, inputs = BUILDERS[name]()
    torch._dynamo.reset()
    inductor = run(torch.compile(model, backend="inductor", fullgraph=True), inputs)
    ours = run(compiled(model, sparsity="none", cache="none"), inputs)
    assert_fp32_close(ours, inductor)
    assert_fp32_close(ours, run(model, inputs))


@pytest.mark.parametrize("name,sparsity", [("wan", "draft"), ("wan", "svg"), ("hunyuan", "draft"),
                                           ("cogvideox", "svg"), ("cogvideox", "dual")])
def test_sparse_rewrite_at_full_density_is_dense_equal(name, sparsity, tmp_path):
    # Head dim 64 so the sites are eligible; odd grids (not multiples of the 64-token block).
    model, inputs = BUILDERS[name](head_dim=64, frames=3, height=10, width=14)
    ours = compiled(model, sparsity=sparsity, density=1.0, block_size=64, dense_layers=0, dense_steps=0.0,
                    dump_dir=str(tmp_path))
    expected = run(model, inputs)
    run(ours, inputs)  # compile outside the profiler
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = run(ours, inputs)
    assert_fp32_close(out, expected)
    (graph_dir,) = graph_dirs(tmp_path)
    analysis = json.loads((graph_dir / "analysis.json").read_text())
    video_sites = [s for s in analysis["sites"] if s["layout"]]
    assert video_sites and all(s["rewritten"] for s in video_sites), [s["decision_reason"] for s in video_sites]
    # Only text-only self-attention (HunyuanVideo's token refiner) and cross-attention stay dense, with a reason.
    for site in analysis["sites"]:
        if not site["layout"]:
            assert not site["rewritten"] and site["decision_reason"]
    rewritten = (graph_dir / "rewritten.py").read_text()
    assert "sparse_attention" in rewritten and f"planner = '{sparsity}'" in rewritten
    # The planner's constants are computed at compile time, once for every site of the one layout.
    assert f"= self.vsparse_{sparsity}_0_" in rewritten and f"self.vsparse_{sparsity}_1_" not in rewritten
    pictures = sorted(p.stem for p in (graph_dir / "masks").glob("*.png"))
    assert pictures == sorted(s["node"] for s in video_sites)
    op_calls = [e for e in prof.events() if e.name == "vsparse::block_sparse_attention"]
    assert len(op_calls) == len(video_sites)
    record = json.loads((graph_dir / "runtime.jsonl").read_text().splitlines()[0])
    assert set(record["density"].values()) == {1.0}


def test_scheduler_loop_with_cfg_split_stack_and_cache(tmp_path):
    """A real diffusers sampling loop: steps, CFG branches and a generation reset reach runtime.jsonl; the
    head / stack / tail split is exact while the cache computes, and reuse happens only past the warm-up."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, inputs = wan(head_dim=64, frames=2, height=8, width=8)
    ours = compiled(model, sparsity="draft", density=1.0, block_size=64, dense_layers=0, cache="easycache",
                    cache_threshold=1e-9, dump_dir=str(tmp_path))

    def generate(transformer, steps=3):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
        latents = inputs["hidden_states"].clone()
        negative = torch.randn_like(inputs["encoder_hidden_states"])
        with torch.no_grad():
            for t in scheduler.timesteps:
                timestep = t.expand(latents.shape[0])
                cond = transformer(hidden_states=latents, timestep=timestep,
                                   encoder_hidden_states=inputs["encoder_hidden_states"], return_dict=False)[0]
                uncond = transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=negative,
                                     return_dict=False)[0]
                latents = scheduler.step(uncond + 4.0 * (cond - uncond), t, latents, return_dict=False)[0]
        return latents

    torch.manual_seed(3)
    expected = generate(model)
    torch.manual_seed(3)
    first = generate(ours)
    torch.manual_seed(3)
    second = generate(ours)
    assert_fp32_close(first, expected)  # threshold ~0: every step computes, so the split must be exact
    assert_fp32_close(second, expected)
    (graph_dir,) = graph_dirs(tmp_path)
    records = [json.loads(line) for line in (graph_dir / "runtime.jsonl").read_text().splitlines()]
    assert [(r["generation"], r["step"], r["branch"]) for r in records] == [
        (g, s, b) for g in range(2) for s in range(3) for b in range(2)]
    assert all(r["cache"] == "compute" for r in records)
    report = (graph_dir / "report.md").read_text()
    assert "| blocks | 2 |" in report
    shown = subprocess.run([sys.executable, "-m", "dit_compiler", "show", str(tmp_path)], capture_output=True,
                           text=True, check=True).stdout
    assert shown == report


def test_cache_reuses_and_stays_close_with_a_loose_threshold(tmp_path):
    model, inputs = wan(frames=2, height=8, width=8, layers=2)
    torch._dynamo.reset()
    backend = dit_compiler.vsparse(sparsity="none", cache="easycache", cache_threshold=0.5, dump_dir=str(tmp_path))
    ours = torch.compile(model, backend=backend, fullgraph=True)
    outs, refs = [], []
    for t in (900.0, 890.0, 880.0, 870.0, 860.0):
        step = dict(inputs, timestep=torch.full((1,), t), hidden_states=inputs["hidden_states"] * (1 + t / 1e4))
        outs.append(run(ours, step))
        refs.append(run(model, step))
    (graph_dir,) = graph_dirs(tmp_path)
    decisions = [json.loads(line)["cache"] for line in (graph_dir / "runtime.jsonl").read_text().splitlines()]
    assert decisions[:2] == ["compute", "compute"] and "reuse" in decisions[2:]
    for out, ref, decision in zip(outs, refs, decisions):
        if decision == "compute":
            assert_fp32_close(out, ref)
        else:  # an approximation, but a close one: the inputs barely moved
            assert not torch.equal(out, ref)
            assert (out - ref).norm() / ref.norm() < 0.05


def test_dynamic_shapes_give_correct_output_at_a_second_resolution(tmp_path):
    model, _ = wan(head_dim=64)
    torch._dynamo.reset()
    ours = torch.compile(model, backend="vsparse", dynamic=True, fullgraph=True,
                         options={"sparsity": "draft", "density": 1.0, "block_size": 64, "dense_layers": 0,
                                  "dense_steps": 0.0, "dump_dir": str(tmp_path)})
    for frames, height, width in ((2, 8, 10), (3, 10, 14)):
        _, inputs = wan(head_dim=64, frames=frames, height=height, width=width)
        assert_fp32_close(run(ours, inputs), run(model, inputs))
    records = [json.loads(line) for graph_dir in graph_dirs(tmp_path)
               for line in (graph_dir / "runtime.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(set(r["density"].values()) == {1.0} for r in records)


def test_backend_leaves_dynamo_graph_alone_and_translates_mode(monkeypatch):
    import dit_compiler.backend as backend

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen["config"] = config_patches
        return gm.forward

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        result = dit_compiler.vsparse_backend(gm, example_inputs, options={"density": 1.0, "dense_layers": 0},
                                              mode="max-autotune-no-cudagraphs")
        graphs.append(gm.code)
        return result

    monkeypatch.setattr(backend, "compile_fx", fake_compile_fx)
    model, inputs = wan(head_dim=64)
    torch._dynamo.reset()
    assert_fp32_close(run(torch.compile(model, backend=recording_backend, fullgraph=True), inputs), run(model, inputs))
    assert graphs[0] == graphs[1]
    config = dict(seen["config"])
    assert isinstance(config.pop("post_grad_custom_post_pass"), backend._KernelsCacheKey)
    assert config == torch._inductor.list_mode_options("max-autotune-no-cudagraphs", False)


def test_inductor_cache_key_holds_the_kernels_sources(tmp_path, monkeypatch):
    """A changed fake kernel (an upgrade) must not meet a cached graph compiled against the old one: before the key
    held kernels/' sources, the block-sparse output's new strides failed a stale graph's stride assertion."""
    import dit_compiler.backend as backend
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model, inputs = wan(head_dim=64)

    def compile_and_count(source_hash):
        monkeypatch.setattr(backend, "_kernels_source_hash", lambda: source_hash)
        counters.clear()
        run(compiled(model, sparsity="draft", density=0.5, block_size=64, force_sparse=True, cache="none"), inputs)
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    # config.patch, not monkeypatch: undoing a monkeypatched config entry deleted it for the tests after this one.
    with torch._inductor.config.patch(fx_graph_cache=True):
        assert compile_and_count("a") == (0, 1)
        assert compile_and_count("a") == (1, 0)  # the same sources: the cache serves
        assert compile_and_count("b") == (0, 1)  # other sources: compiled afresh


class PlainVideoAttention(torch.nn.Module):
    """A video transformer layer with no timestep input and explicit attention."""

    def __init__(self, dim=64):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
        return x + (attn @ v).squeeze(1)


def test_entry_point_and_a_graph_without_timestep():
    """`backend="vsparse"` resolves through the installed entry point in a fresh interpreter."""
    code = (
        "import torch, sys; sys.path.insert(0, 'tests'); from test_backend import PlainVideoAttention\n"
        "m = PlainVideoAttention().eval(); x = torch.randn(2, 40, 64)\n"
        "c = torch.compile(m, backend='vsparse', fullgraph=True)\n"
        "with torch.no_grad():\n"
        "    a, b = c(x), c(x)\n"
        "    torch.testing.assert_close(a, m(x), rtol=1e-4, atol=1e-5)\n"
        "print('dit_compiler' in sys.modules, 'ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", ["draft", "svg", "dual"])
def test_gpu_sparse_rewrite_runs_the_triton_kernel_dense_equal(sparsity):
    model, inputs = wan(head_dim=64, frames=3, height=10, width=14)
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
              for k, v in inputs.items()}
    expected = run(model, inputs).float()
    out = run(compiled(model, sparsity=sparsity, density=1.0, block_size=64, dense_layers=0, dense_steps=0.0),
              inputs).float()
    assert ((out - expected).norm() / expected.norm()).item() < 2e-2


def test_explicit_softmax_attention_is_rewritten_too(tmp_path):
    from tiny_models import ExplicitAttentionDiT, explicit

    _, inputs = explicit(frames=3, height=10, width=14)
    model = ExplicitAttentionDiT(dim=128, heads=2).eval()  # head dim 64
    ours = compiled(model, sparsity="draft", density=1.0, block_size=64, dense_layers=0, dense_steps=0.0,
                    dump_dir=str(tmp_path))
    assert_fp32_close(run(ours, inputs), run(model, inputs))
    (graph_dir,) = graph_dirs(tmp_path)
    sites = json.loads((graph_dir / "analysis.json").read_text())["sites"]
    assert [(s["kind"], s["self_attention"], s["rewritten"]) for s in sites] == [
        ("explicit", True, True), ("explicit", False, False)] * 2


@pytest.mark.parametrize("cache", ["none", "easycache"])
def test_graphs_handed_to_inductor_keep_dynamo_metadata(cache, monkeypatch):
    """AOTAutograd tells parameters (static inputs) from data by Dynamo's metadata on the graph; our copy and the
    split pieces used to drop it, so under CUDA graphs every parameter was copied on every replay."""
    import dit_compiler.backend as backend

    handed = []
    real = backend.compile_piece

    def recording(gm, example_inputs, config):
        handed.append((gm, list(example_inputs)))
        return real(gm, example_inputs, config)

    monkeypatch.setattr(backend, "compile_piece", recording)
    model, inputs = wan(head_dim=64)
    ours = compiled(model, sparsity="draft", density=1.0, block_size=64, dense_layers=0, cache=cache)
    assert_fp32_close(run(ours, inputs), run(model, inputs))
    assert len(handed) == (3 if cache == "easycache" else 1)
    with_source = set()
    for gm, _ in handed:
        assert "dynamo_compile_id" in gm.meta
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        assert all(hasattr(node, "_dynamo_source") for node in placeholders)
        with_source |= {node.name for node in placeholders if node._dynamo_source is not None}
        assert set(dict(gm.named_buffers())) <= set(gm._param_name_to_source)
    # Every parameter placeholder of Dynamo's graph reaches Inductor with its source.
    assert len(with_source) >= sum(1 for _ in model.parameters())


def test_stack_piece_computes_what_depends_on_weights_alone(monkeypatch):
    """Head values computed from weights alone (Wan's RoPE tables) and used only by the stack are computed in the
    stack piece, as in the whole graph: passed in as inputs, they changed Inductor's fusion (on an H100 a q/k norm +
    RoPE kernel ran 20x slower)."""
    import dit_compiler.backend as backend
    from dit_compiler.passes.split_block_stack import weight_placeholders

    pieces = []
    monkeypatch.setattr(backend, "compile_piece", lambda gm, example_inputs, config: pieces.append(gm) or gm)
    model, inputs = wan(head_dim=64)
    ours = compiled(model, sparsity="none", cache="easycache")
    assert_fp32_close(run(ours, inputs), run(model, inputs))
    head, stack, _ = pieces
    head_outputs = {a.name for a in next(iter(head.graph.find_nodes(op="output"))).args[0]}
    weights = weight_placeholders(stack)
    assert any("rope" in name for name in weights)  # the RoPE buffers themselves come in
    # Every value the head hands on depends on some input other than the weights.
    placeholders = {p.name for p in head.graph.find_nodes(op="placeholder")}
    for node in head.graph.nodes:
        if node.name in head_outputs:
            ancestors, todo = set(), [node]
            while todo:
                for parent in todo.pop().all_input_nodes:
                    if parent.name not in ancestors:
                        ancestors.add(parent.name)
                        todo.append(parent)
            assert (ancestors & placeholders) - weight_placeholders(head), node.name


def test_svg_shift_runs_in_frame_order_and_refuses_short_frames_with_its_reason(tmp_path):
    """svg-shift through the backend: Wan's sites (frames of 256 tokens) go sparse with no token gather in the graph
    and, at density 1 (every head's sampled rows favour the spatial mask, which is then full), equal eager; a model
    with frames of 15 tokens stays dense with the planner's own reason."""
    import json

    model, inputs = wan(frames=2, height=32, width=32, head_dim=64)
    out = run(compiled(model, sparsity="svg-shift", density=1.0, block_size=64, force_sparse=True, cache="none",
                       dense_layers=0, dump_dir=str(tmp_path / "long")), inputs)
    assert_fp32_close(out, run(model, inputs))
    (graph,) = graph_dirs(tmp_path / "long")
    sites = json.loads((graph / "analysis.json").read_text())["sites"]
    assert [s["rewritten"] for s in sites if s["self_attention"]] == [True, True]
    assert "permute_tokens" not in (graph / "rewritten.py").read_text()
    short, short_inputs = wan(head_dim=64)  # 3 x 3 x 5 tokens a frame
    run(compiled(short, sparsity="svg-shift", density=0.5, block_size=64, force_sparse=True, cache="none",
                 dense_layers=0, dump_dir=str(tmp_path / "short")), short_inputs)
    (graph,) = graph_dirs(tmp_path / "short")
    reasons = [s["decision_reason"] for s in json.loads((graph / "analysis.json").read_text())["sites"]
               if s["self_attention"]]
    assert reasons == ["svg-shift needs frames longer than 192 tokens (3 blocks of 64), got height*width = 15"] * 2


def test_svg_shift_under_dynamic_shapes_judges_the_symbolic_frame_size(tmp_path):
    """With dynamic=True the layout sizes are symbols: the planner's refusal check reads the traced SymInts (it
    compared a symbol's name with an int before), and the sites stay sparse and correct at a second resolution."""
    model, _ = wan(head_dim=64)
    torch._dynamo.reset()
    ours = torch.compile(model, backend="vsparse", dynamic=True, fullgraph=True,
                         options={"sparsity": "svg-shift", "density": 1.0, "block_size": 64, "dense_layers": 0,
                                  "dense_steps": 0.0, "force_sparse": True, "cache": "none", "dump_dir": str(tmp_path)})
    # 210 and 221 tokens a frame. Not a height of 32: Dynamo specialized it on this tiny model (a static 32 in it),
    # and 32 -> 34 recompiled, with the eager backend too; these sizes run the first compiled graph.
    for frames, height, width in ((2, 30, 28), (3, 34, 26)):
        _, inputs = wan(head_dim=64, frames=frames, height=height, width=width)
        assert_fp32_close(run(ours, inputs), run(model, inputs))
    records = [json.loads(line) for graph_dir in graph_dirs(tmp_path)
               for line in (graph_dir / "runtime.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(list(r["density"].values()) == [1.0, 1.0] for r in records)
