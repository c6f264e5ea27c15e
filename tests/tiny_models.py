"""Small random-weight diffusers video DiTs and inputs for them, shared by the tests.

Each builder takes the latent grid (frames, height, width in latent pixels) so tests can draw odd sizes; token
grids are frames x height/2 x width/2 for all three (spatial patch 2, temporal patch 1).
"""
from __future__ import annotations

import contextlib

import torch


def wan(frames=3, height=6, width=10, text=7, layers=2, batch=1, seed=0, head_dim=16):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=64, num_layers=layers, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(batch, 4, frames, height, width),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, text, 32),
        return_dict=False,
    )
    return model, inputs


def hunyuan(frames=3, height=6, width=10, text=5, valid_text=3, layers=1, single_layers=1, batch=1, seed=0,
            head_dim=16):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=head_dim, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
        rope_axes_dim=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    ).eval()
    mask = torch.zeros(batch, text, dtype=torch.long)
    for row, valid in zip(mask, [valid_text] * batch if isinstance(valid_text, int) else valid_text):
        row[:valid] = 1  # valid_text: one count for all, or one per batch element
    inputs = dict(
        hidden_states=torch.randn(batch, 4, frames, height, width),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_hidden_states=torch.randn(batch, text, 32),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 16),
        guidance=torch.full((batch,), 3500.0),
        return_dict=False,
    )
    return model, inputs


def cogvideox(frames=3, height=6, width=10, text=5, layers=2, batch=1, seed=0, head_dim=16):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=layers, sample_width=width, sample_height=height, sample_frames=4 * (frames - 1) + 1,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=text,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(batch, frames, 4, height, width),
        encoder_hidden_states=torch.randn(batch, text, 32),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        return_dict=False,
    )
    return model, inputs


BUILDERS = {"wan": wan, "hunyuan": hunyuan, "cogvideox": cogvideox}


def wan_pipeline(transformer, transformer_2=None, steps=2, **call):
    """A WanPipeline around tiny transformers (`wan()`'s: 4 latent channels, text dim 32) with a tiny VAE and no text
    encoder, and the arguments of one generation from fixed prompt embeddings: `pipe(**args, generator=...)`."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(
        shift=3.0), transformer=transformer, transformer_2=transformer_2,
        boundary_ratio=None if transformer_2 is None else 0.875)
    pipe.set_progress_bar_config(disable=True)
    prompt = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    args = dict(prompt_embeds=prompt, negative_prompt_embeds=torch.zeros_like(prompt), height=16, width=16,
                num_frames=5, num_inference_steps=steps, guidance_scale=4.0, output_type="latent")
    return pipe, dict(args, **call)


class _Patches(torch.nn.Module):
    """Conv3d patch embedding (1, 2, 2) flattened into tokens, as diffusers' video DiTs do."""

    def __init__(self, channels, dim):
        super().__init__()
        self.proj = torch.nn.Conv3d(channels, dim, (1, 2, 2), stride=(1, 2, 2))

    def forward(self, latent):
        return self.proj(latent).flatten(2).transpose(1, 2)


class _ExplicitBlock(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, 0.5 / (dim // heads) ** 0.5
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.modulation = torch.nn.Linear(dim, dim)
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.cross_q, self.cross_kv, self.cross_out = (torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim),
                                                       torch.nn.Linear(dim, dim))

    def forward(self, x, temb, text):
        b, s, d = x.shape
        h = self.heads
        y = self.norm1(x) * (1 + self.modulation(temb)[:, None])
        q, k, v = self.qkv(y).reshape(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)
        probs = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        x = x + self.out((probs @ v).transpose(1, 2).reshape(b, s, d))
        q = self.cross_q(self.norm2(x)).view(b, s, h, d // h).transpose(1, 2)
        k, v = self.cross_kv(text).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / (d // h) ** 0.5
        return x + self.cross_out(torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v).transpose(1, 2).reshape(
            b, s, d))


class ExplicitAttentionDiT(torch.nn.Module):
    """A hand-written video DiT whose attention is spelled out: self-attention as softmax(q @ k^T * scale) @ v
    with matmul, cross-attention to text with einsum; sinusoidal timestep embedding from exp(arange)."""

    def __init__(self, channels=4, dim=32, heads=2, layers=2, text_dim=16, freq_dim=16):
        super().__init__()
        self.freq_dim = freq_dim
        self.patches = _Patches(channels, dim)
        self.time = torch.nn.Sequential(torch.nn.Linear(freq_dim, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))
        self.text = torch.nn.Linear(text_dim, dim)
        self.blocks = torch.nn.ModuleList(_ExplicitBlock(dim, heads) for _ in range(layers))
        self.proj_out = torch.nn.Linear(dim, channels * 4)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, f, h, w = hidden_states.shape
        half = self.freq_dim // 2
        freqs = torch.exp(-9.21 * torch.arange(half, dtype=torch.float32) / half)
        angles = timestep.float()[:, None] * freqs[None]
        temb = self.time(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))
        text = self.text(encoder_hidden_states)
        x = self.patches(hidden_states)
        for block in self.blocks:
            x = block(x, temb, text)
        x = self.proj_out(x).reshape(b, f, h // 2, w // 2, c, 2, 2)
        return (x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w),)


def explicit(frames=2, height=6, width=10, text=4, layers=2, batch=1, seed=0):
    torch.manual_seed(seed)
    inputs = dict(hidden_states=torch.randn(batch, 4, frames, height, width), timestep=torch.full((batch,), 500.0),
                  encoder_hidden_states=torch.randn(batch, text, 16))
    return ExplicitAttentionDiT(layers=layers).eval(), inputs


class MaskedSelfAttention(torch.nn.Module):
    """Self-attention over a patch grid with a key mask built by `mask_kind` from per-sample valid lengths:
    "prefix" (bool, arange < length), "additive" (0 / -inf by masked_fill), "where" (torch.where 0 / -inf),
    "suffix" (bool, arange >= length), "rows" (a [B, 1, S, S] mask), "causal" (is_causal, no mask)."""

    def __init__(self, mask_kind, channels=4, dim=32, heads=2):
        super().__init__()
        self.mask_kind, self.heads = mask_kind, heads
        self.patches = _Patches(channels, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, hidden_states, lengths):
        x = self.patches(hidden_states)
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        positions = torch.arange(s, device=x.device)
        padded = positions[None, :] >= lengths[:, None]
        masks = {
            "prefix": lambda: (positions[None, :] < lengths[:, None])[:, None, None, :],
            "additive": lambda: torch.zeros(b, s).masked_fill(padded, float("-inf"))[:, None, None, :],
            "where": lambda: torch.where(~padded, 0.0, float("-inf")).unsqueeze(1).unsqueeze(1),
            "suffix": lambda: padded[:, None, None, :],
            "rows": lambda: (padded[:, None, :, None] | padded[:, None, None, :]).logical_not(),
            "causal": lambda: None,
        }
        mask = masks[self.mask_kind]()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                               is_causal=self.mask_kind == "causal")
        return (out.transpose(1, 2).reshape(b, s, d),)


def masked_attention(mask_kind, frames=2, height=4, width=6, lengths=(5, 9), seed=0):
    torch.manual_seed(seed)
    inputs = dict(hidden_states=torch.randn(len(lengths), 4, frames, height, width),
                  lengths=torch.tensor(lengths))
    return MaskedSelfAttention(mask_kind).eval(), inputs


class PositionalQKAttention(torch.nn.Module):
    """Attention over a patch grid whose queries and keys are projected from a sinusoidal position table (no input
    reaches it) while the values are the tokens: not self-attention over the token stream, and not text either."""

    def __init__(self, channels=4, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.patches = _Patches(channels, dim)
        self.qk, self.v = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(dim, dim)

    def forward(self, hidden_states):
        x = self.patches(hidden_states)
        b, s, d = x.shape
        angles = torch.arange(s, dtype=torch.float32)[:, None] * torch.exp(-torch.arange(d // 2) / (d // 2))[None]
        positions = torch.cat([angles.sin(), angles.cos()], dim=-1).expand(b, s, d)
        q, k = self.qk(positions).view(b, s, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        v = self.v(x).view(b, s, self.heads, -1).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return (out.transpose(1, 2).reshape(b, s, d),)


def positional_qk(frames=2, height=4, width=6, seed=0):
    torch.manual_seed(seed)
    return PositionalQKAttention().eval(), dict(hidden_states=torch.randn(1, 4, frames, height, width))


class TwoGridAttention(torch.nn.Module):
    """One self-attention over prompt tokens, the patch grid of a latent and the coarser patch grid of a history
    latent (its own patch embedding), as FramePack joins latents of several scales in one sequence."""

    def __init__(self, channels=4, dim=32, heads=2, text_dim=16):
        super().__init__()
        self.heads = heads
        self.patches = _Patches(channels, dim)
        self.history = torch.nn.Conv3d(channels, dim, (2, 4, 4), stride=(2, 4, 4))
        self.text = torch.nn.Linear(text_dim, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, hidden_states, history, encoder_hidden_states):
        x = torch.cat([self.text(encoder_hidden_states), self.patches(hidden_states),
                       self.history(history).flatten(2).transpose(1, 2)], dim=1)
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return (out.transpose(1, 2).reshape(b, s, d),)


def two_grids(frames=2, height=6, width=10, history_frames=4, text=3, seed=0):
    torch.manual_seed(seed)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width),
                  history=torch.randn(1, 4, history_frames, 2 * height, 2 * width),
                  encoder_hidden_states=torch.randn(1, text, 16))
    return TwoGridAttention().eval(), inputs


class _JointBlock(torch.nn.Module):
    """Joint self-attention over the video and prompt streams, each carried on its own residual stream; `vmap` maps
    the modulation over the batch with torch.vmap."""

    def __init__(self, dim, heads, vmap=False):
        super().__init__()
        self.heads, self.vmap = heads, vmap
        self.norm, self.modulation = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim)
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x, text, temb):
        joint = torch.cat([x, text], dim=1)
        b, s, d = joint.shape
        modulation = torch.vmap(self.modulation)(temb) if self.vmap else self.modulation(temb)
        y = self.norm(joint) * (1 + modulation[:, None])
        q, k, v = self.qkv(y).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        joint = joint + self.out(attended)
        return joint[:, :x.shape[1]], joint[:, x.shape[1]:]


class StatefulDiT(torch.nn.Module):
    """A two-stream video DiT whose output modulation is computed from the timestep embedding after the blocks
    (Mochi, Helios): head nodes after stack nodes in graph order. `region` puts part of it under other global state:
    "embedding" (the timestep embedding under bf16 autocast, as Mochi's RoPE runs under fp32 autocast),
    "everything" (bf16 autocast from the patch embedding through the blocks to the output projection), "no_grad"
    (the timestep embedding under torch.no_grad). `cut_prompt` cuts the prompt to the length its mask says, a size
    read from a tensor, so the prompt stream enters the blocks with a data-dependent length (FramePack). `vmap` runs
    each block's modulation under torch.vmap (flex attention's block-mask helpers run under vmap)."""

    def __init__(self, region=None, cut_prompt=False, vmap=False, channels=4, dim=32, heads=2, layers=2,
                 text_dim=16, freq_dim=16):
        super().__init__()
        self.region, self.cut_prompt, self.freq_dim = region, cut_prompt, freq_dim
        self.patches = _Patches(channels, dim)
        self.time = torch.nn.Sequential(torch.nn.Linear(freq_dim, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))
        self.text = torch.nn.Linear(text_dim, dim)
        self.blocks = torch.nn.ModuleList(_JointBlock(dim, heads, vmap) for _ in range(layers))
        self.norm_out, self.modulation_out = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim)
        self.proj_out = torch.nn.Linear(dim, channels * 4)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask):
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
        with bf16 if self.region == "everything" else contextlib.nullcontext():
            b, c, f, h, w = hidden_states.shape
            half = self.freq_dim // 2
            angles = timestep.float()[:, None] * torch.exp(-9.21 * torch.arange(half, dtype=torch.float32) / half)
            embedding = {"embedding": bf16, "no_grad": torch.no_grad()}.get(self.region, contextlib.nullcontext())
            with embedding:
                temb = self.time(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)).float()
            text = self.text(encoder_hidden_states)
            if self.cut_prompt:
                text = text[:, :encoder_attention_mask.sum(1).int()[0]]
            x = self.patches(hidden_states)
            for block in self.blocks:
                x, text = block(x, text, temb)
            x = self.norm_out(x) * (1 + self.modulation_out(temb)[:, None])
            x = self.proj_out(x).reshape(b, f, h // 2, w // 2, c, 2, 2)
            return (x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w).float(),)


def stateful(region=None, cut_prompt=False, vmap=False, frames=2, height=4, width=6, text=5, valid_text=3, seed=0):
    torch.manual_seed(seed)
    mask = torch.zeros(1, text, dtype=torch.long)
    mask[:, :valid_text] = 1
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, text, 16), encoder_attention_mask=mask)
    return StatefulDiT(region, cut_prompt, vmap).eval().requires_grad_(False), inputs
