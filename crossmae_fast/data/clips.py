"""What both loaders share: the clip list, the epoch plan, frame choice and bad-file bookkeeping.

Keeping this in one place makes the DALI and torch loaders yield the same rows, in the same order,
with the same frames and the same replacements for the same seed and epoch, so one is the other's
oracle.

Sharding (DistributedSampler's rule): the epoch's row order (a seeded permutation in training, the
manifest order in evaluation) is padded by wrapping around to a multiple of `world_size`, and rank
`r` takes every `world_size`-th row from position `r`. Shards are disjoint and cover the manifest;
when `len(manifest) % world_size != 0` the first few rows appear twice (once on each of two ranks),
so every rank runs the same number of steps. `index` tells evaluation code which rows repeat.

Video: with `video=True` a row with a `"video"` file takes its picture from the video itself, frame
`frame_indices(total, num_frames)[i]` for the same `i` (random in training, `eval_frame` in evaluation)
as the JPEG frames, which `prepare` and `synth` extract with that rule; rows without one use the JPEGs.

Bad files: a row whose audio, frame or video cannot be read or decoded is logged once, remembered as bad
for the loader's lifetime and replaced by the next good row of the manifest (wrapping around);
`stats` counts both.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossmae_fast.config import DataConfig
from crossmae_fast.data import normalisation
from crossmae_fast.data.manifest import frame_path
from crossmae_fast.data.media import VideoIndex, index_video
from crossmae_fast.data.shards import open_rows

log = logging.getLogger("crossmae_fast.data")


@dataclass
class LoaderStats:
    """Bad rows found so far (row -> reason) and how many samples were replaced because of them."""

    bad: dict[int, str] = field(default_factory=dict)
    replaced: int = 0

    def mark_bad(self, row: int, reason: str) -> None:
        if row not in self.bad:
            log.warning("data: row %d skipped and replaced: %s", row, reason)
            self.bad[row] = reason


class ClipSet:
    """The rows of a manifest with absolute file paths (relative ones resolve against its folder), or of
    a shard manifest (`shards.json`), whose members `store` reads by offset (`data/shards.py`)."""

    def __init__(self, manifest: str | Path, cfg: DataConfig):
        self.manifest, self.cfg = Path(manifest), cfg
        self.rows, self.store = open_rows(self.manifest, cfg.num_frames)  # validated, paths made absolute
        self.audio = [r["wav"] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def frame_path(self, row: int, frame: int) -> str:
        return frame_path(self.rows[row], frame)

    def audio_file(self, row: int) -> str | io.BytesIO:
        """The row's audio: its path, or its shard member's bytes (`OSError` when truncated)."""
        return self.audio[row] if self.store is None else io.BytesIO(self.store.audio_bytes(row))

    def frame_file(self, row: int, frame: int) -> str | io.BytesIO:
        """Frame `frame` of the row: its JPEG's path, or its shard member's bytes."""
        if self.store is None:
            return self.frame_path(row, frame)
        return io.BytesIO(self.store.frame_bytes(row, frame))

    def video(self, row: int) -> str | None:
        return self.rows[row].get("video")

    def video_frame(self, row: int, frame: int, data: bytes | None = None) -> tuple[VideoIndex, int]:
        """The row's video index and the index of its frame `frame` of `num_frames` (`MediaError`)."""
        index = index_video(self.rows[row]["video"], data)
        return index, index.frame(frame, self.cfg.num_frames)

    def frame(self, row: int, train: bool, seed: int, epoch: int) -> int:
        """Training: a frame drawn from (seed, epoch, row), so both loaders agree; eval: `eval_frame`."""
        if not train:
            return self.cfg.eval_frame
        return int(np.random.default_rng([seed, epoch, row]).integers(self.cfg.num_frames))

    def replacement(self, row: int, bad: dict[int, str]) -> int:
        """The next row after `row` (wrapping around) that is not known to be bad."""
        for k in range(1, len(self) + 1):
            alt = (row + k) % len(self)
            if alt not in bad:
                return alt
        raise ValueError(f"{self.manifest}: no readable clip left; reasons: {bad}")


def first_seen(index: list[int], done) -> list[int]:
    """Positions in `index` of the rows not in `done` and not earlier in `index`: a bad clip is replaced
    by the next good one, which may already be in the same batch or an earlier one, and each row must
    count once (retrieval pairs unique, localization scores not doubled)."""
    here, keep = set(), []
    for i, r in enumerate(index):
        if r not in done and r not in here:
            here.add(r)
            keep.append(i)
    return keep


def epoch_batches(
    n: int, *, batch_size: int, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int,
    drop_last: bool,
) -> list[np.ndarray]:
    """Row indices of each batch of this rank for one epoch (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    total = math.ceil(n / world_size) * world_size
    order = np.resize(order, total)[rank::world_size]  # np.resize repeats from the start
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


class ClipLoader:
    """Common surface of both loaders: `len()` (batches per epoch), `set_epoch`, `stats`. Iterating
    yields the batches of `plan()`: the current epoch's, from its `start_batch` on."""

    def __init__(
        self, manifest: str | Path, *, batch_size: int, train: bool, data_config: DataConfig, device,
        rank: int = 0, world_size: int = 1, seed: int = 0, drop_last: bool | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        data_config = normalisation.resolve(data_config, manifest)
        self.clips = ClipSet(manifest, data_config)
        self.cfg, self.batch_size, self.train = data_config, batch_size, train
        self.device, self.rank, self.world_size = device, rank, world_size
        self.num_workers, self.seed, self.video = data_config.workers, seed, data_config.video
        self.drop_last = train if drop_last is None else drop_last
        self.epoch, self.start_batch = 0, 0
        self.stats = LoaderStats()
        self.batches()  # validates rank / world_size now

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Reshuffle (training) and redraw frames for `epoch`; iteration then starts at batch
        `start_batch` of it (mid-epoch resume), the batches before it neither read nor decoded."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} must lie in [0, {len(self)}] (batches per epoch)")
        self.epoch, self.start_batch = epoch, start_batch

    def plan(self) -> list[np.ndarray]:
        """Row indices of the batches the next iteration yields."""
        return self.batches()[self.start_batch:]

    def batches(self) -> list[np.ndarray]:
        """Row indices of every batch of the current epoch on this rank."""
        return epoch_batches(
            len(self.clips), batch_size=self.batch_size, shuffle=self.train, seed=self.seed,
            epoch=self.epoch, rank=self.rank, world_size=self.world_size, drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        per_rank = math.ceil(len(self.clips) / self.world_size)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)
