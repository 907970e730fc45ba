"""crossmae-fast: CrossMAE audio-visual masked autoencoders with fused Triton ops."""

from crossmae_fast.config import DataConfig, ModelConfig, data_config, model_config
from crossmae_fast.model import CrossMAE

__all__ = ["CrossMAE", "DataConfig", "ModelConfig", "data_config", "model_config"]
__version__ = "0.1.0"
