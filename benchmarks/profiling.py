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


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def idle_gaps(trace: dict, top: int = 8, min_us: float = 5.0) -> dict:
    """Where the device waits during one call, from torch.profiler's chrome trace of it: the span from its first
    device event's start to its last one's end, the time some event runs (busy) and the rest (idle), the largest
    gaps between consecutive events (at least `min_us`) with the events around each, how late the host launched the
    one after (its launch call's start minus the gap's start: > 0, the device waited for the host), the innermost
    host op around that launch, and the host's runtime calls other than launches that overlap the gap (a
    synchronize, a cudaFree: the host waited for the device)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"])
    if not device:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "gaps": []}
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    host_ops = [e for e in events if e.get("cat") == "cpu_op"]
    busy, gaps, end, before = 0.0, [], device[0]["ts"], device[0]
    for event in device:
        if event["ts"] - end >= min_us:
            gaps.append((event["ts"] - end, end, before, event))
        busy += max(0.0, event["ts"] + event["dur"] - max(end, event["ts"]))
        if event["ts"] + event["dur"] >= end:
            end, before = event["ts"] + event["dur"], event
    span = end - device[0]["ts"]
    rows = []
    for gap, start, before, after in sorted(gaps, key=lambda g: -g[0])[:top]:
        launch = launches.get(after.get("args", {}).get("correlation"))
        around = [op for op in host_ops if launch and op["ts"] <= launch["ts"] <= op["ts"] + op["dur"]]
        waits = sorted({e["name"] for e in runtime if e["ts"] < start + gap and e["ts"] + e["dur"] > start
                        and "Launch" not in e["name"]})
        rows.append({"gap_us": round(gap, 1), "before": before["name"][:80], "after": after["name"][:80],
                     "launched_late_us": round(launch["ts"] - start, 1) if launch else None,
                     "launched_by": min(around, key=lambda op: op["dur"])["name"][:80] if around else None,
                     "host_waits": waits})
    return {"span_ms": round(span / 1e3, 2), "busy_ms": round(busy / 1e3, 2), "idle_ms": round((span - busy) / 1e3, 2),
            "gaps": rows}


def device_timeline(fn, top: int = 8) -> dict:
    """`idle_gaps` of one call of `fn` on CUDA (after a call that warms it), with the host's latency to the
    device's first event (`start_ms`: guards, wrappers and launches before any work reaches the device)."""
    import json
    import tempfile

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            with torch.profiler.record_function("timed call"):
                fn()
                torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    timeline = idle_gaps(trace, top)
    call = next(e for e in trace["traceEvents"] if e.get("name") == "timed call" and e.get("cat") == "user_annotation")
    first = min((e["ts"] for e in trace["traceEvents"] if e.get("cat") in DEVICE_CATEGORIES), default=call["ts"])
    return {"start_ms": round((first - call["ts"]) / 1e3, 2), **timeline}
