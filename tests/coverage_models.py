"""Tiny random-weight builders for every video (and a few image) transformer class of diffusers, for the coverage
test. Each builder takes `head_dim` and returns (model, inputs, truth): `truth` is what the recognizers should
find, written from the config (never read from the graph): the token grid (frames, height, width) of its video
self-attention, and its attention kind:
  "full3d"      one self-attention over text + the whole F x H x W grid (may go sparse)
  "factorized"  spatial attention per frame (frames folded into the batch) and temporal attention per position
  "image"       a frames = 1 grid (image DiTs)
  "segments"    tokens that are not one text + grid + text sequence (several grids, audio, reference frames)
  "cached"      video tokens attending to their own keys and to cached keys of earlier chunks or a reference pass
Sizes are odd on purpose: token counts not divisible by the 64-token block, frames = 1 where a model allows it.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch

TEXT = 5  # prompt tokens


@dataclass
class Truth:
    kind: str
    grid: Optional[tuple[int, int, int]]  # frames, height, width in tokens


def _d(head_dim):
    return 2 * head_dim  # two heads


def wan(head_dim=64, frames=2, height=10, width=14):
    from diffusers import WanTransformer3DModel
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def wan_vace(head_dim=64, frames=2, height=10, width=14):
    from diffusers import WanVACETransformer3DModel
    model = WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                      in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                      num_layers=2, rope_max_seq_len=32, vace_layers=[0], vace_in_channels=8)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32),
                  control_hidden_states=torch.randn(1, 8, frames, height, width),
                  control_hidden_states_scale=torch.ones(1))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def _wan_family(model_class, head_dim, frames, height, width):
    """Wan's constructor and inputs, shared by the classes built on it (SkyReels-V2, ChronoEdit)."""
    model = model_class(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
                        out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def skyreels_v2(head_dim=64, frames=2, height=10, width=14):
    from diffusers import SkyReelsV2Transformer3DModel
    return _wan_family(SkyReelsV2Transformer3DModel, head_dim, frames, height, width)


def hunyuan_video(head_dim=64, frames=1, height=10, width=14):
    from diffusers import HunyuanVideoTransformer3DModel
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=head_dim, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=1.0, patch_size=2, patch_size_t=1,
        text_embed_dim=32, pooled_projection_dim=16,
        rope_axes_dim=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    mask = torch.ones(1, TEXT, dtype=torch.long)
    mask[:, 3:] = 0
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), encoder_attention_mask=mask,
                  pooled_projections=torch.randn(1, 16), guidance=torch.tensor([3500.0]))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def _cogvideox_family(model_class, head_dim, frames, height, width):
    """CogVideoX's constructor and inputs, shared by the classes built on it (ConsisID)."""
    model = model_class(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=2, sample_width=width, sample_height=height, sample_frames=4 * (frames - 1) + 1,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT)
    inputs = dict(hidden_states=torch.randn(1, frames, 4, height, width), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def cogvideox(head_dim=64, frames=2, height=10, width=14):
    from diffusers import CogVideoXTransformer3DModel
    return _cogvideox_family(CogVideoXTransformer3DModel, head_dim, frames, height, width)


def cogvideox15(head_dim=64, frames=4, height=10, width=14):
    """CogVideoX 1.5: temporal patching (patch_size_t=2) through a linear patch embedding, rotary embeddings."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=2, sample_width=width, sample_height=height, sample_frames=4 * (frames - 1) + 1,
        patch_size=2, patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=TEXT,
        use_rotary_positional_embeddings=True)
    grid = (frames // 2, height // 2, width // 2)
    rope = get_3d_rotary_pos_embed(head_dim, (0, 0), (grid[1], grid[2]), grid[0], grid_type="slice",
                                   max_size=(grid[1], grid[2]))
    inputs = dict(hidden_states=torch.randn(1, frames, 4, height, width), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), image_rotary_emb=rope)
    return model, inputs, Truth("full3d", grid)


def ltx_video(head_dim=64, frames=2, height=5, width=7):
    """Tokens arrive packed, [B, F*H*W, C], with the grid as integer arguments."""
    from diffusers import LTXVideoTransformer3DModel
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                       attention_head_dim=head_dim, cross_attention_dim=_d(head_dim), num_layers=2,
                                       caption_channels=32)
    inputs = dict(hidden_states=torch.randn(1, frames * height * width, 8), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), encoder_attention_mask=torch.ones(1, TEXT),
                  num_frames=frames, height=height, width=width,
                  rope_interpolation_scale=(8 / 25, 32.0, 32.0))  # as LTXPipeline passes it: scales the coordinates
    return model, inputs, Truth("full3d", (frames, height, width))


def ltx2_video(head_dim=64, frames=2, height=5, width=7):
    from diffusers import LTX2VideoTransformer3DModel
    model = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=head_dim,
        cross_attention_dim=_d(head_dim), audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=head_dim, audio_cross_attention_dim=_d(head_dim), num_layers=1,
        caption_channels=32)
    audio_frames = 3
    inputs = dict(hidden_states=torch.randn(1, frames * height * width, 8),
                  audio_hidden_states=torch.randn(1, audio_frames, 8),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), audio_encoder_hidden_states=torch.randn(1, TEXT, 32),
                  timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, TEXT),
                  audio_encoder_attention_mask=torch.ones(1, TEXT), num_frames=frames, height=height, width=width,
                  audio_num_frames=audio_frames)
    # Audio tokens attend in their own sites; the video self-attention is over the video grid alone.
    return model, inputs, Truth("full3d", (frames, height, width))


def latte(head_dim=64, frames=2, height=10, width=14):
    from diffusers import LatteTransformer3DModel
    model = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
                                    out_channels=8, num_layers=2, cross_attention_dim=_d(head_dim),
                                    sample_size=height, patch_size=2, num_embeds_ada_norm=1000,
                                    norm_type="ada_norm_single", caption_channels=32, video_length=frames)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("factorized", (frames, height // 2, width // 2))


def mochi(head_dim=64, frames=2, height=10, width=14):
    from diffusers import MochiTransformer3DModel
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=head_dim, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=4,
                                    max_sequence_length=TEXT)
    mask = torch.ones(1, TEXT, dtype=torch.bool)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), encoder_attention_mask=mask)
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def allegro(head_dim=64, frames=2, height=10, width=14):
    from diffusers import AllegroTransformer3DModel
    model = AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=head_dim,
                                      in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=_d(head_dim),
                                      sample_height=height, sample_width=width, sample_frames=frames,
                                      caption_channels=32)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def cosmos(head_dim=64, frames=2, height=10, width=14):
    from diffusers import CosmosTransformer3DModel
    model = CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=head_dim,
                                     num_layers=2, mlp_ratio=1.0, text_embed_dim=32, adaln_lora_dim=4,
                                     max_size=(8, 16, 16), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                                     concat_padding_mask=False, extra_pos_embed_type="learnable")
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def easyanimate(head_dim=64, frames=2, height=10, width=14):
    from diffusers import EasyAnimateTransformer3DModel
    model = EasyAnimateTransformer3DModel(num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
                                          out_channels=4, patch_size=2, sample_width=width, sample_height=height,
                                          num_layers=2, mmdit_layers=2, time_embed_dim=8, text_embed_dim=32)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def sana_video(head_dim=64, frames=2, height=10, width=14):
    from diffusers import SanaVideoTransformer3DModel
    model = SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                        attention_head_dim=head_dim, num_layers=2, num_cross_attention_heads=2,
                                        cross_attention_head_dim=head_dim, cross_attention_dim=_d(head_dim),
                                        caption_channels=32, sample_size=height, rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def kandinsky5(head_dim=64, frames=2, height=10, width=14):
    from diffusers import Kandinsky5Transformer3DModel
    model = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=16,
                                         out_visual_dim=4, patch_size=(1, 2, 2), model_dim=_d(head_dim),
                                         ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
                                         axes_dims=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    grid = (frames, height // 2, width // 2)
    inputs = dict(hidden_states=torch.randn(1, frames, height, width, 4),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), timestep=torch.tensor([500.0]),
                  pooled_projections=torch.randn(1, 16), visual_rope_pos=[torch.arange(n) for n in grid],
                  text_rope_pos=torch.arange(TEXT))
    return model, inputs, Truth("full3d", grid)


def hunyuan_video15(head_dim=64, frames=2, height=5, width=7):
    from diffusers import HunyuanVideo15Transformer3DModel
    model = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=head_dim, num_layers=2,
        num_refiner_layers=1, mlp_ratio=1.0, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=16,
        image_embed_dim=16, rope_axes_dim=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8), target_size=64,
        task_type="t2v")
    inputs = dict(hidden_states=torch.randn(1, 9, frames, height, width), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), encoder_attention_mask=torch.ones(1, TEXT),
                  encoder_hidden_states_2=torch.randn(1, 3, 16), encoder_attention_mask_2=torch.ones(1, 3),
                  image_embeds=torch.zeros(1, 4, 16))
    return model, inputs, Truth("full3d", (frames, height, width))


def hunyuan_framepack(head_dim=64, frames=2, height=10, width=14):
    """FramePack: the current latents plus clean history latents at 1x / 2x / 4x compression in one sequence."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=head_dim, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=1.0, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
        image_condition_type=None, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), encoder_attention_mask=torch.ones(1, TEXT),
                  pooled_projections=torch.randn(1, 16), image_embeds=torch.randn(1, 3, 16),
                  indices_latents=torch.arange(frames), guidance=torch.tensor([3500.0]),
                  latents_clean=torch.randn(1, 4, 1, height, width), indices_latents_clean=torch.tensor([0]),
                  latents_history_2x=torch.randn(1, 4, 2, height, width),
                  indices_latents_history_2x=torch.tensor([1, 2]),
                  latents_history_4x=torch.randn(1, 4, 4, height, width),
                  indices_latents_history_4x=torch.tensor([3, 4, 5, 6]))
    return model, inputs, Truth("segments", (frames, height // 2, width // 2))


def wan_animate(head_dim=64, frames=2, height=10, width=14):
    from diffusers import WanAnimateTransformer3DModel
    model = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=16, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16, "32": 16, "64": 16, "128": 16, "256": 16,
                                      "512": 16, "1024": 16},
        motion_encoder_size=16, motion_style_dim=16, motion_dim=4, motion_encoder_dim=16,
        face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=2,
        motion_encoder_batch_size=2)
    inputs = dict(hidden_states=torch.randn(1, 12, frames + 1, height, width), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), encoder_hidden_states_image=torch.randn(1, 3, 16),
                  pose_hidden_states=torch.randn(1, 4, frames, height, width),
                  face_pixel_values=torch.randn(1, 3, 4 * (frames - 1) + 1, 16, 16))
    # The reference frame is concatenated to the latent before the patch embedding: one grid of frames + 1.
    return model, inputs, Truth("full3d", (frames + 1, height // 2, width // 2))


def wan_animate2(head_dim=64, frames=2, height=10, width=14):
    """Wan-Animate-2's generation pass as its modular pipeline runs it: lists of per-sample latents (the noise
    carries the reference image's frame first), self-attention over the generation tokens and the reference tokens
    cached by the extraction pass (run first), through flex attention with a block mask. No CLIP image embedding."""
    from diffusers import WanAnimate2Transformer3DModel
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
    model = WanAnimate2Transformer3DModel(patch_size=(1, 2, 2), text_len=TEXT, in_dim=12, dim=_d(head_dim), ffn_dim=32,
                                          freq_dim=16, text_dim=32, out_dim=4, num_heads=2, num_layers=2,
                                          use_img_emb=False).eval()
    grid = (frames, height // 2, width // 2)
    tokens = grid[1] * grid[2]
    reference_grid = torch.tensor([grid])
    prompt = [torch.randn(TEXT, 32)]
    cache = WanAnimate2KVCache(2)
    with torch.no_grad():  # the reference pass fills the cache
        model([torch.randn(4, frames, height, width)], timestep=torch.tensor([1000.0]), encoder_hidden_states=prompt,
              condition_latents=[torch.randn(8, frames, height, width)], kv_cache=cache, kv_cache_mode="extract",
              seq_len=frames * tokens, offset_grid_sizes=reference_grid)
    inputs = dict(hidden_states=[torch.randn(4, frames + 1, height, width)], timestep=torch.tensor([500.0]),
                  encoder_hidden_states=prompt, condition_latents=[torch.randn(8, frames + 1, height, width)],
                  kv_cache=cache, kv_cache_mode="cached", seq_len=(frames + 1) * tokens,
                  reference_grid_sizes=reference_grid, origin_len=4 * (frames - 1) + 1,
                  origin_area=[8 * height, 8 * width])
    return model, inputs, Truth("cached", (frames + 1, height // 2, width // 2))


def chronoedit(head_dim=64, frames=2, height=10, width=14):
    from diffusers import ChronoEditTransformer3DModel
    return _wan_family(ChronoEditTransformer3DModel, head_dim, frames, height, width)


def consisid(head_dim=64, frames=2, height=10, width=14):
    from diffusers import ConsisIDTransformer3DModel
    return _cogvideox_family(ConsisIDTransformer3DModel, head_dim, frames, height, width)


def motif_video(head_dim=64, frames=2, height=10, width=14, prompt_mask=True):
    from diffusers import MotifVideoTransformer3DModel
    model = MotifVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=head_dim, num_layers=1,
        num_single_layers=1, mlp_ratio=1.0, patch_size=2, patch_size_t=1, text_embed_dim=32,
        rope_axes_dim=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32),
                  encoder_attention_mask=torch.ones(1, TEXT) if prompt_mask else None)
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def helios(head_dim=64, frames=2, height=10, width=14):
    from diffusers import HeliosTransformer3DModel
    model = HeliosTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                     in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
                                     rope_dim=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def joyimage_edit(head_dim=64, frames=2, height=10, width=14):
    from diffusers import JoyImageEditTransformer3DModel
    model = JoyImageEditTransformer3DModel(patch_size=[1, 2, 2], in_channels=4, out_channels=4,
                                           hidden_size=_d(head_dim), num_attention_heads=2, text_dim=32,
                                           mlp_width_ratio=1.0, num_layers=2,
                                           rope_dim_list=[head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8])
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def kandinsky6(head_dim=64, frames=2, height=10, width=14):
    from diffusers import Kandinsky6Transformer3DModel
    model = Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=16,
                                         time_dim=16, patch_size=(1, 2, 2), model_dim=_d(head_dim), ff_dim=64,
                                         num_text_blocks=1, num_visual_blocks=2, visual_cond=False,
                                         axes_dims=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    grid = (frames, height // 2, width // 2)
    inputs = dict(hidden_states=torch.randn(1, frames, height, width, 4),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), pooled_projections=torch.randn(1, 16),
                  timestep=torch.tensor([500.0]), visual_rope_pos=tuple(torch.arange(n) for n in grid))
    return model, inputs, Truth("full3d", grid)


def anyflow(head_dim=64, frames=2, height=10, width=14):
    """Wan's backbone with a dual (source t, target r) timestep embedding; latents (B, F, C, H, W), per-frame
    timesteps."""
    from diffusers import AnyFlowTransformer3DModel
    model = AnyFlowTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                      in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                      num_layers=2, rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(1, frames, 4, height, width), timestep=torch.full((1, frames), 500.0),
                  r_timestep=torch.full((1, frames), 250.0), encoder_hidden_states=torch.randn(1, TEXT, 32))
    return model, inputs, Truth("full3d", (frames, height // 2, width // 2))


def anyflow_far(head_dim=64, frames=2, height=10, width=14):
    """AnyFlow's chunk-wise autoregressive variant at a denoising step of its second chunk, as AnyFlowFARPipeline
    calls it: the chunk's queries attend to the keys and values of the first chunk (the KV cache) and its own."""
    from diffusers import AnyFlowFARTransformer3DModel
    model = AnyFlowFARTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                         in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                         num_layers=2, rope_max_seq_len=32, chunk_partition=(1, frames))
    tokens = (height // 2) * (width // 2)
    cache = {layer: {"full_cache": torch.randn(2, 1, 2, 3 * frames * tokens, head_dim),
                     "compressed_cache": torch.zeros(2, 1, 2, 0, head_dim)} for layer in range(2)}
    inputs = dict(hidden_states=torch.randn(1, frames, 4, height, width), timestep=torch.full((1, frames), 500.0),
                  r_timestep=torch.full((1, frames), 250.0), encoder_hidden_states=torch.randn(1, TEXT, 32),
                  chunk_partition=[1, frames], kv_cache=cache,
                  kv_cache_flag={"num_cached_chunks": 1, "is_cache_step": False})
    return model, inputs, Truth("cached", (frames, height // 2, width // 2))


def kandinsky6_sr(head_dim=64, frames=2, height=8, width=8):
    """Video super-resolution: the noisy latent, the anchor latent and its mask concatenated on channels. NABLA
    attention needs a token grid divisible by 8 in height and width (8 x 8 here, patch 1)."""
    from diffusers import Kandinsky6SRTransformer3DModel
    model = Kandinsky6SRTransformer3DModel(in_visual_dim=4, out_visual_dim=4, time_dim=16, model_dim=_d(head_dim),
                                           ff_dim=64, num_visual_blocks=2,
                                           axes_dims=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    inputs = dict(hidden_states=torch.randn(1, frames, height, width, 9), timestep=torch.tensor([500.0]))
    return model, inputs, Truth("full3d", (frames, height, width))


def joyimage_edit_plus(head_dim=64, frames=1, height=10, width=14):
    """Image editing: the target and a reference image patchified by the caller into one padded patch list
    [B, N, C, 1, 2, 2], each component with its own RoPE grid (shape_list), a temporal offset apart."""
    from diffusers import JoyImageEditPlusTransformer3DModel
    model = JoyImageEditPlusTransformer3DModel(patch_size=[1, 2, 2], in_channels=4, out_channels=4,
                                               hidden_size=_d(head_dim), num_attention_heads=2, text_dim=32,
                                               mlp_width_ratio=1.0, num_layers=2,
                                               rope_dim_list=[head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8])
    target, reference = (frames, height // 2, width // 2), (1, 3, 4)
    patches = sum(t * h * w for t, h, w in (target, reference))
    inputs = dict(hidden_states=torch.randn(1, patches, 4, 1, 2, 2), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), encoder_hidden_states_mask=torch.ones(1, TEXT),
                  shape_list=[[target, reference]])
    return model, inputs, Truth("segments", target)


def minimax_h3(head_dim=64, frames=2, height=5, width=7):
    """One packed sequence the caller lays out: text, video and audio rows scattered to index inputs, RoPE
    coordinates from a position-id input (text and audio rows on the frame axis before and after the video)."""
    from diffusers import MiniMaxH3Transformer3DModel
    model = MiniMaxH3Transformer3DModel(num_attention_heads=2, attention_head_dim=head_dim, hidden_size=32,
                                        num_layers=2, num_refiner_layers=1, ffn_dim=32, in_channels=4,
                                        audio_in_channels=8, patch_size=(1, 2, 2), text_dim=32, freq_dim=16,
                                        time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=head_dim // 8)
    audio = 3
    video = frames * height * width
    grid = torch.stack(torch.meshgrid(torch.arange(frames) + 1, torch.arange(height), torch.arange(width),
                                      indexing="ij"), -1).reshape(-1, 3)
    line = lambda n, start: torch.stack([torch.arange(n) + start, torch.zeros(n, dtype=torch.long),  # noqa: E731
                                         torch.zeros(n, dtype=torch.long)], -1)
    position_ids = torch.cat([line(TEXT, -TEXT), grid, line(audio, frames + 1)])
    tags = torch.cat([torch.full((TEXT,), 1), torch.zeros(video, dtype=torch.long), torch.full((audio,), 2)])
    inputs = dict(hidden_states=torch.randn(1, video, 16), audio_hidden_states=torch.randn(1, audio, 8),
                  encoder_hidden_states=torch.randn(1, TEXT, 32), timestep=torch.tensor([0.5]),
                  timestep_indices=torch.zeros(TEXT + video + audio, dtype=torch.long), token_tags=tags,
                  position_ids=position_ids, video_indices=torch.arange(TEXT, TEXT + video),
                  audio_indices=torch.arange(TEXT + video, TEXT + video + audio), text_indices=torch.arange(TEXT))
    return model, inputs, Truth("segments", (frames, height, width))


def sana_wm(head_dim=64, frames=2, height=5, width=7):
    """SANA-WM's camera-controlled world model as SanaWMPipeline calls it: per-frame timesteps, camera conditions and
    Plucker rays from diffusers' own prepare_camera (a camera moving sideways), gated-delta-net linear attention in
    every block but every second one, which runs softmax attention (softmax_every_n=2)."""
    import numpy as np
    from diffusers import SanaWMTransformer3DModel
    from diffusers.pipelines.sana_wm.cam_utils import prepare_camera
    model = SanaWMTransformer3DModel(in_channels=4, num_layers=2, hidden_size=_d(head_dim), num_attention_heads=2,
                                     softmax_every_n=2, linear_head_dim=head_dim, caption_channels=32,
                                     chunk_plucker_post_attn_blocks=2, mlp_ratio=1.0)
    poses = np.tile(np.eye(4, dtype=np.float32), (8 * (frames - 1) + 1, 1, 1))  # LTX-2 VAE: 8x in time
    poses[:, 0, 3] = np.linspace(0, 1, len(poses))
    intrinsics = np.tile(np.array([[16 * width, 16 * height, 16 * width, 16 * height]], np.float32), (len(poses), 1))
    camera = prepare_camera(poses, intrinsics, target_size=(32 * height, 32 * width), vae_stride=(8, 32, 32))
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.full((1, 1, frames), 500.0),
                  encoder_hidden_states=torch.randn(1, 1, TEXT, 32), mask=torch.ones(1, TEXT, dtype=torch.long),
                  camera_conditions=camera["raymap"][None], chunk_plucker=camera["chunk_plucker"][None],
                  data_info={"img_hw": torch.tensor([[32.0 * height, 32.0 * width]])})
    return model, inputs, Truth("full3d", (frames, height, width))


def sana_wm_refiner(head_dim=64, frames=2, height=5, width=7):
    """SANA-WM's stage-2 refiner (LTX-2 weights) at a denoising step as its pipeline runs it: packed tokens of the
    active frames, their RoPE passed in (absolute frame positions), and self-attention over the attention sink (one
    clean frame captured first) plus the active frames (kv_cache_mode="inject")."""
    from diffusers import SanaWMLTX2RefinerTransformer3DModel
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache
    model = SanaWMLTX2RefinerTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=head_dim,
        cross_attention_dim=_d(head_dim), audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=head_dim, audio_cross_attention_dim=_d(head_dim), num_layers=2,
        caption_channels=32).eval()
    tokens = height * width
    rope = lambda positions: model.build_rotary_emb_for_absolute_positions(  # noqa: E731
        batch_size=1, frame_positions=positions, height=height, width=width, device=torch.device("cpu"), fps=24.0)
    prompt, prompt_mask = torch.randn(1, TEXT, 32), torch.ones(1, TEXT)
    cache = SanaWMRefinerKVCache(2)
    with torch.no_grad():  # the attention sink: one clean frame, captured as the refiner pipeline does
        model(hidden_states=torch.randn(1, tokens, 8), encoder_hidden_states=prompt, timestep=torch.zeros(1, tokens),
              video_rotary_emb=rope([0]), encoder_attention_mask=prompt_mask, kv_cache=cache,
              kv_cache_mode="capture_pre_rope")
    for layer in cache.layer_caches:
        layer.store_sink(*layer.get_captured_pre_rope())
    cache.sink_pe = rope([0])
    inputs = dict(hidden_states=torch.randn(1, frames * tokens, 8), encoder_hidden_states=prompt,
                  timestep=torch.full((1, frames * tokens), 500.0), video_rotary_emb=rope(list(range(1, frames + 1))),
                  encoder_attention_mask=prompt_mask, kv_cache=cache, kv_cache_mode="inject")
    return model, inputs, Truth("cached", (frames, height, width))


def flux(head_dim=64, frames=1, height=5, width=7):
    from diffusers import FluxTransformer2DModel
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16,
                                   axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    axes = (torch.zeros(1), torch.arange(height).float(), torch.arange(width).float())
    ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inputs = dict(hidden_states=torch.randn(1, height * width, 8), encoder_hidden_states=torch.randn(1, TEXT, 32),
                  pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]), img_ids=ids,
                  txt_ids=torch.zeros(TEXT, 3))
    return model, inputs, Truth("image", (1, height, width))


def sd3(head_dim=64, frames=1, height=10, width=14):
    from diffusers import SD3Transformer2DModel
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                  attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=32,
                                  caption_projection_dim=_d(head_dim), pooled_projection_dim=16, out_channels=4,
                                  pos_embed_max_size=16)
    inputs = dict(hidden_states=torch.randn(1, 4, height, width), encoder_hidden_states=torch.randn(1, TEXT, 32),
                  pooled_projections=torch.randn(1, 16), timestep=torch.tensor([500]))
    return model, inputs, Truth("image", (1, height // 2, width // 2))


def qwen_image(head_dim=64, frames=1, height=5, width=7, prompt_mask=True):
    from diffusers import QwenImageTransformer2DModel
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=32,
                                        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    inputs = dict(hidden_states=torch.randn(1, height * width, 16), encoder_hidden_states=torch.randn(1, TEXT, 32),
                  encoder_hidden_states_mask=torch.ones(1, TEXT) if prompt_mask else None, timestep=torch.tensor([0.5]),
                  img_shapes=[(1, height, width)])
    return model, inputs, Truth("image", (1, height, width))


BUILDERS: dict[str, Callable] = {f.__name__: f for f in (
    wan, wan_vace, wan_animate, wan_animate2, skyreels_v2, hunyuan_video, hunyuan_video15, hunyuan_framepack,
    cogvideox, cogvideox15, ltx_video, ltx2_video, mochi, allegro, cosmos, easyanimate, sana_video, kandinsky5,
    kandinsky6, kandinsky6_sr, latte, chronoedit, consisid, motif_video, helios, joyimage_edit, joyimage_edit_plus,
    anyflow, anyflow_far, minimax_h3, sana_wm, sana_wm_refiner, flux, sd3, qwen_image)}


# --- measuring a model ------------------------------------------------------------------------------------------
@dataclass
class Measured:
    name: str
    model: str  # class name
    truth: Truth
    errors: dict  # run ("sparse", "cache", "dense") -> why its fullgraph compile or call failed
    dense_error: Optional[float] = None  # max |vsparse(sparsity="none") - eager| (first call of the cache run)
    sparse_error: Optional[float] = None  # max |vsparse(draft, density=1) - eager|
    sites: Optional[list] = None  # analysis.json sites of the sparse run
    stacks: Optional[list] = None
    cache_notes: Optional[list] = None  # cache notes of the cache="easycache" run (empty: the stack is cached)
    flex_attention: int = 0  # flex_attention calls in the captured graph: attention no recognizer models

    @property
    def compiled(self) -> bool:
        return "sparse" not in self.errors and self.dense_error is not None


def _aot_eager(gm, example_inputs, config):
    """Stands in for Inductor in dit_compiler.backend.compile_piece: AOTAutograd traces the pieces (our rewrites must
    survive it), then they run eagerly. Cheap enough to cover every model in CI."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch._inductor.compile_fx import graph_returns_tuple, make_graph_return_tuple
    if not graph_returns_tuple(gm):  # a split piece with one output: Inductor's own wrapping, as compile_fx does
        return make_graph_return_tuple(gm, list(example_inputs), aot_eager)
    return aot_eager(gm, list(example_inputs))


def _eager(gm, example_inputs, config):
    """Stands in for Inductor where only the split matters (the dense and cache runs): the pieces run as captured."""
    return gm.forward


# Per run, what compiles the pieces on the cheap path: the rewrite must survive AOTAutograd's tracing.
CHEAP_COMPILERS = {"sparse": _aot_eager, "cache": _eager, "dense": _eager}


def _run(compiled, inputs):
    """The first output; of a list of samples (Wan-Animate-2 returns one per input latent), the first sample."""
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        out = compiled(**inputs, return_dict=False)[0]
    return out[0] if isinstance(out, list) else out


def _analysis(dump_dir):
    from pathlib import Path
    graphs = sorted(d for d in Path(dump_dir).iterdir() if d.is_dir())
    if len(graphs) != 1:
        raise AssertionError(f"expected one compiled graph in {dump_dir}, found {[g.name for g in graphs]}")
    return _analysis_of(graphs[0])


def _analysis_of(graph_dir):
    import json
    return json.loads((graph_dir / "analysis.json").read_text())


def _graph_text(dump_dir) -> str:
    """The captured graph's code (the dump's captured.py) of the one graph compiled into `dump_dir`."""
    from pathlib import Path
    (graph,) = [d for d in Path(dump_dir).iterdir() if d.is_dir()]
    return (graph / "captured.py").read_text()


def measure(name: str, workdir, head_dim: int = 64, cheap: bool = True, **build_args) -> Measured:
    """Build `name`, compile it with backend="vsparse" (fullgraph) sparse at density 1 and dense with the cache
    split; `cheap` hands the pieces to CHEAP_COMPILERS instead of Inductor (dit_compiler.backend.compile_piece)."""
    from pathlib import Path
    from unittest import mock

    from dit_compiler import backend
    torch.manual_seed(0)
    model, inputs, truth = BUILDERS[name](head_dim=head_dim, **build_args)
    model.eval()
    result = Measured(name, type(model).__name__, truth, errors={})
    expected = _run(model, inputs)
    # The cache run's first call computes the whole stack, so it also checks dense mode against eager; a plain dense
    # run is needed only where the cache split fails.
    # force_sparse: on a CPU the cost model keeps every site dense (scripts/coverage_table.py runs without the test
    # suite's VSPARSE_FORCE_SPARSE=1).
    runs = {"sparse": dict(sparsity="draft", density=1.0, block_size=64, dense_layers=0, dense_steps=0.0,
                           force_sparse=True),
            "cache": dict(sparsity="none", cache="easycache"), "dense": dict(sparsity="none")}
    for run, options in runs.items():
        if run == "dense" and "cache" not in result.errors:
            continue
        dump = Path(workdir) / name / run
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="vsparse", fullgraph=True, options=dict(options, dump_dir=str(dump)))
        pieces = mock.patch.object(backend, "compile_piece", CHEAP_COMPILERS[run]) if cheap else nullcontext()
        try:
            with pieces:
                out = _run(compiled, inputs)
        except Exception as failure:  # noqa: BLE001  (the row records why the compile did not go through)
            result.errors[run] = f"{type(failure).__name__}: {_first_line(failure)}"
            continue
        error = (out - expected).abs().max().item()
        analysis = _analysis(dump)
        if run == "sparse":
            result.sparse_error, result.sites, result.stacks = error, analysis["sites"], analysis["stacks"]
            result.flex_attention = _graph_text(dump).count("torch.ops.higher_order.flex_attention(")
        else:
            result.dense_error = error
            if run == "cache":
                result.cache_notes = [n for n in analysis["notes"] if n.startswith("cache")]
    return result


def _first_line(failure: Exception) -> str:
    """The message that says what failed (Dynamo wraps backend errors: the cause is the line after 'raised:')."""
    lines = [line for line in str(failure).splitlines() if line.strip()]
    if lines and lines[0].rstrip().endswith("raised:") and len(lines) > 1:
        return lines[1][:300]
    return lines[0][:300] if lines else ""


def grid_of(site: dict) -> Optional[tuple]:
    """The site's single grid (planners' form), None without one."""
    layout = site.get("layout")
    if layout is None or layout["frames"] is None:
        return None
    return tuple(layout[k] for k in ("frames", "height", "width"))


def segment_grids(site: dict) -> list[tuple]:
    """Every grid segment of the site's layout, in sequence order."""
    layout = site.get("layout") or {"segments": []}
    return [(s["frames"], s["height"], s["width"]) for s in layout["segments"] if s["kind"] == "grid"]


def table(rows: list[Measured]) -> str:
    """The README's coverage table: one row per measured model (sites and decisions of the sparse run)."""
    lines = ["| model | sites | grid | stacks | sparse | cache |", "|---|---|---|---|---|---|"]
    for m in rows:
        if not m.compiled:
            why = next(iter(m.errors.values()))
            lines.append(f"| {m.model} ({m.name}) | — | — | — | no graph: {_cell(why)} | — |")
            continue
        self_sites = sum(s["self_attention"] for s in m.sites)
        grids = {}
        for s in m.sites:
            if grid_of(s):
                grids.setdefault("x".join(map(str, grid_of(s))), set()).add(s["layout"]["attention"])
            elif len(segment_grids(s)) > 1:
                grids.setdefault(" + ".join("x".join(map(str, g)) for g in segment_grids(s)), set()).add("segments")
        grid = ", ".join(f"{g}" + ("" if kinds == {"full"} else f" ({'/'.join(sorted(kinds))})")
                         for g, kinds in grids.items()) or "none"
        stacks = ", ".join(f"{s['name']} ({len(s['blocks'])})" for s in m.stacks) or "none"
        sparse = sum(s["rewritten"] for s in m.sites)
        main_dense = sorted({s["decision_reason"] for s in m.sites if s["layer"] is not None and not s["rewritten"]
                             and not s["decision_reason"].startswith("cross-attention")})
        why = f": {_cell(main_dense[0])}" if not sparse and main_dense else ""
        flex = f" + {m.flex_attention} flex_attention" if m.flex_attention else ""
        lines.append(f"| {m.model} ({m.name}) | {len(m.sites)} ({self_sites} self){flex} | {grid} | {stacks} | "
                     f"{sparse}/{len(m.sites)}{why} | {_cache_cell(m)} |")
    return "\n".join(lines) + "\n"


def _cache_cell(m: Measured) -> str:
    """Whether the split compiles, and the cache run's first note where it caches less than the whole stack."""
    if "cache" in m.errors:
        return f"no: {_cell(m.errors['cache'])}"
    if not m.cache_notes:
        return "yes"
    note = m.cache_notes[0]
    if note.startswith("cache disabled: "):
        return f"no: {_cell(note.removeprefix('cache disabled: '))}"
    return f"yes; {_cell(note.removeprefix('cache: '))}"


def _cell(text: str, limit: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 1] + "…"
