"""Scoring a classifier on an evaluation manifest: logits of every clip (gathered over all ranks,
repeated rows dropped) and the scores of the whole set (the metric is passed in: the command line hands
over `crossmae_fast.eval.classification_stats`), optionally averaging the
probabilities over several frames per clip (CAV-MAE's frame aggregation) or with a modality missing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from crossmae_fast.components import distributed
from crossmae_fast.config import DataConfig
from crossmae_fast.files import atomic_write


def frame_choice(n: int, num_frames: int, eval_frame: int) -> list[int]:
    """Frames scored per clip: the eval frame alone, else `n` evenly spaced ones."""
    if n <= 1:
        return [eval_frame]
    return sorted({int(i * num_frames / n) for i in range(min(n, num_frames))})


@torch.no_grad()
def predict(model, manifest: Path, data: DataConfig, where: distributed.DistInfo, *, batch_size: int,
            frames: int = 1, missing: str | None = None, multi_label: bool = True,
            precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices [N], scores [N, C]) on every rank (`where`: this process's rank, world size and
    device): the mean over frames of the probabilities (sigmoid for multi-label, softmax otherwise);
    with one frame, the logits themselves."""
    device = where.device
    from crossmae_fast.data import make_loader

    was_training = model.training
    model.eval()
    picks = frame_choice(frames, data.num_frames, data.eval_frame)
    total = None
    for frame in picks:
        cfg = dataclasses.replace(data, eval_frame=frame)
        loader = make_loader(manifest, batch_size=batch_size, train=False, data_config=cfg, device=device,
                             rank=where.rank, world_size=where.world_size)
        rows, outs = [], []
        for batch in loader:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(batch["audio"], batch["image"], missing=missing).float()
            if len(picks) > 1:
                logits = logits.sigmoid() if multi_label else logits.softmax(-1)
            rows.append(batch["index"].cpu())
            outs.append(logits.cpu())
        rows_t, out_t = torch.cat(rows), torch.cat(outs)
        total = out_t if total is None else total + out_t
    model.train(was_training)
    parts = distributed.all_gather_object((rows_t, total / len(picks)))
    index = torch.cat([p[0] for p in parts])
    scores = torch.cat([p[1] for p in parts])
    keep = _first_occurrence(index)  # DDP pads the last shard with rows of the first
    order = index[keep].argsort()
    return index[keep][order], scores[keep][order]


def _first_occurrence(index: torch.Tensor) -> torch.Tensor:
    seen, keep = set(), []
    for i, r in enumerate(index.tolist()):
        if r not in seen:
            seen.add(r)
            keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)


Scorer = Callable[[torch.Tensor, torch.Tensor], dict]
"""`scorer(scores [N, C], targets [N, C]) -> {"mAP", "mAUC", "d_prime", "acc", "per_class_ap", ...}`."""


def score(index: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor, scorer: Scorer) -> dict:
    """`scorer` of the scored rows against their targets."""
    return scorer(scores, targets[index])


def save_predictions(folder: Path, ids: list[str], index: torch.Tensor, scores: torch.Tensor,
                     targets: torch.Tensor) -> Path:
    """`predictions.pt`: clip ids, scores (logits or averaged probabilities) and targets, weights_only-safe."""
    state = {"video_id": [ids[i] for i in index.tolist()], "scores": scores, "targets": targets[index]}
    path = Path(folder) / "predictions.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    return path
