"""Evaluation: retrieval and localization metrics, the evaluation loop (`evaluator.py`) and pictures."""
