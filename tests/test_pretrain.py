"""Pre-training CLI, schedule, parameter groups, checkpoints and exact resume (CPU, tiny preset)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

from crossmae_fast import options, pretrain
from crossmae_fast.components import checkpoint as ckpt
from crossmae_fast.components import lr_schedule
from crossmae_fast.components.lr_schedule import lr_at
from crossmae_fast.components.metrics_log import NonFiniteLoss
from crossmae_fast.config import RunConfig, TrainConfig, model_config, run_config
from crossmae_fast.data import normalisation
from crossmae_fast.files import atomic_write
from crossmae_fast.model.crossmae import CrossMAE
from crossmae_fast.train import trainer
from crossmae_fast.train.step import TrainStep, param_groups
from crossmae_fast.train.trainer import Trainer


@pytest.fixture(autouse=True)
def keep_threads():
    """`Trainer.fit` sets torch's thread count (the CLI owns its process); undo it for other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth(tiny_set):
    return tiny_set


def tiny_cfg(synth, out, **kw) -> RunConfig:
    base = dict(data=str(synth["train"]), out=str(out), batch_size=4, ops="reference", loader="torch", workers=0,
                log_every=1, save_every=0, export_encoders=False, eval_pictures=0, threads=1,
                device="cpu")  # the tolerances here are the CPU's fp32 ones
    return run_config({**base, **kw})


def fit(cfg: RunConfig) -> dict:
    return Trainer(cfg).fit()


def metrics(out) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


# --- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, word", [
    (["--batch-size", "0"], "batch-size"),
    (["--warmup", "abc"], "warmup"),
    (["--variant", "nope"], "variant"),
    (["--lr", "-1"], "lr"),
    (["--variant", "cl-av", "--attentive-tokens", "zero"], "attentive_tokens"),
    (["--device", "tpu"], "device"),
])
def test_bad_values_fail_before_work(argv, word, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.parse_args(argv)
    assert e.value.code == 2
    assert word in capsys.readouterr().err


def test_config_file_then_cli_overrides(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("batch-size: 7\nsteps: 11\nwarmup: 2ep\nvariant: cl-crossemb-mae\nmask_ratio: 0.6\n")
    cfg = pretrain.parse_args(["--config", str(path), "--batch-size", "3"])
    assert (cfg.train.batch_size, cfg.train.steps, cfg.train.warmup) == (3, 11, "2ep")
    assert (cfg.model.variant, cfg.model.mask_ratio) == ("cl-crossemb-mae", 0.6)
    assert pretrain.parse_args(["--config", str(path), "--epochs", "2"]).train.steps is None  # CLI epochs win
    (tmp_path / "bad.json").write_text(json.dumps({"batch_sise": 3}))
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--config", str(tmp_path / "bad.json")])
    assert "batch_sise" in capsys.readouterr().err


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in options.leaves(RunConfig):
        assert "--" + name.replace("_", "-") in text
    for old in ("--loader", "--workers", "--steps", "--epochs", "--blr", "--lr", "--warmup", "--ops",
                "--no-cuda-graph", "--compile", "--precision", "--init", "--save-every", "--keep", "--time-limit",
                "--resume", "--out", "--data", "--eval-data", "--preset", "--variant", "--seed", "--log-every",
                "--video", "--threads", "--device", "--no-export-encoders", "--mask-ratio", "--audio-mean"):
        assert old + " " in text or old + "\n" in text, old


def test_warmup_forms_and_schedule():
    assert lr_schedule.warmup_steps(TrainConfig(warmup="7"), 100, 10) == 7
    assert lr_schedule.warmup_steps(TrainConfig(warmup="1.5ep"), 100, 10) == 15
    assert lr_schedule.warmup_steps(TrainConfig(warmup="10%"), 200, 10) == 20
    assert lr_schedule.base_lr(run_config().train, 512) == pytest.approx(2.4e-3 * 2)  # the tiny preset's blr
    assert lr_schedule.base_lr(run_config(preset="base").train, 512) == pytest.approx(1.5e-4 * 2)
    assert lr_schedule.base_lr(run_config(preset="tiny", blr=1e-4).train, 512) == pytest.approx(1e-4 * 2)
    assert lr_schedule.base_lr(TrainConfig(blr=1e-4, lr=0.5), 512) == 0.5
    sched = lr_schedule.schedule_for(TrainConfig(steps=None, epochs=2.5, warmup="1ep", blr=1e-3), 8, 512)
    assert (sched.total, sched.warmup, sched.base_lr) == (20, 8, pytest.approx(2e-3))
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(111)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_param_groups_follow_mae():
    model = CrossMAE(model_config("tiny", ops="reference"))
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"audio_encoder.cls_token", "image_decoder.mask_token", "audio_to_image.queries"} <= nd
    assert "image_encoder.blocks.0.norm1.weight" in nd and "image_encoder.blocks.0.attn.qkv.bias" in nd
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


def test_train_step_reads_mean_of_steps():
    torch.manual_seed(0)
    model = CrossMAE(model_config("tiny", variant="cl-self-mae", ops="reference"))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = TrainStep(model, opt, model.cfg.terms, torch.device("cpu"))
    a, v = torch.randn(2, 256, 64), torch.randn(2, 3, 64, 64)
    na, nv = torch.rand(2, 64), torch.rand(2, 64)
    expect = model(a, v, na, nv)
    step(a, v, na, nv)
    step(a, v, na, nv)
    got = step.read()
    assert set(got) == {"loss", "contrastive", "self_recon"}
    for k, value in got.items():
        assert value == pytest.approx(float(expect[k].detach()), rel=1e-5)
    assert step.count == 0 and float(step.sums.abs().sum()) == 0


# --- runs, checkpoints, resume --------------------------------------------------------------------

def stop_after(monkeypatch, calls: int, sig=signal.SIGTERM):
    """Make the process signal itself during its `calls`-th train step (a kill between steps)."""
    original = TrainStep.__call__
    seen = {"n": 0}

    def call(self, *args, **kw):
        original(self, *args, **kw)
        seen["n"] += 1
        if seen["n"] == calls:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(TrainStep, "__call__", call)


def test_resume_is_exact(synth, tmp_path, monkeypatch):
    """2N steps straight == N steps, SIGTERM (checkpoint), N resumed steps: losses and weights.
    N = 5 with 4 batches per epoch, so the resume lands mid-epoch."""
    straight = fit(tiny_cfg(synth, tmp_path / "a", steps=10, warmup="3"))
    assert straight["steps"] == 10 and straight["stopped"] is None

    with monkeypatch.context() as m:
        stop_after(m, 5)
        first = fit(tiny_cfg(synth, tmp_path / "b", steps=10, warmup="3"))
    assert first["stopped"] == "SIGTERM" and first["steps"] == 5
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b"))
    assert (state["step"], state["epoch"], state["batch"]) == (5, 1, 1)
    second = fit(tiny_cfg(synth, tmp_path / "b", steps=10, warmup="3", resume="auto"))
    assert second["steps"] == 10

    ref, got = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in got] == list(range(1, 11))
    for r, g in zip(ref, got):
        for k in ("loss", "contrastive", "cross_conditioned", "cross_embedding", "lr"):
            assert g[k] == pytest.approx(r[k], rel=1e-5, abs=1e-7), (r["step"], k)
    wa = ckpt.load_checkpoint(tmp_path / "a" / ckpt.checkpoint_name(10))["model"]
    wb = ckpt.load_checkpoint(tmp_path / "b" / ckpt.checkpoint_name(10))["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_other_config_names_fields(synth, tmp_path):
    fit(tiny_cfg(synth, tmp_path, steps=1))
    given = tiny_cfg(synth, tmp_path, steps=1)  # config.json also holds the fbank statistics the run resolved
    mean, std = normalisation.stats_for(synth["train"], given.data.audio_bins)
    given.data = dataclasses.replace(given.data, audio_mean=mean, audio_std=std)
    assert pretrain.parse_args(["--config", str(tmp_path / "config.json")]) == given
    with pytest.raises(ValueError, match="already holds a run"):  # a fresh start never overwrites a run
        fit(tiny_cfg(synth, tmp_path, steps=1))
    with pytest.raises(ValueError, match="no such checkpoint"):
        fit(tiny_cfg(synth, tmp_path, steps=1, resume=str(tmp_path / "nope.pt")))
    with pytest.raises(ValueError, match=r"(?s)blr.*model\.mask_ratio|model\.mask_ratio.*blr") as e:
        cfg = tiny_cfg(synth, tmp_path, steps=1, resume="auto", blr=3e-4)
        state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
        state["config"]["model"]["mask_ratio"] = 0.5
        torch.save(state, tmp_path / ckpt.checkpoint_name(1))
        fit(cfg)
    assert "batch_size" not in str(e.value)
    assert pretrain.main(["--data", str(synth["train"]), "--out", str(tmp_path), "--resume", "auto",
                          "--ops", "reference", "--loader", "torch", "--workers", "0", "--device", "cpu"]) == 2


def test_nan_stops_and_keeps_last_good_checkpoint(synth, tmp_path, monkeypatch):
    calls = {"n": 0}

    class Exploding(CrossMAE):
        def forward(self, *args, **kw):
            out = super().forward(*args, **kw)
            calls["n"] += 1
            if calls["n"] >= 3:
                out["loss"] = out["loss"] * float("nan")
                out["cross_embedding"] = out["cross_embedding"] * float("nan")
            return out

    monkeypatch.setattr(trainer, "CrossMAE", Exploding)
    cfg = tiny_cfg(synth, tmp_path, steps=8, log_every=4, save_every=2)
    with pytest.raises(NonFiniteLoss, match=r"steps 3-4.*cross_embedding=nan.*checkpoint-00000002"):
        fit(cfg)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.checkpoint_name(2)]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [r["step"] for r in metrics(tmp_path)] == [2]  # read before the save; nothing after the NaN


def test_sigint_saves_keeps_k_and_exports(synth, tmp_path, monkeypatch):
    handler = signal.getsignal(signal.SIGINT)
    stop_after(monkeypatch, 3, signal.SIGINT)
    cfg = tiny_cfg(synth, tmp_path, steps=6, save_every=1, keep=2, export_encoders=True)
    summary = fit(cfg)
    assert summary["stopped"] == "SIGINT" and summary["steps"] == 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.checkpoint_name(2), ckpt.checkpoint_name(3)]
    assert (tmp_path / "latest").read_text().strip() == ckpt.checkpoint_name(3)
    assert not list(tmp_path.glob(".*tmp*"))
    assert signal.getsignal(signal.SIGINT) is handler

    monkeypatch.undo()
    summary = fit(tiny_cfg(synth, tmp_path, steps=6, keep=2, export_encoders=True, resume="auto"))
    assert summary["steps"] == 6
    import timm

    mcfg = model_config("tiny")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=mcfg.image_size, patch_size=mcfg.image_patch, embed_dim=mcfg.embed_dim, depth=mcfg.depth,
        num_heads=mcfg.num_heads, num_classes=0, global_pool="token")
    vit.load_state_dict(torch.load(tmp_path / "encoder_image.pth", weights_only=True))
    model = ckpt.model_from_checkpoint(ckpt.latest_checkpoint(tmp_path))
    torch.testing.assert_close(vit.blocks[1].mlp.fc1.weight, model.image_encoder.blocks[1].mlp.fc1.weight)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "x.pt"
    atomic_write(path, lambda f: f.write(b"good"))

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_final_evaluation_uses_the_runs_data_settings(synth, tmp_path, monkeypatch):
    """The CLI's validator evaluates with the run's data settings, batch, seed and OUT/eval; the Trainer
    calls it once after a complete run and logs its result."""
    from crossmae_fast.eval import evaluator, report

    seen = {}

    def fake_evaluate(model, manifest, cfg, data):
        seen.update(manifest=manifest, cfg=cfg, data=data, training=model.training)
        return {"retrieval": {"a2v": {"R@1": 0.5}}}

    monkeypatch.setattr(evaluator, "evaluate", fake_evaluate)
    monkeypatch.setattr(report, "format_tables", lambda result: "tables")
    cfg = tiny_cfg(synth, tmp_path, steps=2, audio_mean=-4.0, eval_data=str(synth["eval"]), eval_pictures=1)
    summary = Trainer(cfg, pretrain.make_validator(cfg)).fit()
    assert summary["eval"] == {"retrieval": {"a2v": {"R@1": 0.5}}}
    assert seen["data"].audio_mean == -4.0 and seen["data"].image_size == 64 and seen["cfg"].pictures == 1
    assert seen["manifest"] == str(synth["eval"]) and seen["cfg"].out == str(tmp_path / "eval")
    assert (seen["cfg"].batch_size, seen["cfg"].seed, seen["training"]) == (4, 0, False)
    assert metrics(tmp_path)[-1] == {"step": 2, "eval": summary["eval"]}
    assert "eval" not in fit(tiny_cfg(synth, tmp_path / "b", steps=1, eval_data=str(synth["eval"])))  # no validator
