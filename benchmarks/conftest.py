"""Benchmark session setup: collects `bench_*.py`, and holds the session-wide device, results and
reference figures (copy bandwidth, matmul peak) that every benchmark's extra_info is computed from.

Environment: `CROSSMAE_BENCH_BUDGET_S` skips benchmarks once that many seconds have passed (so a
time-boxed run still writes its JSON); `CROSSMAE_BENCH_THREADS` sets torch's CPU threads (default
1 without CUDA: CPU runs are smoke runs, and on a shared machine two or more threads made eager steps
ten times slower and erratic); `CROSSMAE_BENCH_BATCH` overrides the batch sizes;
`CROSSMAE_BENCH_PARTIAL=path` keeps the results so far in a file (see `common.record`).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from benchmarks import common

_START = time.perf_counter()


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config) -> None:
    threads = os.environ.get("CROSSMAE_BENCH_THREADS", "" if torch.cuda.is_available() else "1")
    if threads:
        torch.set_num_threads(int(threads))


@pytest.fixture(autouse=True)
def _time_budget():
    left = common.time_budget_left(_START)
    if left <= 0:
        pytest.skip("CROSSMAE_BENCH_BUDGET_S is spent")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def results() -> dict[str, dict[str, dict]]:
    """group -> impl -> extra_info of the benchmarks run so far (baselines run first in a group)."""
    return {}


@pytest.fixture(scope="session")
def copy_gbps(device) -> float:
    return common.copy_bandwidth(device)


@pytest.fixture(scope="session")
def peak_tflops(device) -> float:
    return common.matmul_tflops(device)
