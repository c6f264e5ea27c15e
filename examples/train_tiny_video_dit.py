"""Train the quality harness: a small diffusers WanTransformer3DModel on procedural videos, by flow matching.

Random-weight models attend diffusely, so sparse attention and the cache cannot be judged on them. This trains
Wan's architecture (a few layers, heads of 64) on videos generated here at latent resolution: a textured shape
(disc, square, triangle, cross) moving left/right/up/down while rotating and scaling, over a textured background
that a camera pan moves. The caption ("a disc moving left", 16 of them) decides the shape and its direction;
colours, textures, speeds and the pan are random. Captions are embedded by a fixed seeded word table; 10% of the
samples see the null embedding (zeros) instead, so classifier-free guidance's unconditional branch is trained.

Rectified flow: x_s = (1 - s) x0 + s noise, target noise - x0, timestep 1000 s, with s drawn logit-normal and
then shifted as `FlowMatchEulerDiscreteScheduler(shift=SHIFT)` shifts its sigmas, so sampling at that shift
visits the noise levels training saw.

    python examples/train_tiny_video_dit.py --preset h100 --out examples/harness   # one H100, about 8 minutes
    python examples/train_tiny_video_dit.py --preset tiny --out /tmp/harness        # CPU, seconds (tests)

Writes into --out: the fp16 model (`save_pretrained`: config.json + diffusion_pytorch_model.safetensors), the
caption embeddings (text_embeddings.safetensors: `captions` [16, tokens, text_dim], `null` [tokens, text_dim]) and
harness.json (command, preset, shift, captions, latent shape, token grid, seed, steps, losses, attention locality).
Finally it prints, per layer, the share of self-attention mass within +-1 frame and within a spatial window of
latent tokens against the share a uniform distribution would put there.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SHAPES = ("disc", "square", "triangle", "cross")
DIRECTIONS = ("left", "right", "up", "down")
# Screen-space unit vectors (x right, y down) of the directions above.
DIRECTION_VECTORS = ((-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0))
CAPTIONS = tuple(f"a {shape} moving {direction}" for shape in SHAPES for direction in DIRECTIONS)
LATENT_CHANNELS = 16
SHIFT = 3.0  # the shift of Wan's 480p pipelines; sampling must use the same
CAPTION_DROPOUT = 0.1


@dataclass(frozen=True)
class Preset:
    model: dict  # WanTransformer3DModel keyword arguments
    latent: tuple  # frames, height, width of the latent video
    batch_size: int
    lr: float
    minutes: float  # wall-clock budget of the training loop
    warmup_steps: int
    log_every: int
    device: str
    locality_rows: int  # query rows sampled per layer for the attention-locality figures
    spatial_window: int  # side of the spatial window in latent tokens (odd)
    max_steps: int = 0  # 0: until the time budget is spent


PRESETS = {
    # 9 x 32 x 32 = 9,216 tokens a sample. ~6.9 M parameters: 13.9 MB in fp16.
    "h100": Preset(model=dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64,
                              in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=64, freq_dim=128,
                              ffn_dim=1024, num_layers=6, cross_attn_norm=True, rope_max_seq_len=64),
                   latent=(9, 64, 64), batch_size=16, lr=5e-4, minutes=7.0, warmup_steps=100, log_every=50,
                   device="cuda", locality_rows=512, spatial_window=9),
    # Two layers at a toy grid (3 x 8 x 8 tokens): seconds on a CPU, for tests.
    "tiny": Preset(model=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64,
                              in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=32, freq_dim=32,
                              ffn_dim=256, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32),
                   latent=(3, 16, 16), batch_size=2, lr=1e-3, minutes=1.0, warmup_steps=2, log_every=5,
                   device="cpu", locality_rows=64, spatial_window=5, max_steps=20),
}


# ----------------------------------------------------------------------------------------------------------------
# Captions


def caption_embeddings(tokens_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([len(CAPTIONS), 4, dim], [4, dim]): each caption is 4 words ("a", shape, "moving", direction) looked up in a
    fixed seeded word table, so captions sharing a word share a token; the null embedding is zeros (as padding)."""
    vocab = ("a", "moving") + SHAPES + DIRECTIONS
    table = torch.randn(len(vocab), tokens_dim, generator=torch.Generator().manual_seed(seed))
    index = {word: i for i, word in enumerate(vocab)}
    ids = torch.tensor([[index[w] for w in caption.split()] for caption in CAPTIONS])
    return table[ids], torch.zeros(ids.shape[1], tokens_dim)


# ----------------------------------------------------------------------------------------------------------------
# Procedural videos, generated at latent resolution


def _shape_distance(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance-like field of each sample's shape in its own (rotated, scaled) coordinates; < 0 inside.
    kind [B] indexes SHAPES; u, v [B, F, H, W]."""
    disc = torch.sqrt(u * u + v * v + 1e-12) - 1.0
    square = torch.maximum(u.abs(), v.abs()) - 0.85
    triangle = torch.maximum(u.abs() * 0.866 + v * 0.5, -v) - 0.5
    cross = torch.minimum(torch.maximum(u.abs() - 1.0, v.abs() - 0.35), torch.maximum(u.abs() - 0.35, v.abs() - 1.0))
    fields = torch.stack([disc, square, triangle, cross])  # [4, B, F, H, W]
    return fields.gather(0, kind.view(1, -1, 1, 1, 1).expand(1, *u.shape))[0]


class ProceduralVideos:
    """Latent videos [B, 16, frames, height, width] whose content the caption index decides.

    Each frame is rendered as RGB plus two texture channels (the shape's mask and the texture value under each
    pixel); a fixed random 3x3 convolution maps those 5 channels to the 16 latent channels (full rank, spatially
    mixed like a VAE's latents), standardized per channel with statistics of a fixed reference batch. Per-sample
    parameters are drawn on the CPU from the caller's generator (reproducible on any device); rendering runs on the
    device, batched."""

    def __init__(self, frames: int, height: int, width: int, device: torch.device | str, seed: int = 0) -> None:
        self.frames, self.height, self.width = frames, height, width
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self.projection = (torch.randn(LATENT_CHANNELS, 5, 3, 3, generator=g) / math.sqrt(5 * 9)).to(self.device)
        self.mean = torch.zeros(LATENT_CHANNELS, device=self.device)
        self.std = torch.ones(LATENT_CHANNELS, device=self.device)
        reference, _ = self.sample(32, torch.Generator().manual_seed(seed + 1))
        self.mean = reference.mean(dim=(0, 2, 3, 4))
        self.std = reference.std(dim=(0, 2, 3, 4))

    def _parameters(self, batch: int, g: torch.Generator) -> dict:
        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(batch, *shape, generator=g)

        caption = torch.randint(len(CAPTIONS), (batch,), generator=g)
        direction = torch.tensor(DIRECTION_VECTORS)[caption % len(DIRECTIONS)]
        normal = direction.flip(1)  # perpendicular to the motion
        speed = uniform(0.06, 0.13)  # screen units ([-1, 1] across) per frame
        travel = speed * (self.frames - 1)
        start = -direction * (travel / 2)[:, None] + normal * uniform(-0.45, 0.45)[:, None] + uniform(-0.1, 0.1, 2)
        pan_angle = uniform(0, 2 * math.pi)
        return dict(
            caption=caption, kind=caption // len(DIRECTIONS), start=start, velocity=direction * speed[:, None],
            angle=uniform(0, 2 * math.pi), spin=uniform(-0.3, 0.3), size=uniform(0.2, 0.32),
            growth=uniform(-0.06, 0.06), shape_colors=torch.rand(batch, 2, 3, generator=g),
            stripe_freq=uniform(1.5, 4.0), stripe_phase=uniform(0, 2 * math.pi),
            pan=torch.stack([pan_angle.cos(), pan_angle.sin()], 1) * uniform(0.0, 0.08)[:, None],
            bg_colors=torch.rand(batch, 2, 3, generator=g), bg_freq=uniform(1.0, 5.0, 3),
            bg_angle=uniform(0, math.pi, 3), bg_phase=uniform(0, 2 * math.pi, 3), bg_amp=uniform(0.3, 1.0, 3))

    def render(self, batch: int, g: torch.Generator) -> dict:
        """RGB [B, F, 3, H, W], the shape's mask and the texture value [B, F, H, W], and the caption index [B]."""
        p = {k: v.to(self.device) for k, v in self._parameters(batch, g).items()}
        t = torch.arange(self.frames, device=self.device, dtype=torch.float32).view(1, -1, 1, 1)
        ys = (torch.arange(self.height, device=self.device) + 0.5) / self.height * 2 - 1
        xs = (torch.arange(self.width, device=self.device) + 0.5) / self.width * 2 - 1
        y, x = ys.view(1, 1, -1, 1), xs.view(1, 1, 1, -1)

        def per_sample(v):
            return v.view(-1, 1, 1, 1)

        # The shape: moves along the caption's direction, spins and grows or shrinks.
        centre = p["start"][:, None] + p["velocity"][:, None] * t.view(1, -1, 1)  # [B, F, 2]
        dx, dy = x - centre[..., 0, None, None], y - centre[..., 1, None, None]
        angle = per_sample(p["angle"]) + per_sample(p["spin"]) * t
        size = per_sample(p["size"]) * torch.exp(per_sample(p["growth"]) * t)
        u = (angle.cos() * dx + angle.sin() * dy) / size
        v = (-angle.sin() * dx + angle.cos() * dy) / size
        distance = _shape_distance(p["kind"], u, v) * size  # in screen units
        mask = torch.sigmoid(-distance * self.width)  # edge about one latent pixel wide
        stripes = 0.5 + 0.5 * torch.sin(math.pi * per_sample(p["stripe_freq"]) * (u + 0.5 * v)
                                         + per_sample(p["stripe_phase"]))
        # The background: three gratings seen through a panning camera.
        bx = x + p["pan"][:, 0].view(-1, 1, 1, 1) * t
        by = y + p["pan"][:, 1].view(-1, 1, 1, 1) * t
        grating = 0
        for k in range(3):
            a = p["bg_angle"][:, k].view(-1, 1, 1, 1)
            grating = grating + p["bg_amp"][:, k].view(-1, 1, 1, 1) * torch.sin(
                math.pi * p["bg_freq"][:, k].view(-1, 1, 1, 1) * (a.cos() * bx + a.sin() * by)
                + p["bg_phase"][:, k].view(-1, 1, 1, 1))
        background = 0.5 + 0.5 * torch.tanh(grating)

        def paint(colors, weight):  # two colours mixed by a [B, F, H, W] weight -> [B, F, 3, H, W]
            w = weight.unsqueeze(2)
            return colors[:, 0].view(-1, 1, 3, 1, 1) * w + colors[:, 1].view(-1, 1, 3, 1, 1) * (1 - w)

        m = mask.unsqueeze(2)
        rgb = m * paint(p["shape_colors"], stripes) + (1 - m) * paint(p["bg_colors"], background)
        texture = mask * stripes + (1 - mask) * background
        return dict(rgb=rgb, mask=mask, texture=texture, caption=p["caption"])

    def sample(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [B, 16, F, H, W], caption index [B] on the device)."""
        r = self.render(batch, g)
        features = torch.cat([r["rgb"] * 2 - 1, r["mask"].unsqueeze(2) * 2 - 1, r["texture"].unsqueeze(2) * 2 - 1], 2)
        b, f = features.shape[:2]
        latents = F.conv2d(features.flatten(0, 1), self.projection, padding=1)
        latents = latents.view(b, f, LATENT_CHANNELS, self.height, self.width).transpose(1, 2)
        latents = (latents - self.mean.view(1, -1, 1, 1, 1)) / self.std.view(1, -1, 1, 1, 1)
        return latents.contiguous(), r["caption"]


# ----------------------------------------------------------------------------------------------------------------
# Flow matching


def shifted_sigmas(batch: int, shift: float, g: torch.Generator) -> torch.Tensor:
    """Logit-normal noise levels, shifted as FlowMatchEulerDiscreteScheduler(shift) shifts its sigmas."""
    s = torch.sigmoid(torch.randn(batch, generator=g))
    return shift * s / (1 + (shift - 1) * s)


def flow_matching_loss(model, latents, text, sigmas, noise, autocast_dtype):
    s = sigmas.to(latents.device).view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    with torch.autocast(latents.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        prediction = model(hidden_states=noisy, timestep=(sigmas * 1000).to(latents.device),
                           encoder_hidden_states=text, return_dict=False)[0]
    return F.mse_loss(prediction.float(), noise - latents)


def learning_rate(preset: Preset, lr: float, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to a tenth over the wall-clock budget (progress in [0, 1])."""
    if step < preset.warmup_steps:
        return lr * (step + 1) / preset.warmup_steps
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------------------------------------------
# Attention locality


class _SelfAttentionProbe(TorchFunctionMode):
    """Sees every scaled_dot_product_attention call; inside a marked self-attention module it records, for sampled
    query rows, the attention probabilities summed over the keys of each locality mask."""

    def __init__(self, rows: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.rows, self.masks = rows, masks
        self.layer = None
        self.mass: dict[int, dict[str, list[torch.Tensor]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.layer is not None:
            # [B, H, S, D], after norm and RoPE; diffusers passes them by keyword
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            scale = kwargs.get("scale") or 1 / math.sqrt(query.shape[-1])
            rows = self.rows.to(query.device)
            logits = query[:, :, rows].float() @ key.float().transpose(-1, -2) * scale
            probs = logits.softmax(-1)  # [B, H, R, S]
            record = self.mass.setdefault(self.layer, {name: [] for name in self.masks})
            for name, mask in self.masks.items():
                record[name].append((probs * mask.to(probs.device)).sum(-1).mean(dim=(0, 2)).cpu())  # [H]
        return func(*args, **kwargs)


def attention_locality(model, data: ProceduralVideos, text: torch.Tensor, preset: Preset, seed: int,
                       autocast_dtype) -> dict:
    """Per layer, the share of self-attention mass within +-1 frame and within a spatial window (any frame), on
    clean videos noised to sigma 0.25 / 0.5 / 0.75, against the share uniform attention would put there."""
    p_t, p_h, p_w = model.config.patch_size
    frames, height, width = data.frames // p_t, data.height // p_h, data.width // p_w
    tokens = frames * height * width
    g = torch.Generator().manual_seed(seed + 2)
    rows = torch.randperm(tokens, generator=g)[: min(preset.locality_rows, tokens)]
    index = torch.arange(tokens)
    f, h, w = index // (height * width), index // width % height, index % width
    radius = preset.spatial_window // 2
    masks = {"frame_pm1": ((f[rows, None] - f[None]).abs() <= 1).float(),
             "spatial_window": (((h[rows, None] - h[None]).abs() <= radius)
                                & ((w[rows, None] - w[None]).abs() <= radius)).float()}
    probe = _SelfAttentionProbe(rows, masks)
    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.attn1.register_forward_pre_hook(lambda m, a, i=i: setattr(probe, "layer", i)))
        hooks.append(block.attn1.register_forward_hook(lambda m, a, o: setattr(probe, "layer", None)))
    latents, caption = data.sample(4, g)
    text_batch = text[caption.to(text.device)]
    try:
        with torch.no_grad(), probe:
            for sigma in (0.25, 0.5, 0.75):
                noise = torch.randn(latents.shape, generator=g).to(latents.device)
                noisy = (1 - sigma) * latents + sigma * noise
                timestep = torch.full((latents.shape[0],), 1000 * sigma, device=latents.device)
                with torch.autocast(latents.device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    model(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text_batch, return_dict=False)
    finally:
        for hook in hooks:
            hook.remove()
    layers = []
    for layer in sorted(probe.mass):
        entry = {"layer": layer}
        for name in masks:
            per_head = torch.stack(probe.mass[layer][name]).mean(0)
            entry[name] = {"mean": round(per_head.mean().item(), 4),
                           "per_head": [round(x, 4) for x in per_head.tolist()]}
        layers.append(entry)
    if len(layers) != len(model.blocks):
        raise RuntimeError(f"attention probe saw {len(layers)} self-attention layers, the model has "
                           f"{len(model.blocks)}: diffusers' Wan attention no longer calls "
                           "F.scaled_dot_product_attention")
    return {"token_grid": [frames, height, width], "spatial_window": preset.spatial_window, "sigmas": [0.25, 0.5, 0.75],
            "query_rows": len(rows),
            "uniform": {name: round(mask.mean().item(), 4) for name, mask in masks.items()}, "layers": layers}


def print_locality(locality: dict) -> None:
    u = locality["uniform"]
    k = locality["spatial_window"]
    print(f"self-attention mass per layer (mean over heads; per-head range), token grid "
          f"{'x'.join(map(str, locality['token_grid']))}:")
    print(f"{'layer':>5}  {'+-1 frame':>22}  {f'{k}x{k} window':>22}   (uniform: {u['frame_pm1']:.3f} / "
          f"{u['spatial_window']:.3f})")
    for entry in locality["layers"]:
        cells = []
        for name in ("frame_pm1", "spatial_window"):
            heads = entry[name]["per_head"]
            mean = entry[name]["mean"]
            cells.append(f"{mean:.3f} ({min(heads):.2f}-{max(heads):.2f}) x{mean / u[name]:.1f}")
        print(f"{entry['layer']:>5}  {cells[0]:>22}  {cells[1]:>22}")


# ----------------------------------------------------------------------------------------------------------------


def build_model(preset: Preset, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**preset.model)


def save_harness(model, out: Path, text: torch.Tensor, null: torch.Tensor, record: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    half = type(model).from_config(model.config)  # a copy: the trained fp32 model stays for the analysis
    half.load_state_dict(model.state_dict())
    half.half().save_pretrained(out, safe_serialization=True)  # half(), not to(): every weight in fp16
    save_file({"captions": text.cpu().contiguous(), "null": null.cpu().contiguous()},
              str(out / "text_embeddings.safetensors"))
    record["checkpoint_bytes"] = (out / "diffusion_pytorch_model.safetensors").stat().st_size
    write_record(out, record)


def write_record(out: Path, record: dict) -> None:
    (out / "harness.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    parser.add_argument("--out", required=True, help="directory for the checkpoint and harness.json")
    parser.add_argument("--minutes", type=float, help="wall-clock budget of the training loop (preset's default)")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (0: the time budget decides)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--device", help="default: the preset's (cuda for h100, cpu for tiny)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    minutes = preset.minutes if args.minutes is None else args.minutes
    max_steps = preset.max_steps if args.max_steps is None else args.max_steps
    batch_size = args.batch_size or preset.batch_size
    lr = args.lr or preset.lr
    device = torch.device(args.device or preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} asked for, but CUDA is not available (use --device cpu)")
    # bf16 autocast on the GPU (fp32 master weights); fp32 on the CPU.
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    out = Path(args.out)

    model = build_model(preset, args.seed).to(device).train()
    parameters = sum(p.numel() for p in model.parameters())
    frames, height, width = preset.latent
    p_t, p_h, p_w = preset.model["patch_size"]
    grid = [frames // p_t, height // p_h, width // p_w]
    data = ProceduralVideos(frames, height, width, device, seed=args.seed)
    text, null = caption_embeddings(preset.model["text_dim"], args.seed)
    text, null = text.to(device), null.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed + 3)  # sample parameters, on the CPU
    g_device = torch.Generator(device=device).manual_seed(args.seed + 4)  # noise, on the device
    print(f"preset {args.preset}: {parameters / 1e6:.2f} M parameters, {math.prod(grid)} tokens a sample "
          f"({'x'.join(map(str, grid))}), batch {batch_size}, lr {lr}, device {device}, "
          f"{'bf16 autocast' if autocast_dtype else 'fp32'}, budget {minutes} min"
          + (f" or {max_steps} steps" if max_steps else ""), flush=True)

    command = ["python", "examples/train_tiny_video_dit.py", *(sys.argv[1:] if argv is None else argv)]
    record = {"command": shlex.join(command),
              "preset": args.preset, "preset_values": asdict(preset), "seed": args.seed, "shift": SHIFT,
              "caption_dropout": CAPTION_DROPOUT, "captions": list(CAPTIONS), "null_caption": "zeros",
              "latent_shape": [LATENT_CHANNELS, frames, height, width], "token_grid": grid,
              "tokens": math.prod(grid), "parameters": parameters, "batch_size": batch_size, "lr": lr,
              "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
              "torch": torch.__version__}
    losses, recent = [], []
    step, start = 0, time.perf_counter()
    budget_s = minutes * 60
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s or (max_steps and step >= max_steps):
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(preset, lr, step, elapsed / budget_s)
        latents, caption = data.sample(batch_size, g)
        cond = text[caption]
        dropped = (torch.rand(batch_size, generator=g) < CAPTION_DROPOUT).to(device)
        cond = torch.where(dropped.view(-1, 1, 1), null.expand_as(cond), cond)
        noise = torch.randn(latents.shape, generator=g_device, device=device)
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = flow_matching_loss(model, latents, cond, shifted_sigmas(batch_size, SHIFT, g), noise,
                                      autocast_dtype)
            loss.backward()
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            out_of_memory = True  # handled outside the except block, once its frames (and activations) are freed
        else:
            out_of_memory = False
        if out_of_memory:
            optimizer.zero_grad(set_to_none=True)
            latents = noise = cond = None
            torch.cuda.empty_cache()
            batch_size //= 2
            record["batch_size"] = batch_size
            print(f"out of GPU memory at step {step}: batch size halved to {batch_size}", flush=True)
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(loss.detach())
        step += 1
        if step % preset.log_every == 0 or step == 1:
            mean = torch.stack(recent).mean().item()
            recent = []
            if not math.isfinite(mean):
                raise SystemExit(f"loss is {mean} at step {step}: training diverged (try a lower --lr)")
            losses.append([step, round(time.perf_counter() - start, 1), round(mean, 5)])
            memory = ""
            if device.type == "cuda":
                record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                memory = f"  peak memory {record['peak_gpu_memory_gib']} GiB"
            print(f"step {step:6d}  {time.perf_counter() - start:7.1f} s  loss {mean:.4f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}{memory}", flush=True)
    if recent:
        losses.append([step, round(time.perf_counter() - start, 1), round(torch.stack(recent).mean().item(), 5)])
    train_s = time.perf_counter() - start
    model.eval()
    record.update(steps=step, samples=step * batch_size, train_seconds=round(train_s, 1),
                  final_loss=losses[-1][2] if losses else None, loss_log=losses)
    print(f"{step} steps in {train_s:.1f} s, final loss {record['final_loss']}", flush=True)
    # Save before the analysis, so a failure there loses nothing.
    save_harness(model, out, text, null, record)
    print(f"wrote {out} ({record['checkpoint_bytes'] / 2**20:.2f} MiB checkpoint)", flush=True)
    record["attention_locality"] = attention_locality(model, data, text, preset, args.seed, autocast_dtype)
    write_record(out, record)
    print_locality(record["attention_locality"])
    return record


if __name__ == "__main__":
    main()
