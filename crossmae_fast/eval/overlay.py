"""Heatmaps over a user's video: per-frame PNGs, an overview picture and an MP4 with the sound.

A map covers the centred square the model saw (`video.crop_box`); it is min-max normalised per
frame (as the evaluation pictures are), coloured with the `jet` colour map and blended over that
square; the parts of the frame the model did not see are dimmed. In the MP4 every frame of the window
carries the map of the last sampled frame at or before it (the 10 maps are 10 samples of the clip),
and the window's original audio is encoded beside it as AAC. Every file is written atomically
(`files.atomic_write`), so an interrupted run leaves no half-written output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from crossmae_fast.data.media import require
from crossmae_fast.eval.metrics import normalise_maps
from crossmae_fast.eval.video import crop_box
from crossmae_fast.files import atomic_write

ALPHA = 0.5
"""Weight of the heat colour over the frame."""
DIM = 0.45
"""Brightness kept outside the square the model saw."""


def heat_layers(maps: torch.Tensor, side: int) -> np.ndarray:
    """Maps [N, h, w] (any size) -> RGB heat colours [N, side, side, 3] in [0, 1], each map min-max
    normalised and bilinearly resized to `side`."""
    m = normalise_maps(maps.float().cpu())
    m = F.interpolate(m[:, None], size=(side, side), mode="bilinear", align_corners=True)[:, 0]
    return colormaps["jet"](m.clamp(0, 1).numpy())[..., :3]


def blend(frame: Image.Image, heat: np.ndarray) -> np.ndarray:
    """The frame (RGB, the display size) with `heat` [S, S, 3] over its centre square: uint8 [H, W, 3]."""
    x = np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0
    left, top, right, bottom = crop_box(frame.size)
    out = x * DIM
    square = x[top:bottom, left:right]
    out[top:bottom, left:right] = (1 - ALPHA) * square + ALPHA * heat[: bottom - top, : right - left]
    return (out * 255 + 0.5).astype(np.uint8)


def write_frame_pngs(frames: Sequence[Image.Image], heat: np.ndarray, folder: Path) -> list[Path]:
    """`frame_{i}.png`: sampled frame i with its heatmap."""
    paths = []
    for i, (frame, h) in enumerate(zip(frames, heat)):
        path = folder / f"frame_{i}.png"
        _write(path, lambda out, f=frame, h=h: Image.fromarray(blend(f, h)).save(out, format="PNG"))
        paths.append(path)
    return paths


def write_overview(frames: Sequence[Image.Image], heat: np.ndarray, times: Sequence[float], path: Path,
                   title: str) -> Path:
    """One picture of the 10 sampled frames' centre squares with their heatmaps, two rows."""
    cols = (len(frames) + 1) // 2
    fig = Figure(figsize=(2.2 * cols, 5.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(2, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, frame, h, t in zip(axes, frames, heat, times):
        left, top, right, bottom = crop_box(frame.size)
        ax.imshow(blend(frame, h)[top:bottom, left:right])
        ax.set_title(f"{t:.1f} s", fontsize=9)
    fig.suptitle(title, fontsize=10)
    _write(path, lambda out: fig.savefig(out, format="png", dpi=80, bbox_inches="tight"))
    return path


def write_overlay_mp4(path: Path, frames: Iterable[tuple[float, Image.Image]], heat: np.ndarray,
                      sampled: Sequence[int], size: tuple[int, int], fps: Fraction, sound: np.ndarray,
                      sound_rate: int) -> Path:
    """H.264 (yuv420p) + AAC MP4: `frames` (time, frame) in order, frame k overlaid with the heat of the
    last sampled position <= k; `sound` [C, N] float32 at `sound_rate` is the audio track."""
    av = require("av")

    def write(file) -> None:
        with av.open(file, "w", format="mp4") as out:
            vs = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
            vs.width, vs.height, vs.pix_fmt = *size, "yuv420p"
            aus = out.add_stream("aac", rate=sound_rate)
            aus.layout = "stereo" if sound.shape[0] == 2 else "mono"
            segment = 0
            for k, (t, frame) in enumerate(frames):
                while segment + 1 < len(sampled) and sampled[segment + 1] <= k:
                    segment += 1
                vf = av.VideoFrame.from_ndarray(blend(frame.resize(size, Image.BICUBIC), heat[segment]),
                                                format="rgb24")
                vf.pts, vf.time_base = round(t * 1000), Fraction(1, 1000)
                out.mux(vs.encode(vf))
            out.mux(vs.encode(None))
            step = 4096
            for s in range(0, sound.shape[1], step):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(sound[:, s:s + step]), format="fltp",
                                                layout=aus.layout.name)
                af.sample_rate, af.pts, af.time_base = sound_rate, s, Fraction(1, sound_rate)
                out.mux(aus.encode(af))
            out.mux(aus.encode(None))

    _write(path, write)
    return path


def _write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
