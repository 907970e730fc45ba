"""DDP on the CPU (gloo, 2 processes, on any host, GPUs or not): one step on two halves equals one step
on the whole batch, and `torchrun -m crossmae_fast.pretrain --device cpu` runs end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crossmae_fast.config import model_config
from crossmae_fast.model.crossmae import CrossMAE
from crossmae_fast.train.step import TrainStep

ROOT = Path(__file__).resolve().parents[1]
B = 3  # per rank; odd on purpose
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_inputs(cfg, n: int, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, cfg.audio_frames, cfg.audio_bins, generator=g),
            torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g),
            torch.rand(n, cfg.num_audio_patches, generator=g), torch.rand(n, cfg.num_image_patches, generator=g))


def one_step(model, inputs, lr: float) -> dict:
    """One SGD step (so the weight change is exactly -lr * gradient) through TrainStep."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    step = TrainStep(model, opt, model.module.cfg.terms if hasattr(model, "module") else model.cfg.terms,
                     torch.device("cpu"))
    step(*inputs)
    return step.read()


def _worker(rank: int, world: int, port: int, out: str, variant: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = model_config("tiny", variant=variant, ops="reference")
        model = CrossMAE(cfg)
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        inputs = [x[rank * B:(rank + 1) * B] for x in fixed_inputs(cfg, world * B)]
        values = one_step(ddp, inputs, lr=1.0)
        if rank == 0:
            torch.save({"values": values, "weights": model.state_dict()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["crossmae", "cl-self-mae"])
def test_ddp_step_equals_combined_batch(tmp_path, variant):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out), variant), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    cfg = model_config("tiny", variant=variant, ops="reference")
    model = CrossMAE(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = one_step(model, fixed_inputs(cfg, 2 * B), lr=1.0)
    assert set(values) == set(got["values"]) == {"loss", *cfg.terms}
    for k, v in values.items():  # the ranks' mean loss is the combined batch's loss
        assert got["values"][k] == pytest.approx(v, rel=1e-5), k
    moved = 0
    for k, w in model.state_dict().items():  # so are the gradients (SGD, lr 1: the weight change)
        delta, delta_ddp = w - before[k], got["weights"][k] - before[k]
        # the change is read back from weights near 1 (norms): one fp32 ulp there is eps, 1.19e-7
        torch.testing.assert_close(delta_ddp, delta, rtol=1e-4, atol=2 * torch.finfo(torch.float32).eps, msg=k)
        moved += int(delta.abs().max() > 0)
    assert moved > 0.9 * len(before)


def test_torchrun_cli(tmp_path, tiny_set):
    data = tiny_set
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "crossmae_fast.pretrain", "--data", str(data["train"]), "--eval-data",
           str(data["eval"]), "--out", str(out), "--steps", "3", "--batch-size", "2", "--ops", "reference",
           "--workers", "1", "--log-every", "1", "--save-every", "2", "--eval-pictures", "0",
           "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x2" in proc.stdout and "retrieval" in proc.stdout
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    state = torch.load(out / "checkpoint-00000003.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert (out / "encoder_audio.pth").is_file()
