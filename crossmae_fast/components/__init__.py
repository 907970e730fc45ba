"""The parts every run stands on (pre-training in `train/`, evaluation in `eval/`, later loops beside them):
the checkpoint format and resume rules (`checkpoint.py`), the metrics log and progress line
(`metrics_log.py`), the learning-rate schedule (`lr_schedule.py`), stopping (`stopping.py`), RNG states
(`rng.py`) and the process group and device (`distributed.py`). Nothing here imports `train/` or `eval/`."""
