"""Text to video with diffusers' WanPipeline, its transformer compiled with backend="vsparse".

    python examples/wan_t2v.py --model-dir DIR --compare      # real weights (a Wan2.1 T2V Diffusers folder), GPU
    python examples/wan_t2v.py                                # tiny random-weight pipeline, runs on a CPU

Without --model-dir the script builds the same pipeline from tiny random components: a UMT5 text encoder with a
T5-style Unigram tokenizer built offline from a small word list (diffusers' own tests download a tiny tokenizer
from the Hugging Face hub, which this script never reaches), a tiny AutoencoderKLWan, a 2-block
WanTransformer3DModel with head dim 64 (the sparse kernel's) and FlowMatchEulerDiscreteScheduler. Its video is
noise: it shows the compiler inside a real pipeline, not a model.

A short warm-up generation (--warmup-steps, latents only) compiles the transformer first, so the timed generation
measures the generation; `--compare` runs the same pipeline with a plain `torch.compile` (Inductor) transformer and
the same seed. Writes the frames as an animated GIF (--out), the vsparse dump (--dump-dir) and one summary line.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

import t2v_common

PROMPT = "a cat walks on the grass, realistic"
NEGATIVE = "blurry, low quality, static"


def tiny_pipeline(prompt: str, seed: int = 0) -> WanPipeline:
    """WanPipeline from tiny random components (latent channels 16, as Wan's VAE statistics expect)."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t2v_common.tiny_tokenizer(t2v_common.prompt_words(prompt, NEGATIVE))
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32).eval()
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def load_pipeline(model_dir: str, dtype: torch.dtype) -> WanPipeline:
    # Wan's VAE is meant to run in float32 (diffusers' Wan examples load it so).
    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.float32,
                                           local_files_only=True)
    return WanPipeline.from_pretrained(model_dir, vae=vae, torch_dtype=dtype, local_files_only=True)


EXAMPLE = t2v_common.Example(
    name="wan_t2v", pipeline="WanPipeline", doc=__doc__,
    # Wan2.1 T2V's defaults: 480p, 81 frames, 50 steps, 16 fps.
    real=dict(steps=50, frames=81, height=480, width=832, fps=16),
    tiny=dict(steps=6, frames=9, height=128, width=128, fps=8),
    prompt=PROMPT, negative_prompt=NEGATIVE, guidance=5.0,
    tiny_pipeline=tiny_pipeline, load_pipeline=load_pipeline,
    tiny_description="UMT5 text encoder and a tokenizer built offline, tiny VAE, 2-block transformer with head dim 64",
    call_options=lambda tiny: dict(max_sequence_length=16 if tiny else 512))


def main(argv=None) -> str:
    return t2v_common.main(EXAMPLE, argv)


if __name__ == "__main__":
    main()
