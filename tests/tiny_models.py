"""Small random-weight diffusers video DiTs and inputs for them, shared by the tests.

Each builder takes the latent grid (frames, height, width in latent pixels) so tests can draw odd sizes; token
grids are frames x height/2 x width/2 for all three (spatial patch 2, temporal patch 1).
"""
from __future__ import annotations

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
    mask[:, :valid_text] = 1
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
