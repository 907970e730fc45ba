"""Data loading: `make_loader` builds the DALI pipeline or the torch reference loader over a manifest.

Both yield dicts of `audio` [B, audio_frames, audio_bins] float32 (normalised log-mel), `image`
[B, 3, image_size, image_size] float32 (ImageNet-normalised) and `index` [B] int64 (manifest rows),
on `device`, and agree on rows, order, frames and bad-file replacements (`clips.py` has the rules for
shuffling, sharding and bad files).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from crossmae_fast.config import LOADERS

if TYPE_CHECKING:
    from crossmae_fast.config import DataConfig
    from crossmae_fast.data.clips import ClipLoader

log = logging.getLogger("crossmae_fast.data")
_warned = False

__all__ = ["make_loader"]


def make_loader(
    manifest: str | Path, *, backend: str | None = None, batch_size: int, train: bool, data_config: DataConfig,
    device="cpu", rank: int = 0, world_size: int = 1, seed: int = 0, drop_last: bool | None = None,
) -> ClipLoader:
    """Loader over `manifest` (a CAV-MAE manifest, or a shard folder's `shards.json`, `data/shards.py`)
    for this rank: iterable of batches, with `len()`, `set_epoch()`, `stats`.

    Training shuffles per epoch (`set_epoch`) and draws a random frame of `num_frames`; evaluation
    keeps the manifest order and uses frame `eval_frame`. `drop_last` defaults to `train`.
    `backend` defaults to `data_config.loader`; `backend="dali"` falls back to the torch loader, with
    one warning, when DALI cannot be imported. `data_config.workers` is the DataLoader's worker count
    or DALI's thread count; `data_config.video` decodes the chosen frame from a row's `"video"` file
    (same frame rule as the JPEGs; rows without one use their JPEG frames).
    """
    from crossmae_fast.data.torch_loader import TorchLoader

    global _warned
    backend = data_config.loader if backend is None else backend
    if backend not in LOADERS:
        raise ValueError(f"backend={backend!r} is not one of {LOADERS}")
    cls = TorchLoader
    if backend == "dali":
        try:
            from crossmae_fast.data.dali_loader import DaliLoader as cls
        except ImportError as e:
            if not _warned:
                log.warning("data: DALI is not importable (%s); using the torch loader", e)
                _warned = True
    return cls(manifest, batch_size=batch_size, train=train, data_config=data_config, device=device,
               rank=rank, world_size=world_size, seed=seed, drop_last=drop_last)
