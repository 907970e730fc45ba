"""Evaluation: retrieval and localization metrics, the evaluation loop (`evaluator.py`), pictures, and
the classification metrics of fine-tuning (`classification.py`)."""

from crossmae_fast.eval.classification import classification_stats

__all__ = ["classification_stats"]
