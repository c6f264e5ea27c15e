"""Sparse VideoGen's head classes on the trained harness under cheaper criteria than the one svg uses (the output MSE
of its SAMPLE_ROWS sampled rows under each mask against full attention, `svg.sampled_errors`): the share of the same rows' full
softmax mass each mask keeps (no P·V product, a fraction of the arithmetic), and the same MSE from fewer sampled rows
(`--rows`, each count sampled as svg samples its SAMPLE_ROWS). A cheaper criterion serves only if it picks the same
class: where it does, the masks and outputs are the same. Eager float32 generation (any device); every
self-attention call's q, k, v are classified every way.

`--exact` also computes the criterion itself over every video row (the masks' whole outputs against full attention)
and scores each row count (and with `--base`, another checkout's svg planner at its own row count) by how often it
picks the exactly better mask and by its excess error: the sum over heads of the chosen mask's exact MSE minus the
better mask's, relative to the sum of the better one's (0: always the better mask; near-ties cost nearly nothing).

    python benchmarks/svg_head_criteria.py --steps 2 --caption 0 --seed 0 --rows 32 16 --out criteria.json
    python benchmarks/svg_head_criteria.py --steps 10 --rows 64 21 --exact --base ../base --out exact.json
    python benchmarks/svg_head_criteria.py --steps 50 --stability --out stability.json

`--stability` asks whether a head's class could be kept for a few steps instead of sampled every call: per lag L,
the share of head classes (svg's own criterion) that differ from the same layer and CFG branch L steps earlier, over
the steps after the dense phase (`--dense-steps`, the option's default); and the share that differ between the two
branches of one step.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
from quality import generate, load_harness  # noqa: E402

from dit_compiler.passes.planners import svg  # noqa: E402


def mask_mass(q, k, constants: dict, scale: float) -> torch.Tensor:
    """[B, H, C-1] float32: the mean over the sampled rows of the full softmax mass each candidate mask (all but the
    first, the full mask) keeps."""
    probs = torch.softmax(((q[:, :, constants["sample_rows"]] @ k.transpose(-1, -2)) * scale).float(), -1)
    return (probs[:, :, None] * constants["sample_masks"][1:].float()).sum(-1).mean(-1)


SDPA = F.scaled_dot_product_attention  # the original: main() patches the module's while it generates


def exact_errors(q, k, v, constants: dict, scale: float):
    """([B, H], [B, H]) float32: the spatial and temporal masks' MSE against full attention over every row (the
    temporal mask in position-major order, its output put back)."""
    full = SDPA(q, k, v, scale=scale)
    attend = torch.ops.vsparse.block_sparse_attention
    spatial = attend(q, k, v, constants["spatial_num"][None, None], constants["spatial_indices"][None, None], scale, 128)
    perm, inverse = constants["position_major"], constants["position_major_inverse"]
    temporal = attend(*(t.index_select(2, perm) for t in (q, k, v)), constants["temporal_num"][None, None],
                      constants["temporal_indices"][None, None], scale, 128).index_select(2, inverse)
    return tuple((out - full).square().float().mean(dim=(-2, -1)) for out in (spatial, temporal))


def load_base_svg(checkout: str):
    """Another checkout's passes/planners/svg.py, importing this tree's package for everything else."""
    spec = importlib.util.spec_from_file_location("base_svg", Path(checkout) / "passes" / "planners" / "svg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sparse_steps(shift: float, steps: int, dense_steps: float) -> list[int]:
    """The steps of `generate`'s schedule past the dense phase (timestep <= (1 - dense_steps) * 1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return [i for i, t in enumerate(scheduler.timesteps.tolist()) if t <= (1 - dense_steps) * 1000]


def class_stability(classes: list, steps: list[int], layers: int, branches: int = 2, lags=(1, 2, 3, 5)) -> dict:
    """From every call's classes ([B, H] bool, in call order step → branch → layer): per lag, the share of classes
    at the `steps` (those past the dense phase) that differ from the same layer and branch `lag` steps earlier
    (`changed_after_<lag>`, over the pairs whose earlier step is among `steps` too); and the share that differ
    between the branches of one step (`branches_differ`)."""
    per_step = branches * layers
    by_call = torch.stack(classes).reshape(len(classes) // per_step, branches, layers, *classes[0].shape)
    sparse = set(steps)
    report = {}
    for lag in lags:
        pairs = [s for s in steps if s - lag in sparse]
        if pairs:
            changed = torch.stack([by_call[s] != by_call[s - lag] for s in pairs])
            report[f"changed_after_{lag}"] = round(float(changed.float().mean()), 4)
            report[f"changed_after_{lag}_by_layer"] = [round(float(x), 4)
                                                       for x in changed.float().transpose(0, 2).flatten(1).mean(1)]
    report["branches_differ"] = round(float((by_call[steps, 0] != by_call[steps, 1]).float().mean()), 4)
    report["temporal_share"] = round(float(by_call[steps].float().mean()), 4)
    report["steps_counted"] = len(steps)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harness", default=str(Path(__file__).resolve().parents[1] / "examples" / "harness"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--caption", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, nargs="*", default=[], help="sampled-row counts to compare with 64")
    parser.add_argument("--exact", action="store_true",
                        help="score every row count (and --base) against the criterion over all video rows")
    parser.add_argument("--base", help="another checkout's root: its svg planner as one more candidate (--exact)")
    parser.add_argument("--stability", action="store_true",
                        help="how often a head's class changes from step to step and between CFG branches")
    parser.add_argument("--dense-steps", type=float, default=0.15,
                        help="--stability counts the steps whose timestep is at most (1 - this) x 1000")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, record, captions, null = load_harness(Path(args.harness), device, torch.float32)
    frames, height, width = record["token_grid"]
    constants = svg.svg_constants((frames, height, width, 0, 0), 128, args.density, device=device)
    layout = (frames, height, width, 0, 0)
    fewer = {n: svg.svg_constants(layout, 128, args.density, n, device) for n in args.rows}
    counts = dict(calls=0, heads=0, agree=0, temporal_by_mse=0, temporal_by_mass=0,
                  **{f"agree_rows_{n}": 0 for n in args.rows})
    candidates = {f"rows_{n}": (svg, c) for n, c in fewer.items()}
    if args.base:
        base = load_base_svg(args.base)
        candidates[f"base_rows_{base.SAMPLE_ROWS if hasattr(base, 'SAMPLE_ROWS') else 64}"] = (
            base, base.svg_constants(layout, 128, args.density, device=device))
    exact = {name: dict(agree=0, excess=0.0) for name in candidates} if args.exact else {}
    better_total = [0.0]
    disagreements = []
    classes = []  # every call's svg classes, in call order: step, then branch (cond, uncond), then layer
    sdpa = SDPA

    def classifying_sdpa(*a, **kw):
        q, k, v = (a[i] if i < len(a) else kw[name] for i, name in enumerate(("query", "key", "value")))
        if q.shape[-2] == k.shape[-2] == frames * height * width:  # video self-attention
            scale = kw.get("scale") or q.shape[-1] ** -0.5
            spatial_error, temporal_error = svg.sampled_errors(q, k, v, constants, scale)
            by_mse = temporal_error < spatial_error
            mass = mask_mass(q, k, constants, scale)
            by_mass = mass[..., 1] > mass[..., 0]
            counts["calls"] += 1
            classes.append(by_mse)
            counts["heads"] += by_mse.numel()
            counts["agree"] += int((by_mse == by_mass).sum())
            counts["temporal_by_mse"] += int(by_mse.sum())
            counts["temporal_by_mass"] += int(by_mass.sum())
            for n, rows_constants in fewer.items():
                counts[f"agree_rows_{n}"] += int((svg.classify_with(q, k, v, rows_constants, scale) == by_mse).sum())
            if args.exact:
                exact_spatial, exact_temporal = exact_errors(q, k, v, constants, scale)
                better = torch.minimum(exact_spatial, exact_temporal)
                better_total[0] += float(better.sum())
                for name, (module, candidate) in candidates.items():
                    temporal = module.classify_with(q, k, v, candidate, scale)
                    chosen = torch.where(temporal, exact_temporal, exact_spatial)
                    exact[name]["agree"] += int((temporal == (exact_temporal < exact_spatial)).sum())
                    exact[name]["excess"] += float((chosen - better).sum())
            for b, h in (by_mse != by_mass).nonzero().tolist():
                disagreements.append(dict(call=counts["calls"], head=h, mse=[float(spatial_error[b, h]),
                                                                             float(temporal_error[b, h])],
                                          mass=[float(m) for m in mass[b, h]]))
        return sdpa(*a, **kw)

    noise = torch.randn(1, *record["latent_shape"], generator=torch.Generator().manual_seed(args.seed)).to(device)
    start = time.perf_counter()
    F.scaled_dot_product_attention = classifying_sdpa  # diffusers' native backend calls it through the module
    try:
        with torch.no_grad():
            generate(model, noise, captions[args.caption:args.caption + 1], null.unsqueeze(0), record["shift"],
                     args.steps, 5.0)
    finally:
        F.scaled_dot_product_attention = sdpa
    exact = {name: dict(agree=e["agree"], relative_excess_error=e["excess"] / max(better_total[0], 1e-30))
             for name, e in exact.items()}
    stability = class_stability(classes, sparse_steps(record["shift"], args.steps, args.dense_steps),
                                model.config.num_layers) if args.stability else {}
    report = dict(vars(args), **counts, exact=exact, stability=stability,
                  seconds=round(time.perf_counter() - start, 1), torch=torch.__version__,
                  disagreements=disagreements)
    print(json.dumps({k: v for k, v in report.items() if k != "disagreements"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
