"""Small real media files for tests, written with PyAV and numpy. Importing this module skips the
importing test module where PyAV or soundfile is missing (the bare GPU image).

Video frame `k` of a clip made here is a flat grey of level `frame_level(k, total)`, so a test can
tell which source frame an extracted JPEG came from. Audio is a sine (`tone_hz`), identical on all
channels unless `right_gain` differs from 1.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmae_fast.data.media import save_jpeg, write_audio

av = pytest.importorskip("av", reason="media test files are written and read with PyAV")
soundfile = pytest.importorskip("soundfile", reason="media test files are written with soundfile")


def frame_level(k: int, total: int) -> int:
    """Grey level of frame `k` of `total`: evenly spaced over 16..240."""
    return round(16 + 224 * k / max(1, total - 1))


def make_video(
    path: str | os.PathLike,
    *,
    seconds: float = 1.0,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    vcodec: str = "libx264",
    acodec: str | None = "aac",
    sample_rate: int = 44100,
    channels: int = 2,
    tone_hz: float = 440.0,
    right_gain: float = 1.0,
    faststart: bool = False,
) -> Path:
    """Write a clip (container from the suffix); `acodec=None` writes video only. Size is (w, h)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        vs = out.add_stream(vcodec, rate=fps)
        vs.width, vs.height = size
        vs.pix_fmt = "yuv420p"
        vs.codec_context.thread_count = 1
        aus = None
        if acodec:
            aus = out.add_stream(acodec, rate=sample_rate)
            aus.layout = "stereo" if channels == 2 else "mono"
        total = round(seconds * fps)
        for k in range(total):
            img = np.full((size[1], size[0], 3), frame_level(k, total), np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, fps)
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        if aus is not None:
            n = round(seconds * sample_rate)
            t = np.arange(n) / sample_rate
            wave = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            data = np.stack([wave, wave * right_gain]) if channels == 2 else wave[None]
            step = 4096
            for s in range(0, n, step):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(data[:, s:s + step]), format="fltp", layout=aus.layout.name
                )
                frame.sample_rate, frame.pts, frame.time_base = sample_rate, s, Fraction(1, sample_rate)
                out.mux(aus.encode(frame))
            out.mux(aus.encode(None))
    return path


def truncate(src: str | os.PathLike, dst: str | os.PathLike, fraction: float = 0.5) -> Path:
    """Copy the first `fraction` of the bytes of `src` to `dst`."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def make_mixed_folder(folder: str | os.PathLike) -> dict[str, Path]:
    """A folder of good and bad clips, as a user's download folder might hold.

    Good: `good_h264.mp4` (H.264 + AAC, 44.1 kHz stereo, 2 s at 10 fps, 80x48) and
    `sub/good_vp9.webm` (VP9 + Opus, 48 kHz stereo, 1.5 s at 12 fps, 48x64).
    Bad: `silent.mp4` (no audio stream), `truncated.mp4` (first half of an mp4 whose index is at
    the end: unreadable), `truncated_faststart.mp4` (index first, data cut: decodes partly),
    `notes.mp4` (a text file), `empty.mkv` (0 bytes). Also `readme.txt`, which is not a video name
    and must be ignored.
    """
    folder = Path(folder)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    files = {
        "good_h264": make_video(folder / "good_h264.mp4", seconds=2.0, size=(80, 48)),
        "good_vp9": make_video(
            folder / "sub" / "good_vp9.webm", seconds=1.5, fps=12, size=(48, 64), vcodec="libvpx-vp9",
            acodec="libopus", sample_rate=48000, tone_hz=1000.0,
        ),
        "silent": make_video(folder / "silent.mp4", acodec=None),
    }
    # whole files for the truncated copies live beside the folder, not in it
    whole = make_video(folder.parent / f"{folder.name}_whole.mp4", seconds=2.0)
    files["truncated"] = truncate(whole, folder / "truncated.mp4", 0.5)
    whole_fs = make_video(folder.parent / f"{folder.name}_whole_fs.mp4", seconds=2.0, faststart=True)
    files["truncated_faststart"] = truncate(whole_fs, folder / "truncated_faststart.mp4", 0.4)
    files["text"] = folder / "notes.mp4"
    files["text"].write_text("this is not a video\n")
    files["empty"] = folder / "empty.mkv"
    files["empty"].write_bytes(b"")
    (folder / "readme.txt").write_text("ignore me\n")
    return files


def make_wav_jpeg_set(
    folder: str | os.PathLike,
    n: int = 4,
    *,
    seconds: float = 1.0,
    sample_rate: int = 16000,
    image_size: tuple[int, int] = (80, 60),
    frames: int = 10,
    seed: int = 0,
) -> Path:
    """A tiny prepared set (WAV + JPEG frames + manifest.json with relative paths); returns the manifest.

    Clip `j` has a sine at `300 * (j + 1)` Hz plus a little noise, and random RGB frames of
    `image_size` (w, h).
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for j in range(n):
        vid = f"clip{j:03d}"
        t = np.arange(round(seconds * sample_rate)) / sample_rate
        wave = 0.3 * np.sin(2 * np.pi * 300 * (j + 1) * t) + 0.01 * rng.standard_normal(t.size)
        write_audio(folder / "audio" / f"{vid}.wav", wave.astype(np.float32), sample_rate)
        for i in range(frames):
            (folder / "frames" / f"frame_{i}").mkdir(parents=True, exist_ok=True)
            pix = rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
            save_jpeg(Image.fromarray(pix), folder / "frames" / f"frame_{i}" / f"{vid}.jpg")
        rows.append({"video_id": vid, "wav": f"audio/{vid}.wav", "video_path": "frames", "labels": f"c{j}"})
    path = folder / "manifest.json"
    path.write_text(json.dumps({"data": rows}, indent=1) + "\n")
    return path
