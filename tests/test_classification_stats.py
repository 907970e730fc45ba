"""classification_stats against scikit-learn / scipy (CAV-MAE's calculate_stats uses them)."""

import math

import numpy as np
import pytest
import torch

from crossmae_fast.eval import classification_stats

sklearn_metrics = pytest.importorskip("sklearn.metrics")
scipy_stats = pytest.importorskip("scipy.stats")


def reference(scores, targets):
    ap = [sklearn_metrics.average_precision_score(targets[:, k], scores[:, k]) for k in range(scores.shape[1])]
    auc = [sklearn_metrics.roc_auc_score(targets[:, k], scores[:, k]) for k in range(scores.shape[1])]
    m_auc = np.mean(auc)
    return np.mean(ap), m_auc, scipy_stats.norm().ppf(m_auc) * math.sqrt(2), ap


@pytest.mark.parametrize("ties", [False, True])
def test_multilabel_matches_sklearn(ties):
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 7)) < 0.2).astype(float)
    targets[0] = 1  # every class has a positive
    targets[1] = 0
    scores = rng.normal(size=(200, 7)) + 1.5 * targets
    if ties:
        scores = np.round(scores, 1)  # many tied scores
    m_ap, m_auc, dp, ap = reference(scores, targets)
    got = classification_stats(torch.tensor(scores), torch.tensor(targets))
    assert got["mAP"] == pytest.approx(m_ap, abs=1e-6)
    assert got["mAUC"] == pytest.approx(m_auc, abs=1e-6)
    assert got["d_prime"] == pytest.approx(dp, abs=1e-5)
    np.testing.assert_allclose(got["per_class_ap"], ap, atol=1e-6)
    acc = np.mean(np.argmax(targets, 1) == np.argmax(scores, 1))
    assert got["acc"] == pytest.approx(acc)


def test_single_label_indices_equal_one_hot():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 100)
    logits = rng.normal(size=(100, 5))
    logits[np.arange(50), labels[:50]] += 3
    a = classification_stats(logits, labels)
    b = classification_stats(logits, np.eye(5)[labels])
    assert a["acc"] == pytest.approx(b["acc"]) == pytest.approx(np.mean(labels == logits.argmax(1)))
    assert a["mAP"] == pytest.approx(b["mAP"])


def test_class_without_positives_is_reported():
    rng = np.random.default_rng(2)
    targets = np.zeros((50, 4))
    targets[np.arange(50), rng.integers(0, 3, 50)] = 1  # class 3 never occurs
    scores = rng.normal(size=(50, 4))
    got = classification_stats(scores, targets)
    assert got["classes_without_positives"] == [3]
    assert math.isnan(got["per_class_ap"][3]) and math.isnan(got["per_class_auc"][3])
    m_ap, m_auc, _, _ = reference(scores[:, :3], targets[:, :3])
    assert got["mAP"] == pytest.approx(m_ap) and got["mAUC"] == pytest.approx(m_auc)


def test_perfect_and_chance():
    targets = np.eye(4)[np.arange(40) % 4]
    assert classification_stats(targets * 5, targets)["mAP"] == pytest.approx(1.0)
    assert classification_stats(targets * 5, targets)["acc"] == 1.0
    rng = np.random.default_rng(3)
    chance = classification_stats(rng.normal(size=(4000, 4)), np.eye(4)[rng.integers(0, 4, 4000)])
    assert abs(chance["mAUC"] - 0.5) < 0.03 and abs(chance["d_prime"]) < 0.12
