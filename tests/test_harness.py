"""The quality harness: the training script's data and checkpoint, and benchmarks/quality.py's metrics and report."""
import json
import math

import pytest
import torch

from repo_modules import load

train = load("examples/train_tiny_video_dit.py")
quality = load("benchmarks/quality.py")


@pytest.fixture(scope="module")
def tiny_harness(tmp_path_factory):
    out = tmp_path_factory.mktemp("harness")
    record = train.main(["--preset", "tiny", "--out", str(out), "--max-steps", "4"])
    return out, record


def test_tiny_preset_writes_a_loadable_checkpoint_and_its_record(tiny_harness):
    out, record = tiny_harness
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_size <= 16e6
    saved = json.loads((out / "harness.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["steps"] == 4 and saved["samples"] == 4 * saved["batch_size"]
    assert math.isfinite(saved["final_loss"])
    assert saved["shift"] == train.SHIFT and len(saved["captions"]) == 16
    assert saved["token_grid"] == [3, 8, 8] and saved["latent_shape"] == [16, 3, 16, 16]
    assert saved["command"].startswith("python examples/train_tiny_video_dit.py --preset tiny")
    locality = saved["attention_locality"]
    assert [entry["layer"] for entry in locality["layers"]] == [0, 1]
    for entry in locality["layers"]:
        for name in ("frame_pm1", "spatial_window"):
            assert all(0 <= share <= 1 for share in entry[name]["per_head"])
    # 3 frames: a query in the middle frame sees all of them within +-1, one at either end two of three.
    assert locality["uniform"]["frame_pm1"] == pytest.approx(1 / 3 + 2 / 3 * 2 / 3, abs=0.05)

    model, harness, captions, null = quality.load_harness(out, torch.device("cpu"), torch.float32)
    assert harness == saved and captions.shape == (16, 4, 32) and null.shape == (4, 32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    latents = torch.randn(1, *saved["latent_shape"])
    with torch.no_grad():
        prediction = model(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=captions[:1],
                           return_dict=False)[0]
    assert prediction.shape == latents.shape and torch.isfinite(prediction).all()


def test_procedural_videos_move_as_their_caption_says():
    data = train.ProceduralVideos(6, 32, 32, "cpu", seed=0)
    latents, caption = data.sample(24, torch.Generator().manual_seed(5))
    assert latents.shape == (24, 16, 6, 32, 32) and caption.shape == (24,)
    frames = latents.transpose(1, 2).flatten(2)  # [B, F, C*H*W]
    frames = (frames - frames.mean(-1, keepdim=True)) / frames.std(-1, keepdim=True)
    consecutive = (frames[:, 1:] * frames[:, :-1]).mean(-1).mean().item()
    across_videos = (frames[1:] * frames[:-1]).mean(-1).mean().item()  # same frame index, different videos
    assert consecutive > 0.6 and consecutive > across_videos + 0.4
    motion = (latents[:, :, 1:] - latents[:, :, :-1]).abs().mean().item()
    assert motion > 0.1 * latents.std().item()

    rendered = data.render(24, torch.Generator().manual_seed(6))
    mask = rendered["mask"]  # [B, F, H, W]
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    area = mask.sum((2, 3))
    centroid = torch.stack([(mask * xs).sum((2, 3)) / area, (mask * ys).sum((2, 3)) / area], -1)  # [B, F, 2]
    direction = torch.tensor(train.DIRECTION_VECTORS)[rendered["caption"] % len(train.DIRECTIONS)]
    along = ((centroid[:, -1] - centroid[:, 0]) * direction).sum(-1)  # pixels moved along the caption's direction
    assert (along > 2).float().mean() >= 0.9


def test_caption_embeddings_share_tokens_by_word():
    captions, null = train.caption_embeddings(8, seed=0)
    assert captions.shape == (16, 4, 8) and torch.equal(null, torch.zeros(4, 8))
    # "a disc moving left" and "a disc moving up" share three words; "a square moving up" shares two with the latter
    assert torch.equal(captions[0, :3], captions[2, :3]) and not torch.equal(captions[0, 3], captions[2, 3])
    assert torch.equal(captions[2, 2:], captions[6, 2:]) and not torch.equal(captions[2, 1], captions[6, 1])


def test_psnr_of_a_known_error():
    reference = torch.rand(2, 16, 3, 8, 8)
    assert quality.psnr(reference, reference, 1.0) == math.inf
    assert quality.psnr(reference + 0.1, reference, 2.0) == pytest.approx(10 * math.log10(4 / 0.01))
    noisy = reference.clone()
    noisy.view(-1)[::2] += 0.2  # half the entries off by 0.2: MSE 0.02
    assert quality.psnr(noisy, reference, 1.0) == pytest.approx(10 * math.log10(1 / 0.02))


def test_ssim_on_known_inputs():
    x = torch.rand(4, 3, 16, 16)
    assert quality.ssim(x, x, 1.0) == pytest.approx(1.0)
    # Constant images: no variance, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 R)^2.
    a, b, c1 = 0.5, 0.6, 1e-4
    assert quality.ssim(torch.full((2, 2, 12, 12), b), torch.full((2, 2, 12, 12), a), 1.0) == pytest.approx(
        (2 * a * b + c1) / (a * a + b * b + c1))
    # Mirrored detail about a large common mean: luminance term ~1, contrast-structure term (2 cov + C2) /
    # (var x + var y + C2) ~ (-2 + 0.0576) / (2 + 0.0576) for unit variance and R = 8.
    z = torch.randn(1, 1, 64, 64)
    assert quality.ssim(10 - z, 10 + z, 8.0) == pytest.approx((-2 + 0.0576) / (2 + 0.0576), abs=0.05)
    assert quality.ssim(x + 0.3 * torch.randn_like(x), x, 1.0) < quality.ssim(x + 0.05 * torch.randn_like(x), x, 1.0)
    with pytest.raises(ValueError, match="C, F, H, W"):
        quality.ssim(x[0], x[0], 1.0)


def test_stack_counts_and_relative_work():
    # dit_compiler.stats rows of one generation, two CFG branches: branch 0 computed a dense-phase call (both sites
    # at 1) and a sparse one (0.25, 0.75); branch 1 reused one call and computed one (0.25, 0.25).
    rows = [{"graph": 0, "generation": 0, "branch": 0, "calls": 2, "computed": 2, "reused": 0, "dense_calls": 1,
             "dense_computed": 1, "density": {"s1": 0.625, "s2": 0.875}},
            {"graph": 0, "generation": 0, "branch": 1, "calls": 2, "computed": 1, "reused": 1, "dense_calls": 0,
             "dense_computed": 0, "density": {"s1": 0.25, "s2": 0.25}},
            {"graph": 0, "generation": 1, "branch": 0, "calls": 1, "computed": 0, "reused": 1, "dense_calls": 0,
             "dense_computed": 0, "density": {}}]
    counts = quality.stack_counts(rows)
    assert counts == {"calls": 5, "reused": 2, "dense_calls": 1, "dense_computed": 1,
                      "mean_density": {"s1": pytest.approx(0.5), "s2": pytest.approx(2 / 3)}}
    # 4 layers, 2 sparse sites at computed-call means 0.5 and 2/3: attention costs (2 + 0.5 + 2/3) / 4 of dense
    # (the same as 1 dense call and 2 sparse calls at (2 + 0.75) / 4 each, over 3 computed); 3 of 5 calls computed.
    attention = (2 + 0.5 + 2 / 3) / 4
    assert attention == pytest.approx((1 + 2 * 0.6875) / 3)
    assert quality.relative_work(counts, 0.8, 4) == pytest.approx(0.6 * (0.2 + 0.8 * attention))
    assert quality.relative_work({"calls": 6, "reused": 0, "dense_calls": 2, "mean_density": {}}, 0.8, 4) == 1.0
    assert quality.relative_work({"calls": 2, "reused": 2, "dense_calls": 0, "mean_density": {}}, 0.8, 4) == 0.0


def test_attention_share_counts_flops_per_token():
    config = {"num_attention_heads": 4, "attention_head_dim": 64, "ffn_dim": 1024}
    d = 256
    expected = 4 * 9216 * d / (4 * 9216 * d + 12 * d * d + 4 * 4 * d + 4 * d * 1024)
    assert quality.attention_share(config, 9216, 4) == pytest.approx(expected)


def test_settings_parse_to_typed_options():
    assert quality.parse_setting("sparsity=draft,density=0.15,dense_layers=2,cache=easycache") == {
        "sparsity": "draft", "density": 0.15, "dense_layers": 2, "cache": "easycache"}
    with pytest.raises(ValueError, match="not key=value"):
        quality.parse_setting("sparsity=draft,0.15")


def test_parts_of_the_grid_cover_it_once():
    grid = list(quality.DEFAULT_SETTINGS)
    for n in (1, 2, 3, 4, 7):
        assert sum((quality.select_part(grid, f"{k}/{n}") for k in range(1, n + 1)), []) == grid
    for bad in ("0/3", "4/3", "2", "a/b"):
        with pytest.raises(ValueError, match="K/N"):
            quality.select_part(grid, bad)


@pytest.mark.slow
def test_quality_quick_run_reports_dense_equivalent_and_sparse_settings(tiny_harness, tmp_path):
    harness, _ = tiny_harness
    report = quality.main(["--harness", str(harness), "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "quality.json").read_text(), parse_constant=float)["steps"] == 5
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "quality.md").read_text()
    dense_like, sparse = report["results"]
    assert dense_like["setting"] == "sparsity=none,cache=none" and f"`{sparse['setting']}`" in table
    assert dense_like["psnr_mean"] > 80 and dense_like["ssim_mean"] == pytest.approx(1.0, abs=1e-6)
    assert dense_like["sparse_sites"] == [0, 2] and dense_like["work"] == 1.0
    assert dense_like["resolved_options"]["cache"] == "none"
    assert quality.resolved_options({"options": {"sparsity": "svg"}}) == {
        **quality.DEFAULTS_BEFORE_2026_11_24, "sparsity": "svg", "plan_every": 1}  # a row that recorded no resolution
    # a row recorded before plan_every existed sampled every call
    assert quality.resolved_options({"resolved_options": {"sparsity": "svg"}}) == {"sparsity": "svg", "plan_every": 1}
    # Every self-attention site goes sparse (no cost model yet) and the high threshold makes the cache skip.
    assert sparse["sparse_sites"] == [2, 2]
    assert math.isfinite(sparse["psnr_mean"]) and 0 < sparse["ssim_mean"] < 1
    assert 0 < sparse["cache_skipped"] < 1 and sparse["work"] < 1
    assert 0 < sparse["mean_density"] < 1

    # A second run into the same directory reuses the dense latents, replaces the setting it reruns (the same graph:
    # Inductor's cache makes its compile cheap) and keeps the other.
    again = quality.main(["--harness", str(harness), "--quick", "--device", "cpu", "--out", str(tmp_path),
                          "--settings", "sparsity=none,cache=none"])
    assert [r["setting"] for r in again["results"]] == ["sparsity=none,cache=none", sparse["setting"]]
    assert again["dense"] == report["dense"] and again["results"][1] == json.loads(json.dumps(sparse))
    assert again["results"][0]["psnr_mean"] > 80 and again["results"][0]["first_generation_s"] != \
        dense_like["first_generation_s"]

    # The table and the plot redraw from quality.json alone.
    (tmp_path / "quality.png").unlink()
    redrawn = quality.main(["--out", str(tmp_path), "--plot-only"])
    assert [r["setting"] for r in redrawn["results"]] == ["sparsity=none,cache=none", sparse["setting"]]
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
