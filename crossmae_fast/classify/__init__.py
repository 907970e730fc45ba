"""Fine-tuning and linear probing of CrossMAE's encoders (`python -m crossmae_fast.finetune`): the
run (`finetuner.py`), its data and labels (`task.py`), the optimisation step (`step.py`) and the
evaluation that scores it (`predict.py`)."""
