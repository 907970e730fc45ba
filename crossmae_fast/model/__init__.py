"""The CrossMAE model: encoders and decoders (`crossmae.py`), losses, position embeddings, and
initialisation from / export to MAE and timm weights (`weights.py`)."""

from crossmae_fast.model.crossmae import CrossMAE, Encoder

__all__ = ["CrossMAE", "Encoder"]
