"""What share of a generation's steps the `dense_steps` option keeps dense, under the schedules users run.

`dense_steps` is a share of the absolute timestep scale (a call is dense while t > (1 - dense_steps) * 1000), so the
share of *steps* it covers depends on the scheduler's shift and step count. Prints a markdown table for diffusers'
`FlowMatchEulerDiscreteScheduler` (Wan, HunyuanVideo, LTX use it; Wan 480p shift 3, 720p shift 5).

    python benchmarks/dense_steps_share.py
"""
from __future__ import annotations

import argparse

from diffusers import FlowMatchEulerDiscreteScheduler

from dit_compiler.runtime.state import dense_phase


def dense_share(shift: float, steps: int, dense_steps: float) -> float:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return sum(bool(dense_phase(float(t), dense_steps)) for t in scheduler.timesteps) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shifts", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 50])
    parser.add_argument("--dense-steps", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    args = parser.parse_args()
    print("| shift | steps | " + " | ".join(f"dense_steps={d}" for d in args.dense_steps) + " |")
    print("|---|---|" + "---|" * len(args.dense_steps))
    for shift in args.shifts:
        for steps in args.steps:
            shares = [dense_share(shift, steps, d) for d in args.dense_steps]
            print(f"| {shift:g} | {steps} | " + " | ".join(f"{s:.0%}" for s in shares) + " |")


if __name__ == "__main__":
    main()
