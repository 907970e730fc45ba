"""Multi-node rehearsal on one machine: two torchrun agents (`--nnodes 2`, one process each, c10d
rendezvous on 127.0.0.1, gloo, `--device cpu`) pre-train a few steps on shards and end with the weights
and losses of the single-node two-process run; one agent killed mid-run, both resumed from the last
checkpoint, end there too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from optional import MEDIA, needs
from test_ddp import ROOT, free_port

from crossmae_fast.data.shard_writer import write_shards

STEPS, SAVE_EVERY = 12, 2
pytestmark = [pytest.mark.slow, needs(*MEDIA, "webdataset")]


@pytest.fixture(scope="module")
def shards(tiny_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return write_shards(tiny_set["train"], out, clips_per_shard=5, processes=1, progress=False).manifest


def pretrain_args(data: str, out: Path, *extra: str) -> list[str]:
    return ["-m", "crossmae_fast.pretrain", "--data", data, "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "2", "--ops", "reference", "--workers", "1", "--log-every", "1",
            "--save-every", str(SAVE_EVERY), "--threads", "1", "--device", "cpu", "--seed", "5", *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def start_node(data: str, out: Path, port: int, rdzv_id: str, log: Path, *extra: str) -> subprocess.Popen:
    """One torchrun agent of a 2-node job; its node rank comes from the rendezvous."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
           "--max-restarts", "0", *pretrain_args(data, out, *extra)]
    return subprocess.Popen(cmd, cwd=out.parent, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: the kill takes its worker too


def two_nodes(data: str, out: Path, *extra: str, tag: str = "") -> list[subprocess.Popen]:
    port, rdzv = free_port(), uuid.uuid4().hex[:8]
    return [start_node(data, out, port, rdzv, out.parent / f"{out.name}{tag}-node{k}.log", *extra) for k in range(2)]


def wait(procs: list[subprocess.Popen], timeout: float = 400) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            lose_node(p)
            codes.append(p.wait())
    return codes


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        top = todo.pop()
        kids = [c for c, p in parent.items() if p == top]
        found += kids
        todo += kids
    return found


def lose_node(agent: subprocess.Popen) -> None:
    """SIGKILL a node's agent and its workers, as a machine that goes down."""
    os.kill(agent.pid, signal.SIGSTOP)  # no restarts or reports while its workers go
    for pid in descendants(agent.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(agent.pid, signal.SIGKILL)


def logs(out: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(out.parent.glob(f"{out.name}*-node*.log")))


def result(out: Path) -> tuple[dict, dict[int, float]]:
    """(final weights, last logged loss of each step)."""
    state = torch.load(out / f"checkpoint-{STEPS:08d}.pt", weights_only=True)
    assert state["world_size"] == 2
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return state["model"], losses


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[1] == b[1] and sorted(a[1]) == list(range(1, STEPS + 1))
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k


@pytest.fixture(scope="module")
def single_node(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), *pretrain_args(shards, out)]
    proc = subprocess.run(cmd, cwd=out.parent, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return result(out)


def test_two_agents_equal_the_single_node_run(shards, single_node, tmp_path):
    out = tmp_path / "run"
    assert wait(two_nodes(shards, out)) == [0, 0], logs(out)
    assert_same(result(out), single_node)


def test_killed_agent_both_resume_from_the_last_checkpoint(shards, single_node, tmp_path):
    out = tmp_path / "run"
    nodes = two_nodes(shards, out)
    first = out / f"checkpoint-{SAVE_EVERY:08d}.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and time.monotonic() < deadline and all(p.poll() is None for p in nodes):
        time.sleep(0.02)
    assert first.exists(), logs(out)
    lose_node(nodes[1])
    codes = wait(nodes, timeout=120)  # the other one fails once its peer is gone
    assert codes[1] != 0 and codes[0] != 0, logs(out)
    saved = sorted(p.name for p in out.glob("checkpoint-*.pt"))
    assert f"checkpoint-{STEPS:08d}.pt" not in saved, saved
    assert wait(two_nodes(shards, out, "--resume", "auto", tag="-resumed")) == [0, 0], logs(out)
    assert_same(result(out), single_node)
