"""The learning-rate schedule, per iteration (as MAE's `util/lr_sched.py`): a linear warm-up from 0, then a
half-cycle cosine to `min_lr`. Every training loop takes its rates from here; `schedule_for` reads a
`TrainConfig`'s length, warm-up and rate (the base rate scaled by the global batch: lr = blr * batch / 256)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from crossmae_fast.config import TrainConfig


def lr_at(step: int, base_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The rate of iteration `step` (0-based) of a `total`-step run with `warmup` warm-up steps."""
    if step < warmup:
        return base_lr * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The run's length in steps: `steps`, else `epochs` of `steps_per_epoch` (at least one)."""
    return cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))


def warmup_steps(cfg: TrainConfig, total: int, steps_per_epoch: int) -> int:
    """`warmup` in steps: given as steps ('500'), epochs ('2ep') or a share of the run ('5%'); at most `total`."""
    w = str(cfg.warmup)
    if w.endswith("%"):
        n = float(w[:-1]) / 100 * total
    elif w.endswith("ep"):
        n = float(w[:-2]) * steps_per_epoch
    else:
        n = int(w)
    return min(total, round(n))


def base_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The peak rate: `lr` when given, else `blr * global_batch / 256` (MAE's scaling rule)."""
    return cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up over `warmup` steps, then a half-cycle cosine to `min_lr` at step `total`."""

    base_lr: float
    min_lr: float
    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.min_lr, self.warmup, self.total)


def schedule_for(cfg: TrainConfig, steps_per_epoch: int, global_batch: int) -> Schedule:
    """The schedule of a run configured by `cfg` with `steps_per_epoch` batches of `global_batch` clips."""
    total = total_steps(cfg, steps_per_epoch)
    return Schedule(base_lr(cfg, global_batch), cfg.min_lr, warmup_steps(cfg, total, steps_per_epoch), total)
