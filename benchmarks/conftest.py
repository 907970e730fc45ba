"""Benchmark session setup: collects `bench_*.py`, and holds the session-wide device, results and
reference figures (copy bandwidth, matmul peak) that every benchmark's extra_info is computed from.

Order: every torch.compile benchmark (an `impl` naming `compile`: the longest cold starts) runs after
all the others, the train step's first; otherwise files and parameters keep their order.

Environment: `CROSSMAE_BENCH_BUDGET_S` is the session's budget in seconds: a benchmark starts only
when at least its worst case (the `WORST_CASE_S` of its module, by `impl`; cold compiles included) is
left, else it is skipped, so a time-boxed run ends in time and still writes its JSON.
`CROSSMAE_BENCH_THREADS` sets torch's CPU threads (default
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


def _impl(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("impl") if callspec else None


def worst_case_s(item) -> float:
    """Seconds `item` may take at most, cold compiles included (its module's `WORST_CASE_S`)."""
    table = getattr(item.module, "WORST_CASE_S", {})
    return float(table.get(_impl(item), table.get(None, common.DEFAULT_WORST_CASE_S)))


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        if "compile" not in (_impl(item) or ""):
            return 0
        return 1 if item.module.__name__.endswith("bench_train_step") else 2

    items[:] = sorted(items, key=rank)  # stable: the rest keeps its order


@pytest.fixture(autouse=True)
def _time_budget(request):
    left, need = common.time_budget_left(_START), worst_case_s(request.node)
    if left < need:
        pytest.skip(f"CROSSMAE_BENCH_BUDGET_S: {max(left, 0):.0f} s left, this benchmark may take {need:.0f} s")


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
