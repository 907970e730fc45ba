"""The Trainer's parts on their own: resume rules, finding the checkpoint to resume, metrics records
and their trimming, stopping (signals, time limit, agreement across DDP ranks), the train state."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crossmae_fast.components import checkpoint as ckpt
from crossmae_fast.components.checkpoint import TrainState
from crossmae_fast.components.metrics_log import MetricsLog, NonFiniteLoss, trim_metrics
from crossmae_fast.components.stopping import Stopper
from crossmae_fast.config import run_config

# --- what a resume may change ---------------------------------------------------------------------


def state_of(cfg, world_size: int = 1) -> dict:
    return {"config": cfg.to_dict(), "world_size": world_size}


@pytest.mark.parametrize("change", [
    dict(ops="triton"), dict(loader="dali", workers=5, video=True), dict(out="elsewhere", log_every=3, keep=9),
    dict(save_every=7, time_limit=3.0, device="cpu", cuda_graph=False, compile=True, threads=2),
    dict(export_encoders=False, init="mae.pth", eval_data="e.json", eval_pictures=0),
])
def test_operational_fields_may_change(change):
    saved = run_config(steps=10, ops="reference", loader="torch")
    assert ckpt.check_resume(state_of(saved), run_config({"steps": 10, "ops": "reference", "loader": "torch",
                                                           **change}), 1, "c.pt") == []


def test_run_length_changes_with_a_warning():
    saved = run_config(steps=10)
    assert ckpt.check_resume(state_of(saved), run_config(steps=20), 1, "c.pt") == ["train.steps: 10 -> 20"]
    assert ckpt.check_resume(state_of(saved), run_config(steps=10, epochs=3), 1, "c.pt") == [
        "train.epochs: 12.5 -> 3.0"]  # the tiny preset's 12.5


@pytest.mark.parametrize("change, name", [
    (dict(mask_ratio=0.6), "model.mask_ratio"), (dict(variant="cl-av"), "model.variant"),
    (dict(audio_mean=-4.0), "data.audio_mean"), (dict(image_std=(0.3, 0.3, 0.3)), "data.image_std"),
    (dict(blr=1e-4), "train.blr"), (dict(batch_size=8), "train.batch_size"), (dict(seed=1), "train.seed"),
    (dict(data="other.json"), "train.data"), (dict(precision="bf16"), "train.precision"),
    (dict(preset="base"), "model.embed_dim"),
])
def test_fields_that_change_the_updates_must_match(change, name):
    with pytest.raises(ValueError, match="different configuration") as e:
        ckpt.check_resume(state_of(run_config()), run_config(change), 1, "c.pt")
    assert name in str(e.value)


def test_world_size_and_old_checkpoints_refused(tmp_path):
    cfg = run_config()
    with pytest.raises(ValueError, match="world_size: 2 -> 1"):
        ckpt.check_resume(state_of(cfg, world_size=2), cfg, 1, "c.pt")
    old = tmp_path / ckpt.checkpoint_name(1)  # the pre-release layout: no `config`, no `world_size`
    torch.save({"model": {}, "optimizer": {}, "step": 1, "epoch": 0, "batch": 1, "rng": [], "metrics": {},
                "model_config": cfg.model.to_dict(), "train_config": {}}, old)
    with pytest.raises(ValueError, match="missing config, world_size"):
        ckpt.load_checkpoint(old)


def test_field_missing_from_a_checkpoint_counts_as_its_default():
    cfg = run_config()
    saved = cfg.to_dict()
    del saved["model"]["contrastive_weight"], saved["data"]["eval_frame"]
    assert ckpt.check_resume({"config": saved, "world_size": 1}, cfg, 1, "c.pt") == []


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume(tmp_path, None) == (None, None)
    assert ckpt.resolve_resume(tmp_path, "auto") == (None, None)
    assert "no such checkpoint" in ckpt.resolve_resume(tmp_path, str(tmp_path / "x.pt"))[1]
    assert "no checkpoint in that folder" in ckpt.resolve_resume(tmp_path, str(tmp_path))[1]
    for step in (3, 7):
        ckpt.save_checkpoint(tmp_path, {**dict.fromkeys(ckpt.REQUIRED, 0), "step": step}, keep=5)
    assert ckpt.resolve_resume(tmp_path, "auto") == (tmp_path / ckpt.checkpoint_name(7), None)
    assert ckpt.resolve_resume(tmp_path, str(tmp_path / ckpt.checkpoint_name(3)))[0].name.endswith("03.pt")
    assert "already holds a run" in ckpt.resolve_resume(tmp_path, None)[1]


# --- metrics ----------------------------------------------------------------------------------------


def test_trim_metrics_drops_later_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (2, 4, 6)] + [json.dumps({"step": 4, "eval": {}})]
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')
    trim_metrics(path, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4, 4]


class FakeStep:
    """The part of `TrainStep` a `MetricsLog` reads: `count` and `read()`."""

    def __init__(self, *values):
        self.values, self.count = list(values), 0

    def read(self):
        self.count = 0
        return self.values.pop(0)


def test_metrics_log_resumes_trims_and_stops_on_nan(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15)))
    mlog = MetricsLog(tmp_path, total=40, per_epoch=8, global_batch=4, is_main=True, step=10, seconds=100.0)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [5, 10]  # past the checkpoint: gone
    step = FakeStep({"loss": 0.5, "contrastive": 0.25}, {"loss": float("nan"), "contrastive": 1.0})
    assert mlog.flush(step, 12, 1e-3) is None  # nothing accumulated: no record
    step.count = 2
    record = mlog.flush(step, 12, 1e-3)
    assert record["step"] == 12 and record["epoch"] == 1.5 and record["loss"] == 0.5 and record["lr"] == 1e-3
    assert record["time_s"] >= 100.0 and record["steps_per_s"] > 0
    assert json.loads(path.read_text().splitlines()[-1]) == record
    step.count = 3
    with pytest.raises(NonFiniteLoss, match=r"steps 13-15: loss=nan.*last good checkpoint: none"):
        mlog.flush(step, 15, 1e-3)
    assert len(path.read_text().splitlines()) == 3


# --- stopping ---------------------------------------------------------------------------------------


def test_stopper_signals_and_time_limit():
    before = signal.getsignal(signal.SIGTERM)
    with Stopper() as stop:
        assert stop.check(at_log=False) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.check(at_log=False) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    with Stopper(time_limit_min=1e-5) as stop:
        time.sleep(0.01)
        assert stop.check(at_log=False) == "time limit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agreement_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        stop = Stopper(world_size=2)
        seen = [stop.check(at_log=False)]
        if rank == 1:
            stop.signal = "SIGTERM"  # only rank 1 is told to stop
        seen += [stop.check(at_log=False), stop.check(at_log=True)]
        torch.save(seen, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_to_stop_at_log_steps(tmp_path):
    out = str(tmp_path / "seen")
    mp.spawn(_agreement_worker, args=(free_port(), out), nprocs=2, join=True)
    seen = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    assert seen[0] == [None, None, "stop on another rank"]  # between log steps nobody stops alone
    assert seen[1] == [None, None, "SIGTERM"]


# --- state ------------------------------------------------------------------------------------------


def test_train_state_carries_whole_epochs_and_round_trips():
    s = TrainState(step=9, epoch=1, batch=9, metrics={"loss": 1.0})
    s.carry_epochs(4)
    assert (s.epoch, s.batch) == (3, 1)
    back = TrainState()
    back.load_state_dict(s.state_dict())
    assert back == s
    assert set(s.state_dict()) < set(ckpt.REQUIRED)  # the checkpoint's keys come from the state's fields
    with pytest.raises(KeyError):
        back.load_state_dict({"step": 5, "epoch": 1, "batch": 1, "rng": [{}]})  # no `metrics`


# --- TensorBoard ------------------------------------------------------------------------------------


def test_metrics_log_writes_tensorboard_scalars_on_the_main_rank(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mlog = MetricsLog(tmp_path, total=4, per_epoch=2, global_batch=4, is_main=True, tensorboard=True)
    step = FakeStep({"loss": 0.5, "contrastive": 0.25})
    step.count = 2
    mlog.flush(step, 2, 1e-3)
    mlog.append({"step": 4, "eval": {"retrieval": {"a2v": {"r1": 0.75}}, "manifest": "x.json"}})
    mlog.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "contrastive", "lr", "epoch", "eval/retrieval/a2v/r1"} <= set(tags) and "step" not in tags
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/retrieval/a2v/r1")] == [(4, 0.75)]
    other = tmp_path / "rank1"
    MetricsLog(other, total=4, per_epoch=2, global_batch=4, is_main=False, tensorboard=True).close()
    assert not other.exists()  # only the main rank writes


def test_tensorboard_missing_is_one_clear_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
        MetricsLog(tmp_path, total=4, per_epoch=2, global_batch=4, is_main=True, tensorboard=True)
