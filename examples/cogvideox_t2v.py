"""Text to video with diffusers' CogVideoXPipeline, its transformer compiled with backend="vsparse".

    python examples/cogvideox_t2v.py --model-dir DIR --compare  # real weights (CogVideoX-2b/5b Diffusers folder), GPU
    python examples/cogvideox_t2v.py                            # tiny random-weight pipeline, runs on a CPU

Without --model-dir the script builds the same pipeline from tiny random components, as diffusers' own tests do but
offline: a 1-layer T5 encoder with a T5-style tokenizer built from a small word list, a tiny AutoencoderKLCogVideoX,
a 2-block CogVideoXTransformer3DModel with head dim 64 (the sparse kernel's) and CogVideoXDDIMScheduler. CogVideoX
runs classifier-free guidance (against the empty prompt) as one call per step on a batch of two. Its video is
noise: it shows the compiler inside a real pipeline, not a model.

A short warm-up generation (--warmup-steps, latents only) compiles the transformer first, so the timed generation
measures the generation; `--compare` runs the same pipeline with a plain `torch.compile` (Inductor) transformer and
the same seed. Writes the frames as an animated GIF (--out), the vsparse dump (--dump-dir) and one summary line.
"""
from __future__ import annotations

import torch
from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel)

import t2v_common

PROMPT = "a cat walks on the grass, realistic"
TINY_TEXT = 16  # prompt tokens of the tiny pipeline: its transformer's max_text_seq_length


def tiny_pipeline(prompt: str, seed: int = 0) -> CogVideoXPipeline:
    """CogVideoXPipeline from tiny random components (4 latent channels, text width 32)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t2v_common.tiny_tokenizer(t2v_common.prompt_words(prompt))
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64,
                                           num_layers=1, num_heads=4, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4).eval()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TINY_TEXT).eval()
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


def load_pipeline(model_dir: str, dtype: torch.dtype) -> CogVideoXPipeline:
    pipe = CogVideoXPipeline.from_pretrained(model_dir, torch_dtype=dtype, local_files_only=True)
    pipe.vae.enable_tiling()  # diffusers' CogVideoX examples decode in tiles to fit the VAE in memory
    return pipe


EXAMPLE = t2v_common.Example(
    name="cogvideox_t2v", pipeline="CogVideoXPipeline", doc=__doc__,
    # CogVideoX-2b/5b: 480x720, 49 frames, 50 steps, 8 fps
    real=dict(steps=50, frames=49, height=480, width=720, fps=8),
    tiny=dict(steps=6, frames=9, height=128, width=128, fps=8),
    prompt=PROMPT, negative_prompt=None, guidance=6.0,
    tiny_pipeline=tiny_pipeline, load_pipeline=load_pipeline,
    tiny_description="T5 text encoder and a tokenizer built offline, tiny VAE, 2-block transformer with head dim 64",
    call_options=lambda tiny: dict(max_sequence_length=TINY_TEXT if tiny else 226))


def main(argv=None) -> str:
    return t2v_common.main(EXAMPLE, argv)


if __name__ == "__main__":
    main()
