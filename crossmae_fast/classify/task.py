"""The classification task of a fine-tuning run: manifests, classes and targets, checked before
anything is written (a bad label is one clear error naming the row and the label)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crossmae_fast.config import FinetuneConfig
from crossmae_fast.data import labels as L
from crossmae_fast.data.manifest import read_manifest, write_manifest
from crossmae_fast.data.normalisation import STATS_KEY, read_stats

log = logging.getLogger("crossmae_fast.finetune")


@dataclass
class Task:
    """Train / eval manifests with their [N, C] targets, the classes and the loss they call for."""

    train: Path
    eval: Path | None
    labels: L.LabelSet
    train_targets: torch.Tensor
    eval_targets: torch.Tensor | None
    eval_ids: list[str]
    multi_label: bool
    weights: np.ndarray | None

    @property
    def loss(self) -> str:
        return "bce" if self.multi_label else "ce"


def build_task(cfg: FinetuneConfig, train: str | Path, eval_: str | Path | None) -> Task:
    """Read and check the labels of both manifests (LabelError / ManifestError otherwise)."""
    c = cfg.classify
    train_rows = read_manifest(train)
    labels = L.read_label_csv(c.label_csv) if c.label_csv else L.labels_from_rows(train_rows, str(train))
    train_t = L.targets(train_rows, labels, str(train))
    eval_rows = read_manifest(eval_) if eval_ else None
    eval_t = L.targets(eval_rows, labels, str(eval_)) if eval_rows is not None else None
    multi = L.is_multi_label(train_t) if c.loss == "auto" else c.loss == "bce"
    weights = None
    if c.balanced == "auto":
        weights = L.balanced_weights(train_t)
    elif c.balanced:
        weights = L.read_weights(c.balanced, len(train_rows))
    return Task(Path(train), Path(eval_) if eval_ else None, labels, train_t, eval_t,
                [r["video_id"] for r in eval_rows or []], multi, weights)


def few_label_subset(task: Task, per_class: int, seed: int, out: Path, balanced_auto: bool) -> Task:
    """The task trained on `per_class` clips per class: the subset manifest is written to `out`."""
    rows = read_manifest(task.train)
    keep = L.per_class_subset(task.train_targets, per_class, seed)
    stats = read_stats(task.train)
    path = write_manifest(out / "train_subset.json", [rows[i] for i in keep],
                          **({STATS_KEY: stats} if stats else {}))
    log.info("train: %d of %d clips (%d per class, seed %d) -> %s", len(keep), len(rows), per_class, seed, path)
    targets = task.train_targets[torch.as_tensor(keep)]
    weights = None if task.weights is None else L.balanced_weights(targets) if balanced_auto else task.weights[keep]
    return Task(path, task.eval, task.labels, targets, task.eval_targets, task.eval_ids, task.multi_label, weights)
