"""Torch reference loader: a Dataset + DataLoader computing the input features of docs/design.md with
torchaudio's Kaldi fbank and PIL. The fallback where DALI or a GPU is missing, and the tests' oracle.

Audio is read with PyAV (`media.read_audio`: any rate resampled to 16 kHz, channels averaged). A row
whose audio or frame fails to read or decode is replaced inside the worker by the next good row
(`ClipSet.replacement`); the main process logs and counts it in `stats`. With `video=True` the frame
of a row with a `"video"` file is decoded from it by PyAV (any codec FFmpeg reads; seek to the last
keyframe before it, then decode forward).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from crossmae_fast.data.clips import ClipLoader, ClipSet
from crossmae_fast.data.fbank import audio_features, image_features
from crossmae_fast.data.media import read_audio, read_video_frame


class ClipDataset(Dataset):
    """Row -> {"audio", "image", "index", "bad", "replaced"}; `bad` lists the (row, reason) found bad here."""

    def __init__(self, clips: ClipSet, train: bool, seed: int, epoch: int, bad: dict[int, str],
                 video: bool = False):
        self.clips, self.train, self.seed, self.epoch, self.video = clips, train, seed, epoch, video
        self.bad = dict(bad)  # this worker's copy; new finds travel back in the sample

    def __len__(self) -> int:
        return len(self.clips)

    def load(self, row: int) -> dict:
        cfg = self.clips.cfg
        audio = audio_features(read_audio(self.clips.audio_file(row), cfg.sample_rate), cfg)
        frame = self.clips.frame(row, self.train, self.seed, self.epoch)
        if self.video and self.clips.video(row):
            index, k = self.clips.video_frame(row, frame)
            image = image_features(read_video_frame(self.clips.video(row), k, index), cfg)
        else:
            with Image.open(self.clips.frame_file(row, frame)) as im:
                image = image_features(im, cfg)
        return {"audio": audio, "image": image, "index": row}

    def __getitem__(self, planned: int) -> dict:
        row, found = planned, []
        while True:
            if row in self.bad:
                row = self.clips.replacement(row, self.bad)
                continue
            try:
                return {**self.load(row), "bad": found, "replaced": int(row != planned)}
            except ImportError:  # PyAV or soundfile missing: no clip is readable here, say so at once
                raise
            except Exception as e:  # any failure to read or decode a clip makes the row bad
                self.bad[row] = f"{type(e).__name__}: {e}"
                found.append((row, self.bad[row]))


def _worker_init(_: int) -> None:
    # Objects inherited from the parent (say a DALI pipeline whose threads did not survive the fork)
    # must never be finalised here.
    gc.freeze()


def _collate(samples: list[dict]) -> dict:
    return {
        "audio": torch.stack([s["audio"] for s in samples]),
        "image": torch.stack([s["image"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "bad": [b for s in samples for b in s["bad"]],
        "replaced": sum(s["replaced"] for s in samples),
    }


class TorchLoader(ClipLoader):
    """`make_loader(..., backend="torch")`: batches of `audio` [B, T, F], `image` [B, 3, H, W] and
    `index` [B]."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = ClipDataset(self.clips, self.train, self.seed, self.epoch, self.stats.bad, self.video)
        device = torch.device(self.device)
        loader = DataLoader(
            dataset, batch_sampler=[b.tolist() for b in self.plan()], num_workers=self.num_workers,
            collate_fn=_collate, pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
        )
        for batch in loader:
            for row, reason in batch.pop("bad"):
                self.stats.mark_bad(row, reason)
            self.stats.replaced += batch.pop("replaced")
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
