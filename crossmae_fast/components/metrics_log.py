"""The run's metrics log, `metrics.jsonl` (one JSON record a line: training progress, evaluation results),
and the progress line. A loop's step accumulates its loss terms on the device; every `--log-every`
steps `MetricsLog.flush` reads them (one host sync), stops the run on NaN/Inf, appends a record and
logs a progress line (loss terms, lr, samples/s, steps/s, ETA). With `tensorboard=True` every number
of every record also goes to TensorBoard event files in the same folder (as MAE and torchtitan do).
Only the main process writes. A resumed run first drops the records its checkpoint does not cover
(`trim_metrics`)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from crossmae_fast.components.checkpoint import latest_checkpoint
from crossmae_fast.files import atomic_write, writing

log = logging.getLogger("crossmae_fast.train")


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or Inf; the run stops without saving."""


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def trim_metrics(path: Path, step: int) -> None:
    """Drop records past `step` (left by a run that died after its last checkpoint) before resuming."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if _record_step(ln) <= step]
    if len(keep) != len(lines):
        atomic_write(path, "".join(ln + "\n" for ln in keep))


def _record_step(line: str) -> float:
    """A metrics line's step; infinity for a torn or foreign line (a crash mid-write), so it is dropped."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class LossSums(Protocol):
    """What `MetricsLog.flush` reads of a loop's step: steps accumulated since the last read, and the
    mean of each loss term over them (`read` also resets the sums)."""

    count: int

    def read(self) -> dict[str, float]: ...


def tensorboard_writer(folder: Path):
    """A TensorBoard `SummaryWriter` writing event files into `folder`; ValueError when the optional
    `tensorboard` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or crossmae-fast[tensorboard])") from None
    return SummaryWriter(log_dir=str(folder))


def scalars(record: Mapping, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record under '/'-joined names: `{"eval": {"retrieval": {"a2v": {"r1": x}}}}`
    -> `{"eval/retrieval/a2v/r1": x}`; the step and non-numbers are left out."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            out[name] = float(value)
    return out


class MetricsLog:
    """Flushes a loop's accumulated losses into records, and appends any record (an evaluation's);
    only the main process writes.

    `step` is the run's step count when the log starts (a resume), `seconds` the training time the
    run had spent before; the records' `time_s` carries on from it."""

    def __init__(self, out: Path, *, total: int, per_epoch: int, global_batch: int, is_main: bool,
                 step: int = 0, seconds: float = 0.0, tensorboard: bool = False):
        self.path, self.out = Path(out) / "metrics.jsonl", Path(out)
        self.total, self.per_epoch, self.global_batch, self.is_main = total, per_epoch, global_batch, is_main
        self.logged_step, self.logged_at = step, time.perf_counter()
        self.started, self.seconds_before = self.logged_at, seconds
        self.tensorboard = None
        if is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            trim_metrics(self.path, step)
            if tensorboard:
                self.tensorboard = tensorboard_writer(self.out / "tensorboard")

    def flush(self, losses: LossSums, step: int, lr: float, counts: Mapping[str, int] | None = None) -> dict | None:
        """Read the losses accumulated since the last flush; the record written, or None if no step ran.
        `counts` (e.g. `{"skipped": 2}`: clips replaced since the last record) go into the record, and
        into the progress line when not zero."""
        if losses.count == 0:
            return None
        values = losses.read()
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLoss(
                f"non-finite loss at steps {self.logged_step + 1}-{step}: "
                + ", ".join(f"{k}={v}" for k, v in bad.items())
                + f". Stopped without saving; last good checkpoint: {latest_checkpoint(self.out) or 'none'}. "
                  "Lower --lr/--blr, lengthen --warmup or use --precision fp32, then --resume auto.")
        now = time.perf_counter()
        rate = (step - self.logged_step) / max(now - self.logged_at, 1e-9)
        record = {"step": step, "epoch": round(step / self.per_epoch, 3), "lr": lr,
                  **{k: round(v, 6) for k, v in values.items()},
                  "samples_per_s": round(rate * self.global_batch, 2), "steps_per_s": round(rate, 4),
                  "time_s": round(now - self.started + self.seconds_before, 2), **(counts or {})}
        if self.is_main:
            self.append(record)
            terms = " ".join(f"{k} {v:.4f}" for k, v in values.items())
            terms += "".join(f" | {k} {v}" for k, v in (counts or {}).items() if v)
            log.info("step %d/%d ep %.2f | %s | lr %.3g | %.1f samples/s %.2f steps/s | ETA %s", step,
                     self.total, step / self.per_epoch, terms, lr, record["samples_per_s"], rate,
                     format_eta((self.total - step) / rate))
        self.logged_step, self.logged_at = step, now
        return record

    def elapsed(self) -> float:
        """Seconds since this log started (this process's share of the run)."""
        return time.perf_counter() - self.started

    def append(self, record: dict) -> None:
        """Append `record` (it has a `step`) to metrics.jsonl, and its numbers to TensorBoard when asked."""
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        if self.tensorboard is not None:
            for name, value in scalars(record).items():
                self.tensorboard.add_scalar(name, value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
