"""Text to video with diffusers' HunyuanVideoPipeline, its transformer compiled with backend="vsparse".

    python examples/hunyuan_t2v.py --model-dir DIR --compare  # real weights (a HunyuanVideo Diffusers folder), GPU
    python examples/hunyuan_t2v.py                            # tiny random-weight pipeline, runs on a CPU

Without --model-dir the script builds the same pipeline from tiny random components, as diffusers' own tests do but
offline: a 2-layer Llama text encoder and a CLIP text encoder, both with a tokenizer built from a small word list, a
tiny AutoencoderKLHunyuanVideo, a HunyuanVideoTransformer3DModel with one dual-stream and one single-stream block of
head dim 64 (the sparse kernel's) and FlowMatchEulerDiscreteScheduler. The tiny pipeline embeds the bare prompt
(template "{}"); real weights use the pipeline's default Llama prompt template. HunyuanVideo is guidance-distilled:
--guidance is the guidance embedded in the transformer's input, one call per step, no negative prompt. Its video is
noise: it shows the compiler inside a real pipeline, not a model.

A short warm-up generation (--warmup-steps, latents only) compiles the transformer first, so the timed generation
measures the generation; `--compare` runs the same pipeline with a plain `torch.compile` (Inductor) transformer and
the same seed. Writes the frames as an animated GIF (--out), the vsparse dump (--dump-dir) and one summary line.
"""
from __future__ import annotations

import torch
from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                       HunyuanVideoTransformer3DModel)

import t2v_common

PROMPT = "a cat walks on the grass, realistic"


def tiny_pipeline(prompt: str, seed: int = 0) -> HunyuanVideoPipeline:
    """HunyuanVideoPipeline from tiny random components (4 latent channels; Llama width 16, CLIP width 8)."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer = t2v_common.tiny_tokenizer(t2v_common.prompt_words(prompt))
    both = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, intermediate_size=37,
                num_attention_heads=4, hidden_act="gelu")
    torch.manual_seed(seed)
    # the pipeline reads the Llama encoder's third hidden state from the end: at least 2 layers
    text_encoder = LlamaModel(LlamaConfig(hidden_size=16, num_hidden_layers=2, **both)).eval()
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(hidden_size=8, num_hidden_layers=1, **both)).eval()
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4).eval()
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(16, 24, 24)).eval()
    return HunyuanVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer,
                                text_encoder_2=text_encoder_2, vae=vae, transformer=transformer,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def load_pipeline(model_dir: str, dtype: torch.dtype) -> HunyuanVideoPipeline:
    pipe = HunyuanVideoPipeline.from_pretrained(model_dir, torch_dtype=dtype, local_files_only=True)
    pipe.vae.enable_tiling()  # diffusers' HunyuanVideo examples decode in tiles to fit the VAE in memory
    return pipe


EXAMPLE = t2v_common.Example(
    name="hunyuan_t2v", pipeline="HunyuanVideoPipeline", doc=__doc__,
    # diffusers' HunyuanVideo example: 320x512, 61 frames, 30 steps, 15 fps
    real=dict(steps=30, frames=61, height=320, width=512, fps=15),
    tiny=dict(steps=6, frames=9, height=128, width=128, fps=8),
    prompt=PROMPT, negative_prompt=None, guidance=6.0,
    tiny_pipeline=tiny_pipeline, load_pipeline=load_pipeline,
    tiny_description="Llama and CLIP text encoders with a tokenizer built offline, tiny VAE, one dual-stream and one "
                     "single-stream block with head dim 64",
    call_options=lambda tiny: dict(prompt_template={"template": "{}", "crop_start": 0}, max_sequence_length=16)
    if tiny else {})


def main(argv=None) -> str:
    return t2v_common.main(EXAMPLE, argv)


if __name__ == "__main__":
    main()
