"""benchmarks/runtime_overhead.py's table: each variant against plain Inductor in its own Inductor mode."""
from repo_modules import load

runtime_overhead = load("benchmarks/runtime_overhead.py")


def test_a_reduce_overhead_variant_is_compared_with_inductor_under_reduce_overhead():
    """The table compared every row with Inductor's default mode: vsparse under CUDA graphs read 1.62x where the
    like-for-like ratio was 1.34x (H100, b26b6d5)."""
    results = [{"variant": "inductor", "forward_ms": 2.988},
               {"variant": "inductor-reduce-overhead", "forward_ms": 2.475},
               {"variant": "vsparse-none", "error": "failed"}]
    assert runtime_overhead.inductor_forward_ms(results, "vsparse-defaults") == 2.988
    assert runtime_overhead.inductor_forward_ms(results, "vsparse-defaults-reduce-overhead") == 2.475
    assert runtime_overhead.inductor_forward_ms(results[:1], "vsparse-cache-reduce-overhead") is None


def test_host_profile_reports_functions_per_forward():
    """--host-profile's rows: the loop's costliest functions by own time, counted per forward (20 a loop)."""
    import torch

    def forward(**inputs):
        torch.ones(64).cumsum(0)
        return (inputs["hidden_states"],)

    variant = {"fn": forward, "latents": torch.zeros(1, 2), "texts": [torch.zeros(1, 2)] * 2}
    rows = runtime_overhead.host_profile(variant, top=50)
    assert rows == sorted(rows, key=lambda r: -r[2])
    cumsum = next(r for r in rows if "cumsum" in r[0])
    assert cumsum[1] == 1.0 and 0 < cumsum[2] <= cumsum[3]
    assert next(r for r in rows if r[0].endswith("(forward)"))[1] == 1.0
