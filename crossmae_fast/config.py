"""Dataclass configs and presets for the model and the data pipeline.

`model_config(preset, variant, **overrides)` is the public way to build a config; invalid values
and invalid combinations raise `ValueError` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

VARIANTS: dict[str, frozenset[str]] = {
    "cl-av": frozenset({"contrastive"}),
    "self-mae": frozenset({"self_recon"}),
    "cl-self-mae": frozenset({"contrastive", "self_recon"}),
    "cl-crosscdt-mae": frozenset({"contrastive", "cross_conditioned"}),
    "cl-crossemb-mae": frozenset({"contrastive", "cross_embedding"}),
    "crossmae": frozenset({"contrastive", "cross_conditioned", "cross_embedding"}),
}
"""Loss terms of each variant (paper Table 2)."""

ATTENTIVE_TOKENS = ("topk", "zero", "random")
QUERIES = ("learnable", "empty", "target-tokens")
OPS = ("auto", "triton", "reference")
LOSS_ON = ("masked", "visible")


@dataclass
class ModelConfig:
    """Architecture, masking and loss settings (docs/design.md, "Model")."""

    preset: str = "base"
    variant: str = "crossmae"
    # inputs
    image_size: int = 224
    image_patch: int = 16
    audio_frames: int = 1024
    audio_bins: int = 128
    audio_patch: int = 16
    # encoders (one per modality, same shape)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # cross-conditioned / plain reconstruction decoders
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    # cross-embedding decoders
    emb_decoder_depth: int = 4
    # method
    mask_ratio: float = 0.75
    topk_ratio: float = 0.25
    norm_pix_loss: bool = True
    recon_loss_on: str = "masked"
    temperature: float = 0.05
    contrastive_weight: float = 0.1
    attentive_tokens: str = "topk"
    queries: str = "learnable"
    # implementation
    ops: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("variant", self.variant, tuple(VARIANTS))
        _check_choice("attentive_tokens", self.attentive_tokens, ATTENTIVE_TOKENS)
        _check_choice("queries", self.queries, QUERIES)
        _check_choice("ops", self.ops, OPS)
        _check_choice("recon_loss_on", self.recon_loss_on, LOSS_ON)
        for name, size, patch in (
            ("image_size", self.image_size, self.image_patch),
            ("audio_frames", self.audio_frames, self.audio_patch),
            ("audio_bins", self.audio_bins, self.audio_patch),
        ):
            if size <= 0 or patch <= 0 or size % patch:
                raise ValueError(f"{name}={size} must be a positive multiple of its patch size {patch}")
        for name, dim, heads in (
            ("embed_dim", self.embed_dim, self.num_heads),
            ("decoder_dim", self.decoder_dim, self.decoder_heads),
        ):
            if dim % heads:
                raise ValueError(f"{name}={dim} must be divisible by its head count {heads}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} must lie in (0, 1)")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio={self.topk_ratio} must lie in (0, 1]")
        terms = VARIANTS[self.variant]
        if self.attentive_tokens != "topk" and "cross_conditioned" not in terms:
            raise ValueError(
                f"attentive_tokens={self.attentive_tokens!r} is an ablation of cross-conditioned "
                f"reconstruction, which variant {self.variant!r} does not use"
            )
        if self.queries != "learnable" and "cross_embedding" not in terms:
            raise ValueError(
                f"queries={self.queries!r} is an ablation of cross-embedding reconstruction, "
                f"which variant {self.variant!r} does not use"
            )

    @property
    def terms(self) -> frozenset[str]:
        """Loss terms this variant computes."""
        return VARIANTS[self.variant]

    @property
    def image_grid(self) -> tuple[int, int]:
        return (self.image_size // self.image_patch,) * 2

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(time, frequency) patch grid; tokens are time-major."""
        return self.audio_frames // self.audio_patch, self.audio_bins // self.audio_patch

    @property
    def num_image_patches(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def num_audio_patches(self) -> int:
        return self.audio_grid[0] * self.audio_grid[1]

    def num_visible(self, num_patches: int) -> int:
        """Visible patches after masking, MAE's `int(L * (1 - mask_ratio))`."""
        return int(num_patches * (1 - self.mask_ratio))

    def num_attentive(self, num_patches: int) -> int:
        """Attentive Tokens: `round(topk_ratio * visible)`, at least one."""
        return max(1, round(self.topk_ratio * self.num_visible(num_patches)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # CPU-sized: 64x64 frames (8x8 patches of 8 px), 256x64 fbank (16x4 patches of 16).
    "tiny": dict(
        image_size=64, image_patch=8, audio_frames=256, audio_bins=64, audio_patch=16,
        embed_dim=128, depth=4, num_heads=4, decoder_dim=64, decoder_depth=2, decoder_heads=2,
        emb_decoder_depth=1,
    ),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def model_config(preset: str = "base", variant: str = "crossmae", **overrides) -> ModelConfig:
    """Config of a preset (`tiny`, `base`, `large`) and variant, with field overrides."""
    _check_choice("preset", preset, tuple(PRESETS))
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
    return ModelConfig(**{"preset": preset, "variant": variant, **PRESETS[preset], **overrides})


SAMPLE_RATE = 16000
"""Audio sample rate (Hz) of every prepared, synthetic and loaded clip."""
NUM_FRAMES = 10
"""JPEG frames extracted per clip, frame i at video frame int(i * total / NUM_FRAMES)."""
EVAL_FRAME = 5
"""The frame evaluation uses (and the box annotations refer to); training draws one at random."""
AUDIOSET_FBANK_MEAN, AUDIOSET_FBANK_STD = -5.081, 4.4849
"""Log-mel normalisation (CAV-MAE's AudioSet statistics): (fbank - mean) / std."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""Per-channel image normalisation of the ImageNet MAE encoders."""


@dataclass
class DataConfig:
    """Input pipeline settings (docs/design.md, "Inputs"). Build one from a model config with `data_config`."""

    sample_rate: int = SAMPLE_RATE
    audio_frames: int = 1024  # fbank frames after pad/crop (10 ms shift)
    audio_bins: int = 128  # mel bins
    frame_shift_ms: float = 10.0
    frame_length_ms: float = 25.0
    # normalised fbank = (fbank - audio_mean) / audio_std; AudioMAE's statistics would be
    # audio_mean=-4.2677393, audio_std=2 * 4.5689974.
    audio_mean: float = AUDIOSET_FBANK_MEAN
    audio_std: float = AUDIOSET_FBANK_STD
    image_size: int = 224
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    num_frames: int = NUM_FRAMES
    eval_frame: int = EVAL_FRAME


def data_config(model: ModelConfig | None = None, **overrides) -> DataConfig:
    """Data config whose input sizes match `model` (default: the base preset)."""
    model = model or model_config("base")
    sizes = dict(audio_frames=model.audio_frames, audio_bins=model.audio_bins, image_size=model.image_size)
    return DataConfig(**{**sizes, **overrides})


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
