"""A user's video file as a run's inputs: the window's audio and its 10 frames (for `localize`).

Any file PyAV reads works (H.264/AAC mp4, VP9/Opus webm, ...). A window of `seconds` from `start`
(times from the container's start) is cut out of both streams:

- audio: resampled to 16 kHz mono (channels averaged) and turned into the run's normalised fbank
  (`data/fbank.py`: the loaders' transform, so a short clip is zero-padded at the end as they pad);
  the window's original audio (its own rate, mono or stereo) is kept for the overlay MP4;
- frames: the window's frames in presentation order, of which frames `int(i * total / 10)` are the
  model's inputs (resize, centre crop, ImageNet normalisation: the loaders' rule), kept also at a
  display size for the pictures.

Decoding happens twice: once here (a demux pass counts the window's frames, a decode pass takes the
sampled ones) and once more in `window_frames` while the overlay MP4 is written, so no clip is held
in memory frame by frame. Problems raise `MediaError` naming the file: no audio or video stream, a
file that is not a video, a file cut short (its container declares more frames than it holds), or
nothing of it inside the window.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crossmae_fast.config import DataConfig
from crossmae_fast.data.fbank import audio_features, image_features
from crossmae_fast.data.media import MediaError, frame_indices, open_media, require, resample_mono

DISPLAY_SIDE = 480
"""Short side (pixels) at most of the pictures and the overlay MP4; smaller videos keep their size."""


@dataclass(frozen=True)
class Window:
    """The part of a video used: `seconds` from `start` (seconds from the container's start)."""

    start: float = 0.0
    seconds: float = 10.0

    def __post_init__(self) -> None:
        if not (self.start >= 0 and self.seconds > 0 and math.isfinite(self.start + self.seconds)):
            raise ValueError(f"window start={self.start}, seconds={self.seconds}: need start >= 0 and seconds > 0")

    @property
    def end(self) -> float:
        return self.start + self.seconds


@dataclass
class UserClip:
    """One video's model inputs and what the pictures and the MP4 need."""

    path: Path
    window: Window
    audio: torch.Tensor  # [audio_frames, audio_bins], the run's normalisation
    images: torch.Tensor  # [num_frames, 3, S, S], the run's image transform
    display: list[Image.Image]  # the sampled frames, whole, at the display size
    times: list[float]  # each sampled frame's time from the window start (s)
    sampled: list[int]  # their positions among the window's frames
    total: int  # frames in the window
    fps: Fraction  # the video stream's average rate
    sound: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((1, 0), np.float32))  # [C, N]
    sound_rate: int = 16000
    audio_seconds: float = 0.0  # audio found in the window (shorter clips are padded)

    @property
    def display_size(self) -> tuple[int, int]:
        return self.display[0].size


def display_size(width: int, height: int) -> tuple[int, int]:
    """(w, h) for the pictures: the short side at most `DISPLAY_SIDE`, both even (yuv420p)."""
    scale = min(1.0, DISPLAY_SIDE / min(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def crop_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square the model sees, in a frame of `size` (w, h)."""
    w, h = size
    side = min(w, h)
    left, top = int(round((w - side) / 2)), int(round((h - side) / 2))
    return left, top, left + side, top + side


def read_clip(path: str | Path, cfg: DataConfig, window: Window | None = None) -> UserClip:
    """Decode `path`'s window (default: the first 10 s) into the run's inputs (`cfg`: its sizes and
    fbank statistics)."""
    window = window or Window()
    path = Path(path)
    av = require("av")
    try:
        with open_media(path) as c:
            if not c.streams.video:
                raise MediaError("no_video", f"{path}: no video stream")
            if not c.streams.audio:
                raise MediaError("no_audio", f"{path}: no audio track (localization needs the sound)")
            origin = c.start_time / 1e6 if c.start_time is not None else 0.0
            fps = Fraction(c.streams.video[0].average_rate or 25)
            times = _window_times(c, path, origin, window)
        wanted = frame_indices(len(times), cfg.num_frames)
        frames = _sampled_frames(path, origin, window, sorted(set(wanted)))
        sound, rate = _window_sound(path, origin, window)
    except av.FFmpegError as e:
        raise MediaError("corrupt", f"{path}: {e}") from e
    if sound.shape[1] == 0:
        raise MediaError("no_audio", f"{path}: no audio between {window.start:g} s and {window.end:g} s")
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(sound.mean(0, keepdims=True)), format="fltp",
                                       layout="mono")
    frame.sample_rate = rate
    wave = resample_mono([frame], cfg.sample_rate)
    size = display_size(*frames[wanted[0]].size)
    return UserClip(
        path=path, window=window, audio=audio_features(wave, cfg),
        images=torch.stack([image_features(frames[k], cfg) for k in wanted]),
        display=[frames[k].resize(size, Image.BICUBIC) for k in wanted],
        times=[times[k] for k in wanted], sampled=wanted, total=len(times), fps=fps,
        sound=sound, sound_rate=rate, audio_seconds=sound.shape[1] / rate,
    )


def _window_times(c, path: Path, origin: float, window: Window) -> list[float]:
    """Times (from the window start) of the window's video frames, in presentation order, by demuxing.
    A container that declares more frames than its packets hold is cut short: `MediaError`."""
    vs = c.streams.video[0]
    tb = vs.time_base or Fraction(1, 1000)
    rate = float(vs.average_rate or 25)
    pts, packets = [], 0
    for p in c.demux(vs):
        if p.size:
            packets += 1
            pts.append(p.pts)
    if vs.frames and packets < vs.frames:
        raise MediaError("truncated", f"{path}: cut short ({packets} of {vs.frames} video frames present)")
    if any(p is None for p in pts):  # no timestamps: count frames at the average rate
        stamps = [k / rate for k in range(packets)]
    else:
        stamps = [float(p * tb) - origin for p in sorted(pts)]
    times = [t - window.start for t in stamps if window.start <= t < window.end]
    if not times:
        raise MediaError("no_frames", f"{path}: no video frame between {window.start:g} s and {window.end:g} s "
                         f"(the video has {packets} frames)")
    return times


def window_frames(path: str | Path, window: Window) -> Iterator[tuple[float, Image.Image]]:
    """(time from the window start, RGB frame) of every frame in the window, in presentation order;
    a decode error raises `MediaError` 'corrupt'."""
    av = require("av")
    with open_media(path) as c:
        origin = c.start_time / 1e6 if c.start_time is not None else 0.0
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        tb = vs.time_base or Fraction(1, 1000)
        rate = float(vs.average_rate or 25)
        if window.start > 0 and vs.time_base:
            c.seek(int((origin + window.start) / tb), stream=vs, backward=True, any_frame=False)
        try:
            for k, f in enumerate(c.decode(vs)):
                t = (float(f.pts * tb) - origin if f.pts is not None else k / rate) - window.start
                if t >= window.seconds:
                    break
                if t >= 0:
                    yield t, f.to_image()
        except av.FFmpegError as e:
            raise MediaError("corrupt", f"{path}: video decode: {e}") from e


def _sampled_frames(path: Path, origin: float, window: Window, wanted: list[int]) -> dict[int, Image.Image]:
    """The window's frames at positions `wanted` (sorted)."""
    out, left = {}, set(wanted)
    for k, (_, img) in enumerate(window_frames(path, window)):
        if k in left:
            out[k] = img
            left.discard(k)
            if not left:
                break
    if left:
        raise MediaError("truncated", f"{path}: frame {min(left)} of the window does not decode")
    return out


def _window_sound(path: Path, origin: float, window: Window) -> tuple[np.ndarray, int]:
    """The window's audio at the track's own rate, mono or stereo float32 [C, N]; a track that starts
    after the window does is padded with silence in front, so it stays in sync with the frames."""
    av = require("av")
    with open_media(path) as c:
        aus = c.streams.audio[0]
        rate = aus.codec_context.sample_rate or aus.rate
        layout = "stereo" if aus.codec_context.layout.nb_channels >= 2 else "mono"
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        if window.start > 0 and aus.time_base:
            c.seek(int((origin + window.start) / aus.time_base), stream=aus, backward=True, any_frame=False)
        chunks, first = [], None
        for f in c.decode(aus):
            if first is None:
                first = (f.time - origin) if f.time is not None else 0.0
            f.pts = None  # the resampler rejects the non-monotonic timestamps some files carry
            chunks.extend(r.to_ndarray() for r in resampler.resample(f))
            if first + sum(ch.shape[1] for ch in chunks) / rate >= window.end:
                break
        chunks.extend(r.to_ndarray() for r in resampler.resample(None))
    channels = 2 if layout == "stereo" else 1
    sound = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    offset = round(((window.start - first) if first is not None else 0.0) * rate)
    if offset < 0:
        sound = np.concatenate([np.zeros((channels, -offset), np.float32), sound], axis=1)
        offset = 0
    return np.ascontiguousarray(sound[:, offset:offset + round(window.seconds * rate)], np.float32), rate


def mux_clip(video: str | Path, audio: str | Path, out: str | Path) -> Path:
    """One Matroska file of `video`'s first video stream (packets copied) and `audio`'s first audio
    track (as 16-bit PCM at its rate, channels kept), e.g. a `synth --video` clip and its WAV, which
    the synthetic set keeps apart."""
    av = require("av")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open_media(video) as vin, open_media(audio) as ain, av.open(str(out), "w", format="matroska") as o:
        if not vin.streams.video or not ain.streams.audio:
            raise MediaError("no_video" if not vin.streams.video else "no_audio",
                             f"{video if not vin.streams.video else audio}: nothing to mux")
        vs = o.add_stream_from_template(vin.streams.video[0])
        src = ain.streams.audio[0]
        aus = o.add_stream("pcm_s16le", rate=src.codec_context.sample_rate)
        aus.layout = src.codec_context.layout.name
        for p in vin.demux(vin.streams.video[0]):
            if p.size:
                p.stream = vs
                o.mux(p)
        for f in ain.decode(src):
            f.pts = None
            o.mux(aus.encode(f))
        o.mux(aus.encode(None))
    return out
