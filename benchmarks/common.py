"""Shared benchmark machinery: device and versions, synchronised timing through pytest-benchmark,
the session's copy-bandwidth and matmul-peak references, and the `extra_info` every result carries.

Timing: `measure` warms a callable up (compilation, autotuning, allocator), calibrates how many
calls make a round of about `round_s`, then runs `benchmark.pedantic` with the device synchronised
only at the end of each round, so pytest-benchmark's per-call statistics hold the device time of
back-to-back calls (launch latency hidden as in a training loop) and not a per-call sync.

Peak memory is `torch.cuda.max_memory_allocated` from the end of the first warm-up call (compiling
and autotuning done) to the end of the timed rounds, so a CUDA graph's capture counts; on the CPU
it is left out (None): torch's CPU allocator keeps no peak, and the process's max RSS only grows
over a session, so it cannot be attributed to one benchmark.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

GIB = 2**30


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def result_stem(device: torch.device | None = None) -> str:
    """File name stem of a result: card, date (UTC), torch and triton versions."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    v = versions()
    return f"{card}_{time.strftime('%Y%m%d-%H%M', time.gmtime())}_torch{v['torch'].split('+')[0]}_triton{v['triton']}"


def release() -> None:
    """Drop compiled graphs and cached memory between benchmark cases, so one case's leftovers do not
    count against the next."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DEFAULT_WORST_CASE_S = 30.0
"""A benchmark's worst case (cold compile + timing) where its module's `WORST_CASE_S` names none."""


def time_budget_left(start: float) -> float:
    """Seconds left of `CROSSMAE_BENCH_BUDGET_S` (counted from `start`); inf when unset."""
    budget = os.environ.get("CROSSMAE_BENCH_BUDGET_S")
    return float("inf") if not budget else float(budget) - (time.perf_counter() - start)


class _SyncEvery:
    """Calls `fn`; synchronises the device after every `every`-th call (the end of a round)."""

    def __init__(self, fn: Callable[[], object], every: int, device: torch.device):
        self.fn, self.every, self.device, self.calls = fn, every, device, 0

    def __call__(self) -> None:
        self.fn()
        self.calls += 1
        if self.calls % self.every == 0:
            sync(self.device)


@dataclass
class Timing:
    mean_s: float | None  # per call; None when pytest-benchmark is disabled
    peak_bytes: int | None


def measure(benchmark, fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            round_s: float = 0.02, rounds_s: float = 0.5, min_rounds: int = 3, max_rounds: int = 30) -> Timing:
    """Time `fn` (one call = one op or one step) with pytest-benchmark; see the module docstring."""
    for i in range(max(1, warmup)):
        fn()
        if i == 0 and device.type == "cuda":  # after compiling / autotuning, before any graph capture
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    sync(device)
    once = max((time.perf_counter() - t0) / 3, 1e-7)
    iterations = max(1, min(1000, int(round_s / once)))
    rounds = max(min_rounds, min(max_rounds, int(rounds_s / (once * iterations))))
    benchmark.pedantic(_SyncEvery(fn, iterations, device), rounds=rounds, iterations=iterations, warmup_rounds=1)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    stats = getattr(benchmark, "stats", None)
    return Timing(stats.stats.mean if stats is not None else None, peak)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read and written."""
    nbytes = nbytes or (512 * 2**20 if device.type == "cuda" else 64 * 2**20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    reps = 20 if device.type == "cuda" else 5
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t0) / 1e9


def matmul_tflops(device: torch.device) -> float:
    """Dense matrix-product peak measured here (bf16 8192^3 on CUDA, fp32 1024^3 on the CPU): the
    denominator of MFU. docs/design.md section 7 quotes ~790 TFLOP/s measured on an H100."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# --- targets (issue 7, H100, ViT-B, bf16, batch 256) ---------------------------------------------


@dataclass(frozen=True)
class Target:
    what: str
    metric: Callable[[dict, dict[str, dict]], float | None]  # (this info, its group's infos) -> value
    at_least: float | None = None
    at_most: float | None = None

    def check(self, info: dict, group: dict[str, dict]) -> dict:
        value = self.metric(info, group)
        met = None
        if value is not None:
            met = value >= self.at_least if self.at_least is not None else value <= self.at_most
        return {"what": self.what, "value": value, "met": met}


def _speedup_over(*names: str, prefix: str | None = None) -> Callable[[dict, dict[str, dict]], float | None]:
    """Best (smallest) mean among the named / prefixed benchmarks of the group, over this mean."""

    def metric(info: dict, group: dict[str, dict]) -> float | None:
        means = [g["mean_s"] for n, g in group.items()
                 if (n in names or (prefix and n.startswith(prefix))) and g.get("mean_s")]
        return min(means) / info["mean_s"] if means and info.get("mean_s") else None

    return metric


def _peak_vs(name: str) -> Callable[[dict, dict[str, dict]], float | None]:
    def metric(info: dict, group: dict[str, dict]) -> float | None:
        base = group.get(name, {}).get("peak_gib")
        return info["peak_gib"] / base if base and info.get("peak_gib") else None

    return metric


TARGETS: dict[tuple[str, str], list[Target]] = {
    ("train_step", "ours"): [
        Target("speedup vs eager reference >= 2.0", _speedup_over("reference"), at_least=2.0),
        Target("speedup vs torch.compile >= 1.3", _speedup_over("compile"), at_least=1.3),
        Target("MFU >= 0.45", lambda i, g: i.get("mfu"), at_least=0.45),
        Target("peak memory vs eager reference <= 0.7", _peak_vs("reference"), at_most=0.7),
    ],
    ("masking", "ours"): [Target("copy fraction >= 0.8", lambda i, g: i.get("copy_fraction"), at_least=0.8)],
    ("restore", "ours"): [Target("copy fraction >= 0.8", lambda i, g: i.get("copy_fraction"), at_least=0.8)],
    ("cls_topk", "ours"): [Target("speedup vs materialized >= 10", _speedup_over("materialized"), at_least=10.0)],
    ("cross_attention_index", "ours"): [
        Target("speedup vs best SDPA >= 1.2", _speedup_over("reference", prefix="sdpa-"), at_least=1.2)
    ],
    # issue 13 (MAE ViT-B/16, bf16, batch 256): `kernels.patch_mae` must not slow MAE's own step
    ("mae_step", "patched"): [Target("speedup vs MAE's methods >= 1.0", _speedup_over("mae"), at_least=1.0)],
    ("mae_step", "patched-compile"): [
        Target("speedup vs MAE's methods compiled >= 1.0", _speedup_over("mae-compile"), at_least=1.0)
    ],
}


def check_targets(info: dict, group: dict[str, dict], *, cuda: bool) -> None:
    """Set `info`'s targets (value and met for each) against the other results of its `group` so far.
    `target_met` is None on the CPU (the targets are the GPU's) or while some value is missing (say, a
    baseline not measured yet: `benchmarks.report` checks again once the whole group is in)."""
    targets = [t.check(info, group) for t in TARGETS.get((info.get("group"), info.get("impl")), [])]
    if targets:
        info["target"] = "; ".join(t["what"] for t in targets)
        info["targets"] = targets
        met = [t["met"] for t in targets]
        info["target_met"] = None if not cuda or None in met else all(met)


# --- recording -------------------------------------------------------------------------------------


def record(benchmark, results: dict[str, dict[str, dict]], timing: Timing, *, device: torch.device,
           group: str, impl: str, baseline: str | None, per_call: float, unit: str,
           flops: float | None = None, nbytes: float | None = None, copy_gbps: float | None = None,
           peak_tflops: float | None = None, **extra) -> dict:
    """Fill `benchmark.extra_info` and `results[group][impl]` with the derived figures.

    `per_call`: samples (unit "samples") or calls (unit "calls") one timed call handles; `flops` /
    `nbytes`: per timed call; `baseline`: the impl in the same group (measured earlier in this run)
    whose mean the speedup is taken against."""
    mean = timing.mean_s
    group_results = results.setdefault(group, {})
    if device.type == "cpu":
        extra["threads"] = torch.get_num_threads()
    info: dict = {"group": group, "impl": impl, "device": device_name(device), "device_type": device.type,
                  **versions(), **extra,
                  "mean_s": mean, f"{unit}_per_s": per_call / mean if mean else None}
    info["tflops"] = flops / mean / 1e12 if flops and mean else None
    if peak_tflops and info["tflops"]:
        info["mfu"] = info["tflops"] / peak_tflops
        info["peak_tflops"] = peak_tflops
    if nbytes:
        info["gbps"] = nbytes / mean / 1e9 if mean else None
        info["copy_gbps"] = copy_gbps
        info["copy_fraction"] = info["gbps"] / copy_gbps if info["gbps"] and copy_gbps else None
    base = mean if baseline == impl else group_results.get(baseline, {}).get("mean_s") if baseline else None
    info["baseline"] = baseline
    info["speedup"] = base / mean if base and mean else None
    info["peak_gib"] = timing.peak_bytes / GIB if timing.peak_bytes is not None else None
    check_targets(info, group_results, cuda=device.type == "cuda")
    group_results[impl] = info
    benchmark.extra_info.update(info)
    _write_partial(results)
    return info


def _write_partial(results: dict[str, dict[str, dict]]) -> None:
    """With `CROSSMAE_BENCH_PARTIAL=path`, keep every result so far in a file `benchmarks.report`
    reads: pytest-benchmark writes its JSON only at the end, and nothing when a run is killed."""
    path = os.environ.get("CROSSMAE_BENCH_PARTIAL")
    if not path:
        return
    benches = [{"group": g, "name": f"{g}[{i}]", "param": i, "stats": {"mean": info["mean_s"]}, "extra_info": info}
               for g, impls in results.items() for i, info in impls.items()]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"datetime": stamp, "partial": True, "benchmarks": benches}, f, indent=1, default=str)


def skip_unless_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        pytest.skip(f"{what} needs CUDA")


def skip_triton_on_cpu(device: torch.device) -> None:
    """Triton kernels on the CPU run in the interpreter: timings mean nothing. With TRITON_INTERPRET=1
    they still run (to check the call path), and the result says so."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("Triton on the CPU runs in the interpreter: interpreter timings mean nothing")
