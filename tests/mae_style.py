"""facebookresearch/mae restated, the oracle the tests hold our masking to (the model's, the fused
op's and `kernels.patch_mae`'s): `mae_random_masking` for a given noise, and `MAEViT`, MAE's
`MaskedAutoencoderViT`. Written once, in benchmarks/mae_vit.py, because the drop-in benchmark times
the same model."""

from benchmarks.mae_vit import PRESETS, MAEConfig, MAEViT, mae_random_masking

__all__ = ["PRESETS", "MAEConfig", "MAEViT", "mae_random_masking"]
