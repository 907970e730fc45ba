"""Classification metrics as CAV-MAE reports them: per-class average precision (mAP), ROC AUC (mAUC),
d-prime and top-1 accuracy, for multi-label (AudioSet) and single-label (VGGSound) data.

Computed with numpy (the GPU image has no scikit-learn or scipy); the tests check them against
scikit-learn's `average_precision_score` / `roc_auc_score` and scipy's normal quantile. A class
without positives (or without negatives) has no AP (or AUC): it is reported in
`classes_without_positives` (`..._negatives`), its value is NaN, and the means skip it instead of
crashing as `calculate_stats` would.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def one_hot_targets(targets, num_classes: int) -> np.ndarray:
    """[N, C] 0/1 targets from class indices [N] or from [N, C] (multi-hot or soft) targets."""
    t = _as_numpy(targets)
    if t.ndim == 1:
        out = np.zeros((len(t), num_classes))
        out[np.arange(len(t)), t.astype(np.int64)] = 1.0
        return out
    return t


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the step precision-recall curve (scikit-learn's definition; tied scores form one
    threshold). NaN when there is no positive."""
    n_pos = positive.sum()
    if n_pos == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of tied scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    s = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half); NaN without both classes."""
    n_pos = positive.sum()
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def d_prime(auc: float) -> float:
    """sqrt(2) * Phi^-1(AUC): the separation of two unit normals that gives this AUC."""
    if not 0.0 < auc < 1.0:
        return math.inf if auc == 1.0 else -math.inf if auc == 0.0 else math.nan
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def classification_stats(logits, targets) -> dict:
    """Scores of `logits` [N, C] (or probabilities: every metric is rank-based) against `targets`
    (class indices [N], or [N, C] multi-hot / soft targets, positives where > 0.5).

    Returns `mAP`, `mAUC`, `d_prime` (of mAUC), `acc` (argmax of the target vs argmax of the
    output, CAV-MAE's accuracy), `per_class_ap` and `per_class_auc` (NaN where undefined), and the
    classes without positives / negatives."""
    scores = _as_numpy(logits)
    if scores.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {scores.shape}")
    t = one_hot_targets(targets, scores.shape[1])
    if t.shape != scores.shape:
        raise ValueError(f"targets {t.shape} do not match logits {scores.shape}")
    if len(scores) == 0:
        raise ValueError("no samples to score")
    positive = t > 0.5
    ap = [average_precision(scores[:, k], positive[:, k]) for k in range(scores.shape[1])]
    auc = [roc_auc(scores[:, k], positive[:, k]) for k in range(scores.shape[1])]
    m_ap = float(np.nanmean(ap)) if not np.all(np.isnan(ap)) else math.nan
    m_auc = float(np.nanmean(auc)) if not np.all(np.isnan(auc)) else math.nan
    acc = float(np.mean(np.argmax(t, axis=1) == np.argmax(scores, axis=1)))
    n_pos = positive.sum(axis=0)
    return {
        "mAP": m_ap, "mAUC": m_auc, "d_prime": d_prime(m_auc), "acc": acc,
        "per_class_ap": ap, "per_class_auc": auc,
        "classes_without_positives": [int(k) for k in np.flatnonzero(n_pos == 0)],
        "classes_without_negatives": [int(k) for k in np.flatnonzero(n_pos == len(t))],
        "samples": int(len(t)),
    }
