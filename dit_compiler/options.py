"""The backend's options: `torch.compile(m, backend="vsparse", options={...})` or `dit_compiler.vsparse(**options)`.

Defaults and why they are what they are are stated in README.md ("Options").
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from dit_compiler.passes.planners import PLANNERS

SPARSITY = (*PLANNERS, "none")  # the registered planners, or dense
CACHE = ("easycache", "none")
BLOCK_SIZES = (64, 128)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Options:
    # The defaults are measured (README "Why these defaults"): the fastest setting on Wan2.1-1.3B whose quality on
    # the trained harness clears 32 dB PSNR and 0.93 SSIM against dense.
    sparsity: str = "svg"
    density: float = 0.15
    block_size: int = 128
    dense_steps: float = 0.15
    dense_layers: int = 1
    cache: str = "easycache"
    cache_threshold: float = 0.25
    cache_start: float = 0.05  # leading share of the timestep scale in which the cache reuses nothing
    plan_every: int = 2  # svg's head classes sampled every this many steps of a CFG branch (passes/plan_reuse.py)
    force_sparse: bool = False  # rewrite every eligible site whatever the cost model estimates
    force_cache: bool = False  # cache the block stack whatever the cost model estimates
    dump_dir: Optional[str] = None
    mode: Optional[str] = None  # Inductor's mode; torch.compile refuses mode= together with options=

    @property
    def rewrites_attention(self) -> bool:
        return self.sparsity != "none"

    @property
    def splits_block_stack(self) -> bool:
        return self.cache != "none"


def _fraction(key: str, value: Any, *, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"vsparse option {key!r} must be a number, got {value!r}")
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        allowed = "0 < x <= 1" if low_open else "0 <= x <= 1"
        raise ValueError(f"vsparse option {key!r} must satisfy {allowed}, got {value!r}")
    return float(value)


def _choice(key: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"vsparse option {key!r} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def parse_options(options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> Options:
    """Validate user options; an unknown key or bad value raises ValueError naming the key and what is allowed."""
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown vsparse option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(known))}")
    if mode is not None:
        if options.get("mode") not in (None, mode):
            raise ValueError(f"vsparse option 'mode' given twice: {options['mode']!r} and {mode!r}")
        options["mode"] = mode
    if "dump_dir" not in options and os.environ.get("VSPARSE_DUMP_DIR"):
        options["dump_dir"] = os.environ["VSPARSE_DUMP_DIR"]
    for key in ("force_sparse", "force_cache"):
        variable = f"VSPARSE_{key.upper()}"
        if key not in options and os.environ.get(variable):
            options[key] = os.environ[variable] == "1"
    parsed = {}
    for key, value in options.items():
        if key == "sparsity":
            parsed[key] = _choice(key, value, SPARSITY)
        elif key == "cache":
            parsed[key] = _choice(key, value, CACHE)
        elif key == "block_size":
            parsed[key] = _choice(key, value, BLOCK_SIZES)
        elif key == "density":
            parsed[key] = _fraction(key, value, low_open=True)
        elif key in ("dense_steps", "cache_start"):
            parsed[key] = _fraction(key, value, low_open=False)
        elif key in ("dense_layers", "plan_every"):
            least = 1 if key == "plan_every" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"vsparse option {key!r} must be an int >= {least}, got {value!r}")
            parsed[key] = value
        elif key == "cache_threshold":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"vsparse option 'cache_threshold' must be a float > 0, got {value!r}")
            parsed[key] = float(value)
        elif key in ("force_sparse", "force_cache"):
            if not isinstance(value, bool):
                raise ValueError(f"vsparse option {key!r} must be True or False, got {value!r}")
            parsed[key] = value
        elif key == "dump_dir":
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"vsparse option 'dump_dir' must be a path, got {value!r}")
            parsed[key] = None if value is None else os.fspath(value)
        elif key == "mode":
            parsed[key] = None if value is None else _choice(key, value, MODES)
    return Options(**parsed)
