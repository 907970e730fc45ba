"""Nothing lost, nothing mixed: one process per run folder, unwritable outputs, full disks, stops by
signal, skipped clips, `--resume auto` past an unreadable checkpoint (CPU, tiny preset)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossmae_fast import learning_check, pretrain, shard, synth
from crossmae_fast import prepare as prepare_cli
from crossmae_fast.components import checkpoint as ckpt
from crossmae_fast.components import stopping
from crossmae_fast.components.run_lock import RunFolderBusy, RunLock
from crossmae_fast.data.manifest import read_manifest, write_manifest
from crossmae_fast.files import WriteError, atomic_write, error_line, writing
from crossmae_fast.train.step import TrainStep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def argv(data, out, *more: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--batch-size", "4", "--ops", "reference", "--loader", "torch",
            "--workers", "0", "--log-every", "1", "--save-every", "0", "--no-export-encoders", "--eval-pictures", "0",
            "--threads", "1", "--device", "cpu", *more]


def error_lines(capsys) -> list[str]:
    """The lines that say `error:` (pretrain logs them on stdout, the other tools print them on stderr)."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return [ln for ln in (captured.out + captured.err).splitlines() if "error:" in ln]


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s run lock until it is killed."""
    code = ("import sys, time; from crossmae_fast.components.run_lock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


# --- one process per run folder -------------------------------------------------------------------

def test_lock_names_the_holder_and_is_released_by_kill_9(tmp_path):
    proc = holder(tmp_path / "run")
    try:
        with pytest.raises(RunFolderBusy, match=f"process {proc.pid}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(tmp_path / "run") as lock:  # the kernel dropped the dead holder's lock
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RunFolderBusy):  # not re-entrant, even in one process
            RunLock(tmp_path / "run").acquire()
    assert lock._fd is None


def test_only_the_main_rank_takes_the_lock(tmp_path):
    from crossmae_fast.components.run_lock import hold_run_folder

    with hold_run_folder(tmp_path / "run", is_main=True):
        with hold_run_folder(tmp_path / "run", is_main=False):  # another rank of the same run: trusts rank 0
            pass
        with pytest.raises(RunFolderBusy):
            with hold_run_folder(tmp_path / "run", is_main=True):
                pass
    with hold_run_folder(tmp_path / "run", is_main=True):  # released at the end of the block
        pass


def test_second_run_on_a_held_folder_writes_nothing(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    proc = holder(out)
    try:
        for extra in ((), ("--resume", "auto")):
            assert pretrain.main(argv(tiny_set["train"], out, "--steps", "1", *extra)) == 2
            lines = error_lines(capsys)
            assert len(lines) == 1 and f"process {proc.pid}" in lines[0], lines
            assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_evaluate_out_is_held_too(tiny_set, tmp_path, capsys):
    from crossmae_fast import evaluate

    assert pretrain.main(argv(tiny_set["train"], tmp_path / "run", "--steps", "1")) == 0
    proc = holder(tmp_path / "ev")
    try:
        assert evaluate.main(["--checkpoint", str(tmp_path / "run"), "--data", str(tiny_set["eval"]), "--out",
                              str(tmp_path / "ev"), "--loader", "torch", "--workers", "0", "--device", "cpu"]) == 2
        lines = error_lines(capsys)
        assert len(lines) == 1 and f"process {proc.pid}" in lines[0], lines
        assert [p.name for p in (tmp_path / "ev").iterdir()] == [".lock"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# --- outputs that cannot be written ---------------------------------------------------------------

def test_writing_names_the_target_and_errno(tmp_path):
    with pytest.raises(WriteError) as e, writing(tmp_path / "x.pt"):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".x.pt.tmp-1"))
    assert str(e.value) == f"cannot write {tmp_path / 'x.pt'}: [Errno 30] Read-only file system"
    assert error_line(PermissionError(errno.EACCES, "Permission denied", "a/b")) == \
        "cannot write a/b: [Errno 13] Permission denied"


def full_disk_at(monkeypatch, name: str, code: int = errno.ENOSPC) -> None:
    """The atomic write of the file called `name` fails part-way with `code` (a full disk, a read-only
    remount), through the real write's clean-up."""
    real = atomic_write

    def write(path, content, mode=None):
        if Path(path).name != name:
            return real(path, content, mode)

        def partial(f):
            f.write(b"partial")
            raise OSError(code, os.strerror(code))

        return real(path, partial, mode)

    monkeypatch.setattr(ckpt, "atomic_write", write)
    monkeypatch.setattr("crossmae_fast.train.trainer.atomic_write", write)


def test_full_disk_mid_run_keeps_the_last_good_checkpoint(tiny_set, tmp_path, monkeypatch, capsys):
    full_disk_at(monkeypatch, ckpt.checkpoint_name(4))
    out = tmp_path / "run"
    assert pretrain.main(argv(tiny_set["train"], out, "--steps", "4", "--save-every", "2")) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    assert f"cannot write {out / ckpt.checkpoint_name(4)}: [Errno 28] No space left on device" in lines[0]
    assert str(out / ckpt.checkpoint_name(2)) in lines[0]
    assert [p.name for p in ckpt.list_checkpoints(out)] == [ckpt.checkpoint_name(2)]
    assert ckpt.latest_checkpoint(out).name == ckpt.checkpoint_name(2) and not list(out.glob(".*tmp*"))
    ckpt.load_checkpoint(out / ckpt.checkpoint_name(2))


def test_full_disk_in_the_metrics_log_names_the_kept_checkpoint(tiny_set, tmp_path, monkeypatch, capsys):
    from crossmae_fast.components import metrics_log

    class FullDisk:
        """metrics.jsonl opened for appending on a disk that fills at the step-3 record."""

        def __init__(self, path, mode):
            self.f = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            if json.loads(text)["step"] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(text)

    monkeypatch.setattr(metrics_log, "open", FullDisk, raising=False)
    out = tmp_path / "run"
    assert pretrain.main(argv(tiny_set["train"], out, "--steps", "4", "--save-every", "2")) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    assert f"cannot write {out / 'metrics.jsonl'}: [Errno 28]" in lines[0]
    assert f"the last good checkpoint {out / ckpt.checkpoint_name(2)} is kept" in lines[0]


def test_read_only_run_folder_is_one_line(tiny_set, tmp_path, monkeypatch, capsys):
    full_disk_at(monkeypatch, "config.json", errno.EROFS)
    assert pretrain.main(argv(tiny_set["train"], tmp_path / "run", "--steps", "1")) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and f"cannot write {tmp_path / 'run' / 'config.json'}: [Errno 30]" in lines[0], lines


def test_every_tool_names_an_unwritable_out(tiny_set, tmp_path, capsys):
    from crossmae_fast import annotations, evaluate

    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be\n")
    out = blocker / "out"
    (tmp_path / "src").mkdir()
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "11.xml").write_text(
        "<annotation><object><bbox><label>0</label><xmin>0</xmin><ymin>0</ymin><xmax>9</xmax><ymax>9</ymax>"
        "</bbox></object></annotation>")
    calls = {
        "pretrain": lambda: pretrain.main(argv(tiny_set["train"], out, "--steps", "1")),
        "synth": lambda: synth.main(["--out", str(out), "--clips", "2", "--seed", "0", "--seconds", "0.5",
                                     "--image-size", "16"]),
        "prepare": lambda: prepare_cli.main([str(tmp_path / "src"), "--out", str(out), "--quiet"]),
        "learning_check": lambda: learning_check.main(["--out", str(out), "--clips", "8", "--eval-clips", "2"]),
        "shard": lambda: shard.main([str(tiny_set["train"]), "--out", str(out), "--processes", "1", "--quiet"]),
        "annotations": lambda: annotations.main(["flickr", str(tmp_path / "ann"), "--audio-dir", "a",
                                                 "--frame-dir", "f", "--out", str(out / "m.json")]),
    }
    for tool, call in calls.items():
        assert call() == 2, tool
        lines = error_lines(capsys)
        assert len(lines) == 1 and f"cannot write {out}" in lines[0] and "[Errno 20]" in lines[0], (tool, lines)
    assert pretrain.main(argv(tiny_set["train"], tmp_path / "run", "--steps", "1")) == 0
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(tmp_path / "run"), "--data", str(tiny_set["eval"]), "--out", str(out),
                          "--loader", "torch", "--workers", "0", "--device", "cpu"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and f"cannot write {out}" in lines[0] and "[Errno 20]" in lines[0], lines


# --- stops by signal ------------------------------------------------------------------------------

def test_signal_stop_exits_128_plus_n_and_says_how_to_continue(tiny_set, tmp_path, monkeypatch, capsys):
    original, seen = TrainStep.__call__, {"n": 0}

    def call(self, *args, **kw):
        original(self, *args, **kw)
        seen["n"] += 1
        if seen["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(TrainStep, "__call__", call)
    out = tmp_path / "run"
    assert pretrain.main(argv(tiny_set["train"], out, "--steps", "4")) == 128 + signal.SIGTERM
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "continue with: python -m crossmae_fast.pretrain" in last and last.endswith("--resume auto"), last
    assert ckpt.latest_checkpoint(out).name == ckpt.checkpoint_name(2)
    monkeypatch.undo()
    assert pretrain.main(argv(tiny_set["train"], out, "--steps", "4", "--resume", "auto")) == 0
    assert stopping.exit_status("time limit") == stopping.STOPPED_EARLY and stopping.exit_status("SIGINT") == 130


# --- skipped clips --------------------------------------------------------------------------------

def with_bad_audio(manifest: Path, folder: Path, bad: int) -> Path:
    """A copy of `manifest` (absolute paths, same statistics) whose first `bad` rows' audio is garbage."""
    rows = read_manifest(manifest)
    extra = {k: v for k, v in json.loads(Path(manifest).read_text()).items() if k != "data"}
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(bad):
        garbage = folder / f"bad{j}.wav"
        garbage.write_bytes(b"not audio at all")
        rows[j]["wav"] = str(garbage)
    return write_manifest(folder / "manifest.json", rows, **extra)


def test_skips_totalled_per_record_and_capped(tiny_set, tmp_path, capsys):
    data = with_bad_audio(tiny_set["train"], tmp_path / "data", bad=3)  # 3 of 18: every 16-clip epoch meets one
    out = tmp_path / "run"
    assert pretrain.main(argv(data, out, "--steps", "4", "--max-skip-fraction", "1")) == 0
    printed = capsys.readouterr().out
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped"] for r in records if "loss" in r]
    assert len(skipped) == 4 and sum(skipped) >= 1
    assert sum(f"| skipped {n} |" in printed for n in skipped if n) == sum(1 for n in skipped if n)

    assert pretrain.main(argv(data, tmp_path / "capped", "--steps", "4")) == 2  # the default 0.05
    lines = error_lines(capsys)
    assert len(lines) == 1 and "--max-skip-fraction 0.05" in lines[0] and "clips seen" in lines[0], lines


# --- resume auto past an unreadable checkpoint ----------------------------------------------------

def test_resume_auto_falls_back_to_the_newest_loadable(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(argv(tiny_set["train"], out, "--steps", "2", "--save-every", "1", "--keep", "3")) == 0
    newest = out / ckpt.checkpoint_name(2)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    path, error = ckpt.resolve_resume(out, "auto")
    assert (path, error) == (out / ckpt.checkpoint_name(1), None)
    assert pretrain.main(argv(tiny_set["train"], out, "--steps", "3", "--save-every", "1", "--keep", "3",
                              "--resume", "auto")) == 0
    printed = capsys.readouterr().out
    assert f"skipping {newest}" in printed and "left on disk" in printed
    assert "resuming" in printed and ckpt.checkpoint_name(1) in printed
    assert ckpt.load_checkpoint(out / ckpt.checkpoint_name(3))["step"] == 3
    for p in ckpt.list_checkpoints(out):
        p.write_bytes(b"")
    assert "no checkpoint in" in ckpt.resolve_resume(out, "auto")[1]
    assert len(ckpt.list_checkpoints(out)) == 3  # nothing deleted


# --- evaluation input -----------------------------------------------------------------------------

def test_replacement_in_the_same_batch_counts_once(tiny_set, tmp_path):
    from crossmae_fast.config import EvalConfig, model_config
    from crossmae_fast.eval.evaluator import evaluate
    from crossmae_fast.model.crossmae import CrossMAE

    data = with_bad_audio(tiny_set["eval"], tmp_path / "data", bad=1)  # row 0's replacement is row 1, same batch
    model = CrossMAE(model_config("tiny", ops="reference"))
    for batch in (32, 2):
        result = evaluate(model, data, EvalConfig(pictures=0, batch_size=batch, map_size=64))
        assert result["clips"] == result["localization"]["clips"] == 5, batch


def test_evaluate_refuses_empty_manifest_and_bad_counts(tiny_set, tmp_path, capsys):
    from crossmae_fast import evaluate

    assert pretrain.main(argv(tiny_set["train"], tmp_path / "run", "--steps", "1")) == 0
    capsys.readouterr()
    empty = write_manifest(tmp_path / "empty.json", [])
    base = ["--checkpoint", str(tmp_path / "run"), "--loader", "torch", "--workers", "0", "--device", "cpu"]
    assert evaluate.main([*base, "--data", str(empty)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "no rows" in lines[0] and str(empty) in lines[0], lines
    for flag, value in (("--batch-size", "0"), ("--pictures", "-1")):
        with pytest.raises(SystemExit) as e:
            evaluate.main([*base, "--data", str(tiny_set["eval"]), flag, value])
        assert e.value.code == 2
        lines = error_lines(capsys)
        assert len(lines) == 1 and flag in lines[0], lines


def test_probe_features_count_each_row_once():
    from crossmae_fast.config import model_config
    from crossmae_fast.eval.probe import frozen_features
    from crossmae_fast.model.crossmae import CrossMAE

    cfg = model_config("tiny", ops="reference")
    model = CrossMAE(cfg).eval()
    # row 0 was unreadable: its replacement, row 1, is in the same batch
    loader = [{"audio": torch.randn(4, cfg.audio_frames, cfg.audio_bins),
               "image": torch.randn(4, 3, cfg.image_size, cfg.image_size), "index": torch.tensor([0, 1, 1, 2])}]
    with torch.no_grad():
        a, p = frozen_features(model, loader, max_clips=10)
    assert len(a) == len(p) == 3


def test_run_exit_status_maps_each_outcome(capsys):
    """The tools' exit status from a run's end: done, a non-finite loss, bad input, an unwritable output,
    a stop (whose last line says how to continue)."""
    from crossmae_fast.components.metrics_log import NonFiniteLoss

    def raising(e):
        def fit():
            raise e
        return fit

    status = lambda fit: stopping.run_exit_status("tool", "crossmae_fast.tool", ["--out", "x"], fit)  # noqa: E731
    assert status(lambda: {"stopped": None, "steps": 5}) == 0
    assert status(raising(NonFiniteLoss("loss is nan"))) == 1
    assert status(raising(ValueError("bad option"))) == 2
    assert status(raising(WriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/ckpt.pt"))) == 2
    assert status(lambda: {"stopped": "SIGTERM", "steps": 3, "checkpoint": "c.pt"}) == 128 + signal.SIGTERM
    assert status(lambda: {"stopped": "time limit", "steps": 3}) == stopping.STOPPED_EARLY
