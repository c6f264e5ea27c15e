"""What the text-to-video examples (wan_t2v.py, hunyuan_t2v.py, cogvideox_t2v.py) share.

Each example describes its pipeline with an `Example`: how to build it from tiny random components (no download:
tokenizers are built offline from a word list) or load it from a local diffusers folder, its default sizes, and the
arguments its pipeline call takes. `main` does the rest the same way for all: parse the command line, compile the
transformer with backend="vsparse", compile in a short untimed warm-up generation (latents only), time one
generation with the pipeline's progress bar, write the frames as a GIF, the vsparse dump and one summary line;
`--compare` times the same pipeline and seed with a plain `torch.compile` (Inductor) transformer.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import dit_compiler
from dit_compiler.options import CACHE, SPARSITY, Options


@dataclass
class Example:
    name: str  # the summary's first word and the default output names
    pipeline: str  # the diffusers pipeline class, for messages
    doc: str  # the example's module docstring (--help)
    real: dict  # defaults with --model-dir: steps, frames, height, width, fps
    tiny: dict  # defaults of the tiny random pipeline
    prompt: str
    negative_prompt: str | None  # None: the pipeline runs without a negative prompt
    guidance: float  # the pipeline's guidance_scale
    tiny_pipeline: Callable[[str], object]  # prompt -> a pipeline of tiny random components
    tiny_description: str  # what the tiny pipeline is made of
    load_pipeline: Callable[[str, torch.dtype], object]  # (folder, dtype) -> the pipeline, local files only
    call_options: Callable[[bool], dict]  # tiny? -> further pipeline call arguments


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


def prompt_words(*texts: str | None) -> list[str]:
    """The words of the prompts, for `tiny_tokenizer`."""
    return " ".join(t for t in texts if t).replace(",", " ").lower().split()


def generate(pipe, call: dict, steps: int, seed: int, output_type: str):
    """One generation on a fixed seed; returns (frames of the first video, seconds)."""
    start = time.perf_counter()
    frames = pipe(**call, num_inference_steps=steps, output_type=output_type,
                  generator=torch.Generator("cpu").manual_seed(seed)).frames[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return frames, time.perf_counter() - start


def timed(pipe, call: dict, args):
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


def parse_args(example: Example, argv=None) -> argparse.Namespace:
    real, tiny = example.real, example.tiny
    parser = argparse.ArgumentParser(description=example.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help=f"a local diffusers {example.pipeline} folder (from_pretrained, local "
                                            f"files only)")
    parser.add_argument("--prompt", default=example.prompt)
    if example.negative_prompt is not None:
        parser.add_argument("--negative-prompt", default=example.negative_prompt)
    parser.add_argument("--steps", type=int, help=f"denoising steps (default {real['steps']}, tiny {tiny['steps']})")
    parser.add_argument("--frames", type=int, help=f"video frames, 4k+1 (default {real['frames']}, tiny "
                                                   f"{tiny['frames']})")
    parser.add_argument("--height", type=int, help=f"pixels (default {real['height']}, tiny {tiny['height']})")
    parser.add_argument("--width", type=int, help=f"pixels (default {real['width']}, tiny {tiny['width']})")
    parser.add_argument("--guidance", type=float, default=example.guidance, help="the pipeline's guidance_scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="steps of the untimed first generation that compiles (latents only, no decode)")
    defaults = Options()  # vsparse's own, so that the example runs what a user's one line runs
    parser.add_argument("--sparsity", default=defaults.sparsity, choices=SPARSITY)
    parser.add_argument("--density", type=float, default=defaults.density)
    parser.add_argument("--cache", default=defaults.cache, choices=CACHE)
    parser.add_argument("--cache-threshold", type=float, default=defaults.cache_threshold)
    parser.add_argument("--compare", action="store_true",
                        help="also time the same pipeline with a plain torch.compile (Inductor) transformer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=f"dumps/{example.name}.gif")
    parser.add_argument("--dump-dir", default=f"dumps/{example.name}")
    args = parser.parse_args(argv)
    # vsparse tells a new generation by the timestep rising: after a one-step warm-up, the next generation's first
    # calls would repeat the warm-up's only timestep and count as more branches of its step.
    if args.warmup_steps < 2:
        parser.error("--warmup-steps must be at least 2 (the warm-up generation compiles; vsparse tells the next "
                     "generation by its timestep rising)")
    return args


def main(example: Example, argv=None) -> str:
    """Run the example; returns (and prints) its summary line."""
    args = parse_args(example, argv)
    logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("dit_compiler").setLevel(logging.INFO)  # one line per compiled graph: sites, seconds
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tiny = not args.model_dir
    if tiny:
        pipe = example.tiny_pipeline(args.prompt)
        print(f"no --model-dir: a tiny random-weight {example.pipeline} ({example.tiny_description}) on "
              f"{args.device}; its video is noise")
    else:
        pipe = example.load_pipeline(args.model_dir, dtype)
        print(f"{example.pipeline} from {args.model_dir} on {args.device}, {dtype}")
    defaults = example.tiny if tiny else example.real
    for key in ("steps", "frames", "height", "width"):
        setattr(args, key, getattr(args, key) or defaults[key])
    pipe.to(args.device)
    call = dict(prompt=args.prompt, height=args.height, width=args.width, num_frames=args.frames,
                guidance_scale=args.guidance, **example.call_options(tiny))
    if example.negative_prompt is not None:
        call["negative_prompt"] = args.negative_prompt

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
    summary = (f"{example.name}: {args.steps} steps, {len(frames)} frames {args.width}x{args.height} in "
               f"{seconds:.2f} s (warm-up with compile {warmup_s:.1f} s){versus}; block stack computed {computed}, "
               f"skipped {skipped} of {computed + skipped} runs; sparse attention sites: {sparse}; wrote {out}, "
               f"dump {args.dump_dir}")
    print(summary)
    return summary
