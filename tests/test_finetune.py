"""Fine-tuning CLI and run (CPU, tiny preset): outputs, exact resume, bad input, DDP scoring."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossmae_fast import finetune
from crossmae_fast.classify.step import ClassifyStep
from crossmae_fast.components import checkpoint as ckpt
from crossmae_fast.config import model_config
from crossmae_fast.model.crossmae import CrossMAE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pre-training checkpoint of the tiny preset (random weights: the format is what matters)."""
    folder = tmp_path_factory.mktemp("pretrain")
    cfg = model_config("tiny")
    torch.manual_seed(5)
    state = {"model": CrossMAE(cfg).state_dict(), "optimizer": {}, "step": 1, "epoch": 0, "batch": 1, "rng": [],
             "metrics": {}, "world_size": 1, "config": {"model": cfg.to_dict()}}
    ckpt.save_checkpoint(folder, state, keep=1)
    return folder


def args(data, out, *extra) -> list[str]:
    return ["--data", str(data["train"]), "--eval-data", str(data["eval"]), "--label-csv",
            str(Path(data["train"]).parent / "class_labels_indices.csv"), "--out", str(out), "--batch-size", "4",
            "--loader", "torch", "--workers", "0", "--threads", "1", "--device", "cpu", "--log-every", "1",
            *extra]


def records(out) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_scores_predictions_and_averages(tiny_set, pretrained, tmp_path):
    out = tmp_path / "ft"
    code = finetune.main(args(tiny_set, out, "--init", str(pretrained), "--epochs", "2", "--mixup", "0.5",
                              "--label-smoothing", "0.1", "--average-last", "2", "--eval-frames", "3",
                              "--eval-missing", "--layer-decay", "0.75", "--drop-path", "0.1",
                              "--balanced", "auto"))
    assert code == 0
    recs = records(out)
    evals = [r for r in recs if "eval" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0]  # 18 train clips, batch 4: 4 steps per epoch
    assert all(0 <= r["eval"]["acc"] <= 1 for r in evals)
    body = json.loads((out / "eval" / "metrics.json").read_text())
    assert body["averaged_epochs"] == 2 and body["eval_frames"] == 3 and body["loss"] == "ce"
    assert set(body) >= {"final", "missing_audio", "missing_visual"} and body["final"]["samples"] == 6
    assert len(list(out.glob("weights-epoch-*.pt"))) == 2
    per_class = (out / "eval" / "per_class.csv").read_text().splitlines()
    assert len(per_class) == 17 and per_class[0] == "index,mid,display_name,ap,auc"
    pred = torch.load(out / "eval" / "predictions.pt", weights_only=True)
    assert len(pred["video_id"]) == 6 and pred["scores"].shape == pred["targets"].shape == (6, 16)
    assert torch.allclose(pred["scores"].sum(1), torch.ones(6), atol=1e-5)  # averaged softmax over frames


def stop_after(monkeypatch, calls: int):
    original = ClassifyStep.__call__
    seen = {"n": 0}

    def call(self, *a, **kw):
        original(self, *a, **kw)
        seen["n"] += 1
        if seen["n"] == calls:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ClassifyStep, "__call__", call)


def test_resume_after_sigterm_is_exact(tiny_set, pretrained, tmp_path, monkeypatch, capsys):
    common = ("--init", str(pretrained), "--steps", "8", "--warmup", "2", "--mixup", "0.5", "--freqm", "8",
              "--timem", "30", "--drop-path", "0.2")
    assert finetune.main(args(tiny_set, tmp_path / "a", *common)) == 0
    with monkeypatch.context() as m:
        stop_after(m, 6)  # mid-epoch (4 steps per epoch)
        assert finetune.main(args(tiny_set, tmp_path / "b", *common)) == 128 + signal.SIGTERM
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "continue with: python -m crossmae_fast.finetune" in last and last.endswith("--resume auto"), last
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b"))
    assert (state["step"], state["epoch"], state["batch"]) == (6, 1, 2)
    assert finetune.main(args(tiny_set, tmp_path / "b", *common, "--resume", "auto")) == 0
    ref = [r for r in records(tmp_path / "a") if "loss" in r]
    got = [r for r in records(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, 9))
    for r, g in zip(ref, got):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), r["step"]
    wa = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "a"))["model"]
    wb = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b"))["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    ev_a = json.loads((tmp_path / "a" / "eval" / "metrics.json").read_text())["final"]
    ev_b = json.loads((tmp_path / "b" / "eval" / "metrics.json").read_text())["final"]
    assert ev_a["acc"] == ev_b["acc"] and ev_a["mAP"] == pytest.approx(ev_b["mAP"])
    # evaluation only: the same scores from the checkpoint
    assert finetune.main(args(tiny_set, tmp_path / "b", "--eval-only")) == 0  # the run's own config
    ev_c = json.loads((tmp_path / "b" / "eval" / "metrics.json").read_text())["final"]
    assert ev_c["mAP"] == pytest.approx(ev_b["mAP"])


def test_linear_probe_trains_only_the_head(tiny_set, pretrained, tmp_path):
    out = tmp_path / "lp"
    assert finetune.main(args(tiny_set, out, "--init", str(pretrained), "--linear-probe", "--mode", "visual",
                              "--steps", "3", "--pool", "mean")) == 0
    before = CrossMAE(model_config("tiny"))
    before.load_state_dict(ckpt.load_checkpoint(ckpt.latest_checkpoint(pretrained))["model"])
    after = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))["model"]
    for k, v in before.image_encoder.state_dict().items():
        assert torch.equal(after[f"image_encoder.{k}"], v), k
    assert not any(k.startswith("audio_encoder") for k in after)


def bad_run(capsys, argv) -> str:
    assert finetune.main(argv) == 2
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in lines[0]
    return lines[0]


def test_label_missing_from_csv_names_row_and_label(tiny_set, tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    rows = (Path(tiny_set["train"]).parent / "class_labels_indices.csv").read_text().splitlines()
    manifest = json.loads(Path(tiny_set["train"]).read_text())
    gone = manifest["data"][2]["labels"]
    kept = [r for r in rows[1:] if r.split(",")[1] != gone]
    csv.write_text("index,mid,display_name\n" + "".join(f"{i},{r.split(',', 1)[1]}\n" for i, r in enumerate(kept)))
    out = tmp_path / "never"
    argv = args(tiny_set, out, "--init", "none", "--steps", "1")
    argv[argv.index("--label-csv") + 1] = str(csv)
    line = bad_run(capsys, argv)
    first = next(i for i, r in enumerate(manifest["data"]) if r["labels"] == gone)
    assert f"row {first}" in line and repr(gone) in line
    assert not out.exists()


def test_manifest_without_labels_and_bad_init(tiny_set, tmp_path, capsys):
    manifest = json.loads(Path(tiny_set["train"]).read_text())
    manifest["data"][1]["labels"] = ""
    bare = Path(tiny_set["train"]).parent / "no_labels.json"
    bare.write_text(json.dumps(manifest))
    argv = args(tiny_set, tmp_path / "x", "--init", "none", "--steps", "1")
    argv[argv.index("--data") + 1] = str(bare)
    assert "row 1" in bad_run(capsys, argv)
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    assert "not a checkpoint" in bad_run(capsys, args(tiny_set, tmp_path / "y", "--init", str(junk), "--steps", "1"))
    assert not (tmp_path / "x").exists()


def test_help_lists_every_field(capsys):
    import dataclasses

    from crossmae_fast.config import FinetuneConfig

    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    text = capsys.readouterr().out
    for section in dataclasses.fields(FinetuneConfig):
        for f in dataclasses.fields(section.default_factory()):
            if not f.metadata.get("follows") and f.name not in finetune.SKIP:
                assert "--" + f.name.replace("_", "-") in text, f.name


def test_init_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(["--mode", "av"])
    assert e.value.code == 2 and "--init is required" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_scores_the_whole_eval_set(tiny_set, pretrained, tmp_path):
    """Two ranks: the eval set (6 clips) is scored once in full, not per rank; weights stay in sync."""
    from test_ddp import free_port

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "crossmae_fast.finetune", *args(tiny_set, out, "--init", str(pretrained), "--steps", "3",
                                                 "--batch-size", "2", "--eval-frames", "2")]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    body = json.loads((out / "eval" / "metrics.json").read_text())
    assert body["final"]["samples"] == 6
    pred = torch.load(out / "eval" / "predictions.pt", weights_only=True)
    assert len(set(pred["video_id"])) == 6
    assert torch.load(ckpt.latest_checkpoint(out), weights_only=True)["world_size"] == 2
