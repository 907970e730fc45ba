"""Pre-training: the optimisation step (`step.py`), checkpoints and multi-process helpers."""
