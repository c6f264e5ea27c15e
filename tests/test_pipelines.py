"""vsparse inside diffusers pipelines and beside what diffusers users turn on, at tiny sizes on the CPU.

vsparse's pieces run eagerly (`compile_piece` patched): what is checked is recognition, rewrite and run time. The
one Inductor compile is the dense comparison of the example's `--compare`."""
import contextlib
import copy
import importlib
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import dit_compiler
from test_backend import graph_dirs
from tiny_models import wan, wan_pipeline
import wan_t2v

pytestmark = pytest.mark.usefixtures("eager_pieces")


def sites(dump_dir):
    """Every attention site of every graph the dump holds."""
    return [site for d in graph_dirs(dump_dir) for site in json.loads((d / "analysis.json").read_text())["sites"]]


# density 1.0 keeps the sparse kernel's output equal to dense attention, so outputs compare to eager.
OPTIONS = dict(sparsity="draft", density=1.0, block_size=64, dense_layers=0)


def vsparse(model, dump_dir, **compile_kwargs):
    return torch.compile(model, backend="vsparse", options=OPTIONS | dict(dump_dir=str(dump_dir)), **compile_kwargs)


def run(model, inputs, t, **changes):
    with torch.no_grad():
        return model(**dict(inputs, timestep=torch.full((1,), float(t)), **changes))[0]


def test_wan_t2v_example_end_to_end(tmp_path, capsys):
    gif, dump = tmp_path / "video.gif", tmp_path / "dump"
    steps = 3
    summary = wan_t2v.main([
        "--steps", str(steps), "--frames", "5", "--height", "64", "--width", "64", "--compare",
        "--out", str(gif), "--dump-dir", str(dump)])
    out, err = capsys.readouterr()
    assert "no --model-dir: a tiny random-weight WanPipeline" in out
    assert summary in out
    assert re.fullmatch(
        rf"wan_t2v: {steps} steps, 5 frames 64x64 in [\d.]+ s \(warm-up with compile [\d.]+ s\), dense Inductor "
        rf"[\d.]+ s: speedup [\d.]+x; block stack computed {2 * steps}, skipped 0 of {2 * steps} runs; sparse "
        rf"attention sites: 1; wrote {re.escape(str(gif))}, dump {re.escape(str(dump))}", summary), summary
    assert f"{steps}/{steps}" in err  # the pipeline's progress bar
    with Image.open(gif) as video:
        assert video.n_frames == 5
        assert video.size == (64, 64)
    self_attention = [s for s in sites(dump) if s["self_attention"]]
    # the default dense_layers=1 keeps block 0 dense; block 1's self-attention goes sparse
    assert [(s["block"], s["rewritten"]) for s in self_attention] == [(0, False), (1, True)], self_attention



def test_wan_t2v_example_loads_a_pipeline_folder(tmp_path, capsys):
    """--model-dir goes through from_pretrained with local files only: a saved tiny pipeline stands in for Wan's."""
    # diffusers loads Wan's transformer (it keeps modules in float32) only with accelerate's low-memory loading
    pytest.importorskip("accelerate")
    wan_t2v.tiny_pipeline(wan_t2v.PROMPT).save_pretrained(tmp_path / "wan")
    gif = tmp_path / "video.gif"
    wan_t2v.main(["--model-dir", str(tmp_path / "wan"), "--steps", "2", "--frames", "5", "--height", "64",
                  "--width", "64", "--out", str(gif), "--dump-dir", str(tmp_path / "dump")])
    assert f"WanPipeline from {tmp_path / 'wan'} on cpu" in capsys.readouterr().out
    with Image.open(gif) as video:
        assert video.n_frames == 5

@pytest.mark.parametrize("example,frames,sparse", [
    ("hunyuan_t2v", 5, ["single_transformer_blocks.0.attn"]),  # the refiner's mask is per head; dense_layers=1
    ("cogvideox_t2v", 9, ["transformer_blocks.1.attn1"])], ids=["hunyuan_t2v", "cogvideox_t2v"])
def test_example_end_to_end(tmp_path, capsys, example, frames, sparse):
    """The HunyuanVideo and CogVideoX examples, tiny pipelines built offline: the same flow as wan_t2v.py (its test
    above also covers --compare and --model-dir, which the examples share)."""
    module = importlib.import_module(example)
    gif, dump = tmp_path / "video.gif", tmp_path / "dump"
    steps = 3
    summary = module.main(["--steps", str(steps), "--frames", str(frames), "--height", "64", "--width", "64",
                           "--out", str(gif), "--dump-dir", str(dump)])
    out, err = capsys.readouterr()
    assert f"no --model-dir: a tiny random-weight {module.EXAMPLE.pipeline}" in out
    assert summary in out
    # The examples run vsparse's defaults, the cache among them: a random-weight model may skip some stack runs.
    match = re.fullmatch(
        rf"{example}: {steps} steps, {frames} frames 64x64 in [\d.]+ s \(warm-up with compile [\d.]+ s\); block stack "
        rf"computed (\d+), skipped (\d+) of {steps} runs; sparse attention sites: 1; wrote {re.escape(str(gif))}, dump "
        rf"{re.escape(str(dump))}", summary)
    assert match and int(match[1]) + int(match[2]) == steps and int(match[1]) >= 2, summary
    assert f"{steps}/{steps}" in err  # the pipeline's progress bar
    with Image.open(gif) as video:
        assert video.n_frames == frames
        assert video.size == (64, 64)
    assert [s["module_path"] for s in sites(dump) if s["rewritten"]] == sparse


def test_native_attention_backend_still_goes_sparse(tmp_path):
    model, inputs = wan(frames=3, height=6, width=10, head_dim=64)
    model.set_attention_backend("native")
    compiled = vsparse(model, tmp_path, fullgraph=True)
    torch.testing.assert_close(run(compiled, inputs, 500), run(model, inputs, 500), rtol=1e-4, atol=1e-5)
    assert [s["rewritten"] for s in sites(tmp_path) if s["self_attention"]] == [True, True]


def test_dynamic_shapes_serve_two_resolutions_with_one_sparse_graph(tmp_path):
    model, inputs = wan(frames=3, height=6, width=10, head_dim=64)
    compiled = vsparse(model, tmp_path, fullgraph=True, dynamic=True)
    for frames, height, width in [(3, 6, 10), (2, 12, 8)]:
        latents = torch.randn(1, 4, frames, height, width)
        torch.testing.assert_close(run(compiled, inputs, 500, hidden_states=latents),
                                   run(model, inputs, 500, hidden_states=latents), rtol=1e-4, atol=1e-5)
    (graph,) = graph_dirs(tmp_path)
    self_attention = [s for s in sites(tmp_path) if s["self_attention"]]
    assert [s["rewritten"] for s in self_attention] == [True, True]
    assert all(not str(s["layout"]["frames"]).isdigit() for s in self_attention)  # the grid stays symbolic


def test_in_place_weight_change_needs_no_recompile(tmp_path):
    """Parameters are graph inputs: weights changed in place (a user's edit, `load_state_dict`) are seen at the next
    call without a recompile."""
    model, inputs = wan(frames=3, height=6, width=10, head_dim=64)
    compiled = vsparse(model, tmp_path, fullgraph=True)
    before = run(compiled, inputs, 400)
    with torch.no_grad():
        for p in model.blocks[1].parameters():
            p.add_(0.1 * torch.randn_like(p))
    changed = run(compiled, inputs, 400)
    torch.testing.assert_close(changed, run(model, inputs, 400), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(changed, before, atol=1e-3)
    assert len(graph_dirs(tmp_path)) == 1


def write_lora(model, folder: Path, rank=4) -> str:
    """A LoRA of `model`'s self-attention projections in diffusers' key format, saved as safetensors; its name."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    weights = {}
    for i, block in enumerate(model.blocks):
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            layer = block.attn1.get_submodule(name)
            weights[f"transformer.blocks.{i}.attn1.{name}.lora_A.weight"] = 0.2 * torch.randn(
                rank, layer.in_features, generator=g)
            weights[f"transformer.blocks.{i}.attn1.{name}.lora_B.weight"] = 0.2 * torch.randn(
                layer.out_features, rank, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "lora.safetensors")
    return "lora.safetensors"


def generate(pipe, args):
    return pipe(**args, generator=torch.Generator().manual_seed(2)).frames


def lora_pipelines(tmp_path):
    """Two tiny WanPipelines on equal transformers (one to compile, one eager reference) and a LoRA file for them."""
    pipes = [wan_pipeline(wan(frames=2, height=8, width=8, head_dim=64)[0]) for _ in range(2)]
    (pipe, args), (reference, _) = pipes
    return pipe, reference, args, write_lora(pipe.transformer, tmp_path / "lora")


def self_attention_rewritten(dump_dir, graph):
    sites = json.loads((graph_dirs(dump_dir)[graph] / "analysis.json").read_text())["sites"]
    return [s["rewritten"] for s in sites if s["self_attention"]]


def test_lora_loaded_and_fused_before_compile(tmp_path):
    pipe, reference, args, lora = lora_pipelines(tmp_path)
    base = generate(reference, args)
    for p in (pipe, reference):
        p.load_lora_weights(tmp_path / "lora", weight_name=lora)
        p.fuse_lora()
    expected = generate(reference, args)
    assert not torch.allclose(expected, base, atol=1e-3)
    pipe.transformer = vsparse(pipe.transformer, tmp_path / "dump", fullgraph=True)
    torch.testing.assert_close(generate(pipe, args), expected, rtol=1e-4, atol=1e-5)
    assert len(graph_dirs(tmp_path / "dump")) == 1 and self_attention_rewritten(tmp_path / "dump", 0) == [True, True]


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_lora_loaded_fused_and_unfused_after_compile(tmp_path, how):
    """diffusers' LoRA loader (peft) on a compiled transformer. Loading wraps layers and fusing flips peft's `merged`
    state: Dynamo's guards fail and the model is compiled again (sparse); unfusing restores the weights in place and
    reuses the graph compiled before fusing. `pipe.fuse_lora()` and `pipe.unfuse_lora()` skip a transformer wrapped by
    torch.compile (diffusers fuses only components whose class is a ModelMixin): call them on `pipe.transformer`, or
    compile in place with `Module.compile`."""
    pipe, reference, args, lora = lora_pipelines(tmp_path)
    dump = tmp_path / "dump"
    model = pipe.transformer
    if how == "torch.compile":
        pipe.transformer = vsparse(model, dump, fullgraph=True)
    else:
        model.compile(backend="vsparse", options=OPTIONS | dict(dump_dir=str(dump)), fullgraph=True)
    steps = {"compiled": lambda p: None,
             "loaded": lambda p: p.load_lora_weights(tmp_path / "lora", weight_name=lora),
             "fused": lambda p: p.fuse_lora(), "unfused": lambda p: p.unfuse_lora()}
    graphs = []
    merged = False
    for name, change in steps.items():
        change(reference)
        change(pipe)
        if name in ("fused", "unfused") and how == "torch.compile":
            assert model.blocks[0].attn1.to_q.merged == merged  # diffusers skipped the wrapped transformer
            change(pipe.transformer)  # the model's own fuse_lora / unfuse_lora
        merged = name == "fused"
        assert getattr(model.blocks[0].attn1.to_q, "merged", False) == merged
        torch.testing.assert_close(generate(pipe, args), generate(reference, args), rtol=1e-4, atol=1e-5)
        graphs.append(len(graph_dirs(dump)))
    assert graphs == [1, 2, 3, 3], graphs
    assert all(self_attention_rewritten(dump, g) == [True, True] for g in range(3))


@pytest.mark.parametrize("order,conversion,generations", [
    ("torch.compile, offload", "data", 2), ("torch.compile, offload", "swap", 2),
    ("offload, Module.compile", "data", 2), ("offload, torch.compile", "data", 1)])
def test_model_cpu_offload_keeps_the_model_state(tmp_path, order, conversion, generations):
    """`enable_model_cpu_offload()` needs an accelerator (diffusers raises "requires accelerator, but not found"
    without one); with `device="cpu"` its accelerate hooks run all the same: the transformer's `.to(device)` before
    every forward, the whole pipeline back to the CPU after each generation. Parameters keep their identity through
    `.to()` (`param.data = ...`, or `torch.utils.swap_tensors` for tensor-subclass parameters and under
    `set_swap_module_params_on_conversion(True)`, which weak references to parameters made raise), so the compiled
    model keeps its step tracking across generations. Compiled after the offload, accelerate's
    `torch.compiler.disable`d pre-forward runs before the one compiled graph. With the torch.compile wrapper compiled
    after the offload, only the first generation runs compiled: re-arming the offload after it, accelerate sets the
    wrapper's `forward` to the model's eager one (it reaches the model's hook attributes through the wrapper)."""
    model, _ = wan(frames=2, height=8, width=8, head_dim=64)
    pipe, args = wan_pipeline(model, steps=2)
    expected = generate(pipe, args)
    key = next(model.parameters())
    first, then = order.split(", ")
    for step in (first, then):
        if step == "offload":
            pipe.enable_model_cpu_offload(device="cpu")
        elif step == "torch.compile":
            pipe.transformer = vsparse(model, tmp_path)
        else:
            model.compile(backend="vsparse", options=OPTIONS | dict(dump_dir=str(tmp_path)))
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(conversion == "swap")
    try:
        for _ in range(2):
            torch.testing.assert_close(generate(pipe, args), expected, rtol=1e-4, atol=1e-5)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert next(model.parameters()) is key
    rows = dit_compiler.stats(model)
    assert [(r["generation"], r["branch"], r["calls"]) for r in rows] == [
        (g, b, 2) for g in range(generations) for b in (0, 1)]
    assert len(graph_dirs(tmp_path)) == 1 and self_attention_rewritten(tmp_path, 0) == [True, True]


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["torch.compile, offload", "offload, Module.compile"])
def test_model_cpu_offload_on_cuda_moves_the_compiled_transformer(tmp_path, order):
    """The real thing (`pytest -m gpu tests/test_pipelines.py` on the lent GPU): the transformer moves to the GPU
    at its first forward and back to the CPU after each generation; the compiled model keeps its parameters, its
    step tracking and its sparse graph across the moves."""
    model, _ = wan(frames=2, height=8, width=8, head_dim=64)
    pipe, args = wan_pipeline(model, steps=3)
    # Given prompt embeddings are used where they are: a pipeline on CUDA needs them there.
    args = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    expected = generate(pipe.to("cuda"), args)
    pipe.to("cpu")
    key = next(model.parameters())
    first, then = order.split(", ")
    for step in (first, then):
        if step == "offload":
            pipe.enable_model_cpu_offload()
        elif step == "torch.compile":
            pipe.transformer = vsparse(model, tmp_path)
        else:
            model.compile(backend="vsparse", options=OPTIONS | dict(dump_dir=str(tmp_path)))
    for _ in range(2):
        out = generate(pipe, args)
        assert out.device.type == "cuda" and key.device.type == "cpu"  # offloaded again after the generation
        torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    assert next(model.parameters()) is key
    rows = dit_compiler.stats(model)
    assert [(r["generation"], r["branch"], r["calls"]) for r in rows] == [(g, b, 3) for g in (0, 1) for b in (0, 1)]
    assert len(graph_dirs(tmp_path)) == 1 and self_attention_rewritten(tmp_path, 0) == [True, True]


class OneModelPerCacheContext(torch.nn.Module):
    """Stands in for a pipeline's transformer: the calls of each `cache_context` name go to a model of their own."""

    def __init__(self, models: dict):
        super().__init__()
        self.models = models  # a plain dict: the models stay out of this module's parameters
        first = next(iter(models.values()))
        self.config, self.dtype, self.device, self.current = first.config, first.dtype, first.device, None

    @contextlib.contextmanager
    def cache_context(self, name, **kwargs):
        self.current = name
        try:
            yield
        finally:
            self.current = None

    def forward(self, **kwargs):
        return self.models[self.current](**kwargs)


def test_cache_context_branches_cache_as_separate_models(tmp_path):
    """WanPipeline wraps its cond and uncond calls in `transformer.cache_context(...)`, whose name vsparse does not
    read (docs/DESIGN.md says why): the branch comes from the repeated timestep. Its cache then decides for each
    branch exactly as a model that only ever sees that branch's calls would."""
    model, _ = wan(frames=2, height=8, width=8, head_dim=64)
    pipe, args = wan_pipeline(model, steps=6)
    cache = dict(cache="easycache", cache_threshold=0.3)
    compiled = torch.compile(model, backend="vsparse", options=OPTIONS | cache)
    per_branch = {name: torch.compile(copy.deepcopy(model), backend="vsparse", options=OPTIONS | cache)
                  for name in ("cond", "uncond")}
    pipe.transformer = OneModelPerCacheContext(per_branch)
    expected = generate(pipe, args)
    pipe.transformer = compiled
    torch.testing.assert_close(generate(pipe, args), expected, rtol=1e-5, atol=1e-6)
    rows = dit_compiler.stats(compiled)
    assert [(r["branch"], r["calls"]) for r in rows] == [(0, 6), (1, 6)]
    assert [r["reused"] for r in rows] == [dit_compiler.stats(per_branch[name])[0]["reused"]
                                           for name in ("cond", "uncond")]
    assert all(r["reused"] > 0 for r in rows), rows


def cache_hook(name, now):
    """A diffusers cache config that skips work as soon as it may; `now["t"]` is the current timestep."""
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    if name == "first_block_cache":
        # a threshold no change reaches: after its first call the hook skips every block but the first
        return FirstBlockCacheConfig(threshold=1e9)
    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                           spatial_attention_timestep_skip_range=(100, 950),
                                           current_timestep_callback=lambda: now["t"])


def hooked(name, now):
    model, inputs = wan(frames=3, height=6, width=10, head_dim=64)
    model.enable_cache(cache_hook(name, now))
    return model, inputs


def cached_run(model, inputs, t, now):
    now["t"] = torch.tensor(float(t))  # a pipeline's current_timestep is the scheduler's timestep tensor
    with model.cache_context("cond"):
        return run(model, inputs, t)


HOOKS = ["first_block_cache", "pyramid_attention_broadcast"]


@pytest.mark.parametrize("hook", HOOKS)
def test_diffusers_cache_hook_with_easycache_leaves_only_diffusers_cache(tmp_path, hook):
    """What happens today: both hooks decide outside the graph (FirstBlockCache in a `torch.compiler.disable`d
    function, PyramidAttentionBroadcast by comparing the timestep tensor on the host), so Dynamo breaks the graph
    around every block; no fragment holds the block stack or a token grid, so vsparse's cache and sparse attention
    are both off and only diffusers' cache runs (the output is eager's with the hook)."""
    now, reference_now = {}, {}
    reference, inputs = hooked(hook, reference_now)
    model, _ = hooked(hook, now)
    compiled = torch.compile(model, backend="vsparse", options=dict(
        sparsity="draft", cache="easycache", cache_threshold=0.5, dump_dir=str(tmp_path)))
    plain, _ = wan(frames=3, height=6, width=10, head_dim=64)
    skipped = False
    for t in (900, 850, 800, 750):
        out = cached_run(compiled, inputs, t, now)
        torch.testing.assert_close(out, cached_run(reference, inputs, t, reference_now), rtol=1e-4, atol=1e-5)
        skipped |= not torch.allclose(out, run(plain, inputs, t), atol=1e-3)
    assert skipped  # the hook did skip work
    assert len(graph_dirs(tmp_path)) > 2
    for d in graph_dirs(tmp_path):
        analysis = json.loads((d / "analysis.json").read_text())
        assert analysis["stacks"] == [] and "cache disabled: no transformer block stack recognized" in analysis["notes"]
        assert not any(s["rewritten"] for s in analysis["sites"])
    assert all(row["reused"] == 0 for row in dit_compiler.stats(compiled))


@pytest.mark.parametrize("hook", HOOKS)
def test_diffusers_cache_hook_refused_under_fullgraph(hook):
    now = {}
    model, inputs = hooked(hook, now)
    compiled = torch.compile(model, backend="vsparse", options=dict(cache="easycache"), fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=f"diffusers/hooks/{hook}.py"):  # the break is the hook's
        cached_run(compiled, inputs, 900, now)


def test_easycache_without_a_block_stack_warns(caplog, monkeypatch):
    """A diffusers cache hook splits the stack across graphs: vsparse's cache was off with only a note in the dump."""
    import dit_compiler.backend

    monkeypatch.setattr(dit_compiler.backend, "_warned_no_stack", [])
    now = {}
    model, inputs = hooked("first_block_cache", now)
    compiled = torch.compile(model, backend="vsparse", options=dict(cache="easycache"))
    cached_run(compiled, inputs, 900, now)
    assert any(r.levelname == "WARNING" and r.name.startswith("dit_compiler") for r in caplog.records)
