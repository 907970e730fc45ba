"""Per-dataset log-mel normalisation statistics (as AST and AudioMAE do).

`prepare` and `synth` estimate the training split's fbank mean and standard deviation and store them in
the manifest under `"fbank_stats"`, one pair per mel-bin count the presets use (the statistics depend
on the filter bank). The loaders normalise with them when the data config leaves `audio_mean` /
`audio_std` unset, and with AudioSet's (-5.081, 4.4849) when the manifest has none for their bin count.
A run resolves the values once, from its train manifest, and its checkpoint records them, so evaluation
normalises exactly as training did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from crossmae_fast.config import AUDIOSET_FBANK_MEAN, AUDIOSET_FBANK_STD, PRESETS, DataConfig, model_config

log = logging.getLogger("crossmae_fast.data")

STATS_KEY = "fbank_stats"
MAX_CLIPS = 512
"""Clips (a seeded sample of the split) the statistics are estimated from."""


def preset_mel_bins() -> list[int]:
    """The mel-bin counts of the model presets: the filter banks statistics are stored for."""
    return sorted({model_config(p).audio_bins for p in PRESETS})


def fbank_stats(wavs: list[str | Path], split: str = "train", max_clips: int = MAX_CLIPS,
                mel_bins: list[int] | None = None, seed: int = 0) -> dict:
    """Mean and standard deviation of the Kaldi fbank over the frames of (a seeded sample of at most
    `max_clips` of) `wavs`, per mel-bin count; unreadable files are skipped. The manifest's value."""
    from crossmae_fast.config import data_config
    from crossmae_fast.data.fbank import kaldi_fbank
    from crossmae_fast.data.media import read_audio

    bins = mel_bins or preset_mel_bins()
    picked = sorted(np.random.default_rng(seed).permutation(len(wavs))[:max_clips].tolist())
    sums = {b: np.zeros(3) for b in bins}  # frames x bins, sum, sum of squares
    used = 0
    for i in picked:
        try:
            wave = read_audio(wavs[i])
        except Exception as e:  # a bad clip is the loaders' business; it just does not count here
            log.info("fbank statistics: %s skipped (%s)", wavs[i], e)
            continue
        used += 1
        for b in bins:
            f = kaldi_fbank(wave, data_config(None, audio_bins=b)).double()
            sums[b] += (f.numel(), f.sum().item(), f.square().sum().item())
    by_bins = {}
    for b, (n, s, ss) in sums.items():
        if n:
            mean = s / n
            by_bins[str(b)] = {"mean": round(mean, 6), "std": round(max(ss / n - mean * mean, 0.0) ** 0.5, 6)}
    return {"split": split, "clips": used, "of": len(wavs), "mel_bins": by_bins}


def read_stats(manifest: str | Path) -> dict | None:
    """The manifest's `"fbank_stats"`, or None."""
    try:
        return json.loads(Path(manifest).read_text()).get(STATS_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def stats_for(manifest: str | Path, audio_bins: int) -> tuple[float, float] | None:
    """(mean, std) the manifest stores for `audio_bins` mel bins, or None."""
    entry = ((read_stats(manifest) or {}).get("mel_bins") or {}).get(str(audio_bins))
    if not entry or not entry.get("std", 0) > 0:
        return None
    return float(entry["mean"]), float(entry["std"])


def resolve(cfg: DataConfig, manifest: str | Path | None) -> DataConfig:
    """`cfg` with `audio_mean` / `audio_std` filled in where unset: the manifest's statistics for its
    bin count, else AudioSet's. Values already set (an override, a checkpoint's) are kept."""
    if cfg.audio_mean is not None and cfg.audio_std is not None:
        return cfg
    found = stats_for(manifest, cfg.audio_bins) if manifest is not None else None
    mean, std = found or (AUDIOSET_FBANK_MEAN, AUDIOSET_FBANK_STD)
    resolved = dataclasses.replace(cfg, audio_mean=mean if cfg.audio_mean is None else cfg.audio_mean,
                                   audio_std=std if cfg.audio_std is None else cfg.audio_std)
    log.info("fbank normalisation: mean %.4f, std %.4f (%s)", resolved.audio_mean, resolved.audio_std,
             f"statistics of {manifest}" if found else "AudioSet's; the manifest has none for "
             f"{cfg.audio_bins} mel bins")
    return resolved
