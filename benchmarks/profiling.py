"""What a call runs on the device, from torch.profiler: shared by site_breakdown.py and end_to_end.py."""
from __future__ import annotations

import torch


def kernel_table(fn, device: torch.device, iterations: int = 5, top: int | None = 40) -> list:
    """What one call of `fn` runs, from torch.profiler: [name, launches per call, µs per call] of the costliest
    kernels (GPU time on CUDA, self CPU time of the ops on a CPU), so the differences between variants (planning,
    permutation) can be read kernel by kernel. `top=None`: every kernel."""
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.no_grad():
        fn()
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(iterations):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0 and (device.type != "cuda" or event.device_type == torch.autograd.DeviceType.CUDA):
            rows.append([event.key, round(event.count / iterations, 2), round(us / iterations, 1)])
    return sorted(rows, key=lambda r: -r[2])[:top]
