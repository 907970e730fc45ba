"""Pre-training: the optimisation step (`step.py`) and the loop (`trainer.py`), on components/."""
