"""Media helpers shared by `prepare`, `synth` and the data loaders.

Audio is read with PyAV (any container or codec FFmpeg knows), resampled to the target rate and
downmixed to mono by averaging channels. Images follow the input rule of docs/design.md: resize the short side
(bicubic), then centre-crop a square. Frames are taken at indices `int(i * total / n)`; the loaders'
video mode finds them again by demuxing (`index_video`) and seeking (`read_video_frame`). A truncated
file whose container declares no frame count (webm) reads as a shorter video, not as a bad one.
"""

from __future__ import annotations

import importlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image

from crossmae_fast.config import SAMPLE_RATE

if TYPE_CHECKING:
    import av

JPEG_QUALITY = 90


def require(module: str) -> ModuleType:
    """Import an optional media package (`av`, `soundfile`) where it is used, so that everything
    else (the model, training, the loaders' plumbing) imports on machines without it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"reading or writing audio/video files needs the {module!r} package "
                          f"(pip install {module}): {e}") from e


class MediaError(ValueError):
    """A media file that cannot be used; `reason` is a short category for summaries."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def resample_mono(frames: Iterable[av.AudioFrame], sample_rate: int) -> np.ndarray:
    """Resample decoded audio frames to `sample_rate` and average the channels: float32 mono."""
    av = require("av")
    # Keep the source layout so the downmix is a plain channel mean (swresample's mono matrix
    # would scale a stereo sum by 1/sqrt(2) instead).
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)
    chunks = []
    for frame in frames:
        frame.pts = None  # the resampler rejects the non-monotonic timestamps some files carry
        chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
    chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    if not chunks:
        return np.zeros(0, np.float32)
    return np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float32)


def decode_audio(container: av.container.InputContainer, sample_rate: int) -> np.ndarray:
    """Decode the first audio stream of an open container to mono float32 at `sample_rate`."""
    if not container.streams.audio:
        raise MediaError("no_audio", f"{container.name} has no audio stream")
    return resample_mono(container.decode(container.streams.audio[0]), sample_rate)


def open_media(path: str | os.PathLike | BinaryIO) -> av.container.InputContainer:
    """Open a media file (or file object) for reading; `MediaError` 'missing', 'empty' (0 bytes) or
    'unreadable'."""
    av = require("av")
    if not hasattr(path, "read") and os.path.isfile(path) and os.path.getsize(path) == 0:
        raise MediaError("empty", f"{path}: 0 bytes")
    try:
        return av.open(path if hasattr(path, "read") else str(path), metadata_errors="ignore")
    except FileNotFoundError as e:
        raise MediaError("missing", f"{path}: no such file") from e
    except (av.FFmpegError, OSError) as e:
        raise MediaError("unreadable", f"{path}: {e}") from e


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Audio of `path` as a mono float32 array at `sample_rate` (resampled, channels averaged).

    Raises `MediaError` (a `ValueError`) naming the file and a reason: 'missing', 'empty',
    'unreadable' (cannot be opened), 'no_audio' (no audio stream) or 'corrupt' (a decode error).
    """
    av = require("av")
    with open_media(path) as container:
        try:
            return decode_audio(container, sample_rate)
        except av.FFmpegError as e:
            raise MediaError("corrupt", f"{path}: {e}") from e


def write_audio(path: str | os.PathLike, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono float samples as 16-bit PCM; the format (WAV or FLAC) follows the suffix."""
    fmt = {".wav": "WAV", ".flac": "FLAC"}.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: audio output must end in .wav or .flac")
    soundfile = require("soundfile")
    buf = io.BytesIO()  # libsndfile fsyncs real files on close: slow for many small files
    soundfile.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format=fmt)
    Path(path).write_bytes(buf.getvalue())


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic), then centre-crop `size` x `size`.

    Sizes and offsets are torchvision's `Resize(size)` + `CenterCrop(size)` (as CAV-MAE uses):
    long side `int(size * long / short)`, offset `int(round((new - size) / 2))`.
    """
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def frame_indices(total: int, n: int) -> list[int]:
    """Indices of the `n` frames taken from a clip of `total` frames: `int(i * total / n)`."""
    return [int(i * total / n) for i in range(n)]


def save_jpeg(img: Image.Image, path: str | os.PathLike) -> None:
    """Save an RGB image as a JPEG (fixed quality, no metadata: same pixels give the same bytes)."""
    img.convert("RGB").save(path, format="JPEG", quality=JPEG_QUALITY)


@dataclass
class VideoIndex:
    """The first video stream of a file: codec, size and the frames' timestamps (found by demuxing only).

    `total` is `prepare`'s frame count (the container's, else the number of packets), so frame `i` of
    `n` is `frame_indices(total, n)[i]` as in the JPEG frames. `pts` (presentation order) and
    `keyframes` are empty when some packet has no timestamp: frames are then counted from the start.
    """

    codec: str
    height: int
    width: int
    packets: int
    total: int
    pts: list[int]
    keyframes: list[int]

    def frame(self, i: int, n: int) -> int:
        """Index of frame `i` of `n` (`frame_indices` rule); `MediaError` 'truncated' when it is missing."""
        k = frame_indices(self.total, n)[i]
        if k >= self.packets:
            raise MediaError("truncated", f"frame {k} wanted, {self.packets} of {self.total} present")
        return k


def index_video(path: str | os.PathLike, data: bytes | None = None) -> VideoIndex:
    """Index the first video stream of `path` (or of its bytes `data`, read already); `MediaError`."""
    av = require("av")
    with open_media(io.BytesIO(data) if data is not None else path) as c:
        if not c.streams.video:
            raise MediaError("no_video", f"{path} has no video stream")
        vs = c.streams.video[0]
        pts, keys, packets = [], [], 0
        try:
            for p in c.demux(vs):
                if p.size:  # the final flush packet is empty
                    packets += 1
                    if p.pts is not None:
                        pts.append(p.pts)
                        keys += [p.pts] if p.is_keyframe else []
        except av.FFmpegError as e:
            raise MediaError("corrupt", f"{path}: {e}") from e
        if len(pts) < packets:
            pts, keys = [], []
        return VideoIndex(vs.codec_context.name, vs.height, vs.width, packets, vs.frames or packets,
                          sorted(pts), sorted(keys))


def read_video_frame(path: str | os.PathLike, k: int, index: VideoIndex | None = None) -> Image.Image:
    """Frame `k` (presentation order) of the first video stream as RGB: seek to the last keyframe at
    or before it, then decode forward. Same pixels as decoding from the start (PyAV's RGB conversion,
    as `prepare` uses for the JPEG frames)."""
    av = require("av")
    index = index or index_video(path)
    target = index.pts[k] if k < len(index.pts) else None
    with open_media(path) as c:
        vs = c.streams.video[0]
        start = max((p for p in index.keyframes if p <= target), default=None) if target is not None else None
        try:
            if start is not None:
                c.seek(start, stream=vs, backward=True, any_frame=False)
            for j, f in enumerate(c.decode(vs)):
                if (f.pts is not None and f.pts >= target) if target is not None else j == k:
                    return f.to_image()
        except av.FFmpegError as e:
            raise MediaError("corrupt", f"{path}: video decode: {e}") from e
    raise MediaError("truncated", f"{path}: no video frame {k}")
