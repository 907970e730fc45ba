"""Reference audio and image features (docs/design.md section 1): the torch loader's transforms and the tests' oracle.

Audio follows CAV-MAE: mean-subtracted 16 kHz mono waveform, torchaudio's Kaldi fbank, zero-padded at
the end or cropped to `audio_frames`, then `(fbank - audio_mean) / audio_std` (padding happens before
normalisation, so padded frames read `-audio_mean / audio_std`). Images follow CAV-MAE / MAE: short
side to `image_size` (bicubic), centre crop, `[0, 1]`, ImageNet mean/std.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio
from PIL import Image

from crossmae_fast.config import DataConfig
from crossmae_fast.data.media import resize_center_crop


def kaldi_fbank(wave: np.ndarray | torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Log-mel `[frames, audio_bins]` of a mono waveform in [-1, 1] at `cfg.sample_rate`."""
    wave = torch.as_tensor(wave, dtype=torch.float32).reshape(1, -1)
    min_len = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    if wave.shape[1] < min_len:  # Kaldi yields no frame for a clip shorter than one window
        return torch.zeros(0, cfg.audio_bins)
    return torchaudio.compliance.kaldi.fbank(
        wave - wave.mean(), htk_compat=True, sample_frequency=cfg.sample_rate, use_energy=False,
        window_type="hanning", num_mel_bins=cfg.audio_bins, dither=0.0,
        frame_shift=cfg.frame_shift_ms, frame_length=cfg.frame_length_ms,
    )


def pad_or_crop(fbank: torch.Tensor, frames: int) -> torch.Tensor:
    """Zero-pad at the end or crop to `frames` rows."""
    if fbank.shape[0] >= frames:
        return fbank[:frames]
    return torch.nn.functional.pad(fbank, (0, 0, 0, frames - fbank.shape[0]))


def audio_features(wave: np.ndarray | torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Normalised, fixed-length fbank `[audio_frames, audio_bins]` float32."""
    fbank = pad_or_crop(kaldi_fbank(wave, cfg), cfg.audio_frames)
    mean, std = cfg.audio_norm()
    return (fbank - mean) / std


def image_features(img: Image.Image, cfg: DataConfig) -> torch.Tensor:
    """`[3, image_size, image_size]` float32: bicubic short-side resize, centre crop, ImageNet norm."""
    img = resize_center_crop(img.convert("RGB"), cfg.image_size)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    return ((x - mean) / std).contiguous()
