"""A linear layer followed by tanh-GELU (every feed-forward of Wan, HunyuanVideo, CogVideoX and LTX-Video) as plain
Inductor compiles it, against `torch._addmm_activation(bias, x, weightᵀ, use_gelu=True)`, which on CUDA runs the GELU
in cuBLASLt's epilogue instead of a separate pointwise kernel that reads and writes the whole hidden activation.
On the GPU: median ms (do_bench), the kernels each variant runs (torch.profiler, GPU µs a call), and each output's
relative error against a float64 reference.

    python benchmarks/linear_gelu.py [--tokens 32760 --dim 1536 --hidden 8960] [--out linear_gelu.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from profiling import kernel_table


def variants() -> dict:
    """name: (function of x, weight, bias; whether it computes the GELU)."""
    def unfused(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    def epilogue(x, w, b):
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)

    return {"inductor": (torch.compile(unfused), True), "addmm_activation": (epilogue, True),
            "addmm_activation under Inductor": (torch.compile(epilogue), True),
            "linear alone (no GELU: the floor)": (lambda x, w, b: F.linear(x, w, b), False)}


def main(tokens: int, dim: int, hidden: int, budget_ms: float) -> list:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, dim, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(hidden, dim, device="cuda", generator=g) / dim ** 0.5).to(torch.bfloat16)
    b = torch.randn(hidden, device="cuda", generator=g).to(torch.bfloat16)
    reference = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh")
    rows = []
    for name, (fn, gelu) in variants().items():
        out = fn(x, w, b)
        error = ((out.double() - reference).norm() / reference.norm()).item() if gelu else None
        ms = triton.testing.do_bench(lambda: fn(x, w, b), warmup=budget_ms / 4, rep=budget_ms,
                                     return_mode="median")
        kernels = kernel_table(lambda: fn(x, w, b), x.device, top=6)  # [name, launches, GPU µs] a call
        rows.append({"variant": name, "ms": round(ms, 4), "rel_error_vs_float64": error, "kernels": kernels})
        print(json.dumps(rows[-1]))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32760, help="rows (Wan-1.3B 480p x 81 frames: 32760)")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--hidden", type=int, default=8960)
    parser.add_argument("--budget-ms", type=float, default=300.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": [args.tokens, args.dim, args.hidden],
              "rows": main(args.tokens, args.dim, args.hidden, args.budget_ms)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
