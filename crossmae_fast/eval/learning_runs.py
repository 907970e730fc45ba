"""The learning check's training runs: `python -m crossmae_fast.pretrain` subprocesses for every variant and
seed, a few at a time, each logged to its own file (the CLI is crossmae_fast/learning_check.py; the targets and
tables are in report.py)."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from crossmae_fast.eval.report import VARIANTS


def run_logged(cmd: list[str], log: Path) -> float:
    """Run `cmd`, its output to `log`; seconds taken. A failure raises with the log's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{shlex.join(cmd)} exited with {rc}; end of {log}:\n{tail}")
    return time.perf_counter() - t0


def train_all(a: argparse.Namespace, train_manifest: Path, out: Path) -> tuple[dict, dict]:
    """Pre-train every variant and seed as subprocesses: ({name: (variant, run folder, command)}, seconds)."""
    jobs = {}
    for variant in VARIANTS:
        for seed in a.seeds:
            run_dir = out / f"{variant}-s{seed}"
            jobs[f"{variant} s{seed}"] = (variant, run_dir, [
                sys.executable, "-m", "crossmae_fast.pretrain", "--data", str(train_manifest), "--preset", "tiny",
                "--variant", variant, "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seed", str(seed),
                "--loader", a.loader, "--workers", str(a.workers), "--threads", "1", "--out", str(run_dir),
                "--resume", "auto", "--save-every", "0", "--keep", "1", "--log-every", "50", "--no-export-encoders",
                *shlex.split(a.extra)])
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        futures = {}
        for name, (_, run_dir, cmd) in jobs.items():
            print(f"[{name}] {shlex.join(cmd)}", flush=True)
            futures[name] = pool.submit(run_logged, cmd, out / f"{run_dir.name}.pretrain.log")
        return jobs, {name: f.result() for name, f in futures.items()}


def host_line() -> str:
    """The device and the load, for a results file."""
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{dev}, load average {os.getloadavg()[0]:.1f} at the end"
