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

import argparse
import logging
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

import dit_compiler

# Defaults of each mode: the real ones are Wan2.1 T2V's (480p, 81 frames, 50 steps, 16 fps).
REAL = dict(steps=50, frames=81, height=480, width=832, max_sequence_length=512, fps=16)
TINY = dict(steps=6, frames=9, height=128, width=128, max_sequence_length=16, fps=8)
PROMPT = "a cat walks on the grass, realistic"
NEGATIVE = "blurry, low quality, static"


def tiny_tokenizer(words):
    """A T5-style tokenizer (Unigram over whole words and letters, `</s>` appended, `<pad>` id 0) built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -1.0) for w in sorted(set(words))]
    vocab += [(c, -5.0) for c in "▁abcdefghijklmnopqrstuvwxyz,."]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_pipeline(prompt: str, seed: int = 0) -> WanPipeline:
    """WanPipeline from tiny random components (latent channels 16, as Wan's VAE statistics expect)."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_tokenizer((prompt + " " + NEGATIVE).replace(",", " ").lower().split())
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


def generate(pipe: WanPipeline, call: dict, steps: int, seed: int, output_type: str):
    """One generation on a fixed seed; returns (frames of the first video, seconds)."""
    start = time.perf_counter()
    frames = pipe(**call, num_inference_steps=steps, output_type=output_type,
                  generator=torch.Generator("cpu").manual_seed(seed)).frames[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return frames, time.perf_counter() - start


def timed(pipe: WanPipeline, call: dict, args):
    """(frames, seconds of the warm-up generation that compiles, seconds of the timed generation)."""
    _, warmup_s = generate(pipe, call, args.warmup_steps, args.seed, "latent")
    frames, seconds = generate(pipe, call, args.steps, args.seed, "pil")
    return frames, warmup_s, seconds


def write_gif(frames, path: Path, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)


def stack_runs(model) -> tuple[int, int]:
    """(computed, skipped) block-stack runs of the model's last generation, summed over its graphs and branches."""
    rows = dit_compiler.stats(model)
    last = max((r["generation"] for r in rows), default=0)
    rows = [r for r in rows if r["generation"] == last]
    return sum(r["computed"] for r in rows), sum(r["reused"] for r in rows)


def sparse_sites(model) -> int:
    """Attention sites running block-sparse (those with a visited-block fraction in the stats)."""
    return len({(r["graph"], site) for r in dit_compiler.stats(model) for site in r["density"]})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a local diffusers Wan T2V folder (from_pretrained, local files only)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--negative-prompt", default=NEGATIVE)
    parser.add_argument("--steps", type=int, help=f"denoising steps (default {REAL['steps']}, tiny {TINY['steps']})")
    parser.add_argument("--frames", type=int, help=f"video frames, 4k+1 (default {REAL['frames']}, tiny "
                                                   f"{TINY['frames']})")
    parser.add_argument("--height", type=int, help=f"pixels (default {REAL['height']}, tiny {TINY['height']})")
    parser.add_argument("--width", type=int, help=f"pixels (default {REAL['width']}, tiny {TINY['width']})")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="steps of the untimed first generation that compiles (latents only, no decode)")
    parser.add_argument("--sparsity", default="draft", choices=["draft", "svg", "none"])
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--cache", default="none", choices=["easycache", "none"])
    parser.add_argument("--cache-threshold", type=float, default=0.05)
    parser.add_argument("--compare", action="store_true",
                        help="also time the same pipeline with a plain torch.compile (Inductor) transformer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="dumps/wan_t2v.gif")
    parser.add_argument("--dump-dir", default="dumps/wan_t2v")
    args = parser.parse_args(argv)
    # vsparse tells a new generation by the timestep rising: after a one-step warm-up, the next generation's first
    # calls would repeat the warm-up's only timestep and count as more branches of its step.
    if args.warmup_steps < 2:
        parser.error("--warmup-steps must be at least 2 (the warm-up generation compiles; vsparse tells the next "
                     "generation by its timestep rising)")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("dit_compiler").setLevel(logging.INFO)  # one line per compiled graph: sites, seconds
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.model_dir:
        defaults = REAL
        pipe = load_pipeline(args.model_dir, dtype)
        print(f"WanPipeline from {args.model_dir} on {args.device}, {dtype}")
    else:
        defaults = TINY
        pipe = tiny_pipeline(args.prompt)
        print(f"no --model-dir: a tiny random-weight WanPipeline (UMT5 text encoder and a tokenizer built offline, "
              f"tiny VAE, 2-block transformer with head dim 64) on {args.device}; its video is noise")
    for key in ("steps", "frames", "height", "width"):
        setattr(args, key, getattr(args, key) or defaults[key])
    pipe.to(args.device)
    call = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                num_frames=args.frames, guidance_scale=args.guidance,
                max_sequence_length=defaults["max_sequence_length"])

    eager = pipe.transformer
    options = {"sparsity": args.sparsity, "density": args.density, "cache": args.cache,
               "cache_threshold": args.cache_threshold, "dump_dir": args.dump_dir}
    pipe.transformer = torch.compile(eager, backend="vsparse", options=options)
    print(f"vsparse {options}: compiling in a {args.warmup_steps}-step warm-up generation")
    frames, warmup_s, seconds = timed(pipe, call, args)
    computed, skipped = stack_runs(pipe.transformer)
    sparse = sparse_sites(pipe.transformer)
    out = Path(args.out)
    write_gif(frames, out, defaults["fps"])

    versus = ""
    if args.compare:
        pipe.transformer = torch.compile(eager)
        print("dense: the same pipeline with a plain torch.compile (Inductor) transformer, same seed")
        _, _, dense_s = timed(pipe, call, args)
        versus = f", dense Inductor {dense_s:.2f} s: speedup {dense_s / seconds:.2f}x"
    summary = (f"wan_t2v: {args.steps} steps, {len(frames)} frames {args.width}x{args.height} in {seconds:.2f} s "
               f"(warm-up with compile {warmup_s:.1f} s){versus}; block stack computed {computed}, skipped {skipped} "
               f"of {computed + skipped} runs; sparse attention sites: {sparse}; wrote {out}, dump {args.dump_dir}")
    print(summary)
    return summary


if __name__ == "__main__":
    main()
