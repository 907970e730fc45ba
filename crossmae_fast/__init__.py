"""crossmae-fast: CrossMAE audio-visual masked autoencoders with fused Triton ops."""

from typing import TYPE_CHECKING

from crossmae_fast.config import DataConfig, ModelConfig, RunConfig, data_config, model_config, run_config

if TYPE_CHECKING:
    from crossmae_fast.model.crossmae import CrossMAE

__all__ = ["CrossMAE", "DataConfig", "ModelConfig", "RunConfig", "data_config", "model_config", "run_config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The model pulls in torch, timm and triton; CLIs such as `synth` and `prepare` don't need them.
    if name == "CrossMAE":
        from crossmae_fast.model.crossmae import CrossMAE

        return CrossMAE
    raise AttributeError(f"module 'crossmae_fast' has no attribute {name!r}")
