"""Sounding-region maps for a user's own videos (the work of `python -m crossmae_fast.localize`).

Per video: the window's audio gives one global audio feature (the unmasked audio encoder's
L2-normalised CLS output), each of its 10 sampled frames gives visual patch features; the map of a
frame is the cosine between the two on the patch grid, bilinearly upsampled (align_corners=True) to
the model's image size: the zero-shot map of the evaluation protocol. With probe heads (saved by
`evaluate --save-probe`) the features go through each head first and the map is the mean of the
heads' cosine maps (one head per probe seed: their mean is steadier than any one of them).

Videos are decoded `workers` at a time and run through the model `batch_size` videos per forward
pass (one audio and 10 frames each), under bf16 autocast on a GPU. Outputs go to `out/<video name>/`:
`frame_{i}.png` (sampled frame i with its map), `heatmaps.png` (the 10 together), `overlay.mp4`
(the window with the maps and its audio), `localization.json` (per frame: time and the map's peak in
the video's own coordinates) and with `embed` `embeddings.npz` (`audio` [D], `visual` [10, D]:
the global features retrieval compares, `times` [10]). A video that cannot be used is reported in one
line naming it and skipped; the others are still processed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crossmae_fast import files
from crossmae_fast.config import DataConfig
from crossmae_fast.data.media import MediaError
from crossmae_fast.eval import overlay
from crossmae_fast.eval.metrics import localization_map
from crossmae_fast.eval.probe import ProbeHeads
from crossmae_fast.eval.video import UserClip, Window, crop_box, read_clip, window_frames
from crossmae_fast.files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class ClipResult:
    """The model's view of one video: features and maps."""

    audio: torch.Tensor  # [D] L2-normalised global audio feature
    visual: torch.Tensor  # [F, D] L2-normalised global visual feature of each sampled frame
    maps: torch.Tensor  # [F, S, S] cosine maps (zero-shot or probe)


@torch.no_grad()
def clip_maps(model: torch.nn.Module, clips: Sequence[UserClip], heads: Sequence[ProbeHeads] = ()
              ) -> list[ClipResult]:
    """Features and maps of `clips`, in one forward pass of each encoder (on the model's device)."""
    cfg = model.cfg
    dev = next(model.parameters()).device
    frames = clips[0].images.shape[0]
    audio = torch.stack([c.audio for c in clips]).to(dev, non_blocking=True)
    images = torch.cat([c.images for c in clips]).to(dev, non_blocking=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    with amp:
        a_tokens, _ = model.encode(audio=audio)
        _, v_tokens = model.encode(image=images)
    a = F.normalize(a_tokens[:, 0].float(), dim=-1).repeat_interleave(frames, 0)  # one per frame
    v = F.normalize(v_tokens[:, 0].float(), dim=-1)
    patches = v_tokens[:, 1:].float()
    if heads:
        maps = torch.stack([localization_map(*h.to(dev)(a, patches), cfg.image_grid, cfg.image_size)
                            for h in heads]).mean(0)
    else:
        maps = localization_map(a, patches, cfg.image_grid, cfg.image_size)
    maps, v = maps.unflatten(0, (len(clips), frames)).cpu(), v.unflatten(0, (len(clips), frames)).cpu()
    return [ClipResult(a[i * frames].cpu(), v[i], maps[i]) for i in range(len(clips))]


def peak(m: torch.Tensor, size: tuple[int, int]) -> list[float]:
    """The map's maximum as (x, y) in [0, 1] of the whole frame of `size` (w, h) (the map covers its
    centre square)."""
    s = m.shape[-1]
    y, x = divmod(int(m.flatten().argmax()), s)
    left, top, right, bottom = crop_box(size)
    return [round((left + (x + 0.5) / s * (right - left)) / size[0], 4),
            round((top + (y + 0.5) / s * (bottom - top)) / size[1], 4)]


def write_outputs(clip: UserClip, result: ClipResult, folder: Path, kind: str, embed: bool) -> list[Path]:
    """The pictures, the MP4, the JSON summary and (with `embed`) the embeddings of one video."""
    heat = overlay.heat_layers(result.maps, min(clip.display_size))
    paths = overlay.write_frame_pngs(clip.display, heat, folder)
    paths.append(overlay.write_overview(clip.display, heat, clip.times, folder / "heatmaps.png",
                                        f"{clip.path.name} ({kind} map)"))
    paths.append(overlay.write_overlay_mp4(folder / "overlay.mp4", window_frames(clip.path, clip.window), heat,
                                           clip.sampled, clip.display_size, clip.fps, clip.sound, clip.sound_rate))
    summary = {
        "video": str(clip.path), "map": kind, "window": {"start": clip.window.start, "seconds": clip.window.seconds},
        "audio_seconds": round(clip.audio_seconds, 3), "frames_in_window": clip.total,
        "frames": [{"index": i, "time": round(t, 3), "peak_xy": peak(m, clip.display_size)}
                   for i, (t, m) in enumerate(zip(clip.times, result.maps))],
    }
    atomic_write(folder / "localization.json", json.dumps(summary, indent=1) + "\n")
    paths.append(folder / "localization.json")
    if embed:
        path = folder / "embeddings.npz"
        atomic_write(path, lambda f: np.savez(f, audio=result.audio.numpy(), visual=result.visual.numpy(),
                                              times=np.asarray(clip.times, np.float32)))
        paths.append(path)
    return paths


def folder_names(videos: Sequence[Path]) -> list[str]:
    """One output folder name per video: its file name without the suffix, made unique."""
    names, seen = [], {}
    for v in videos:
        base = v.stem or "video"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def error_line(path: Path, e: Exception) -> str:
    """One line naming the file for a video that cannot be used."""
    if isinstance(e, MediaError):
        if e.reason in ("unreadable", "empty"):
            return f"{path}: not a video file PyAV can read ({e.reason})"
        if e.reason == "missing":
            return f"{path}: no such file"
        return e.detail if e.detail.startswith(str(path)) else f"{path}: {e.detail}"
    if isinstance(e, OSError):  # an output that cannot be written: the file and the system's reason
        return f"{path}: {files.error_line(e)}"
    return f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def localize(model: torch.nn.Module, videos: Sequence[str | Path], out: str | Path, data: DataConfig,
             window: Window | None = None, heads: Sequence[ProbeHeads] = (), embed: bool = False,
             batch_size: int = 32, workers: int = 2, report: Callable[[str], None] = print,
             ) -> tuple[dict[str, Path], dict[str, str]]:
    """Maps for every video; returns ({video: its output folder}, {video: error line}). `report`
    receives one progress line per video."""
    model.eval()
    window = window or Window()
    videos = [Path(v) for v in videos]
    folders = dict(zip(videos, (Path(out) / n for n in folder_names(videos))))
    kind = f"probe ({len(heads)} heads)" if heads else "zero-shot"
    done, failed = {}, {}
    t0 = time.perf_counter()

    def decode(path: Path) -> UserClip | Exception:
        try:
            return read_clip(path, data, window)
        except (MediaError, OSError, ValueError) as e:
            return e

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(videos), batch_size):
            chunk = videos[start:start + batch_size]
            decoded = list(pool.map(decode, chunk))
            good = [(p, c) for p, c in zip(chunk, decoded) if isinstance(c, UserClip)]
            for p, c in zip(chunk, decoded):
                if not isinstance(c, UserClip):
                    failed[str(p)] = error_line(p, c)
            results = clip_maps(model, [c for _, c in good], heads) if good else []
            for (p, clip), res in zip(good, results):
                try:
                    write_outputs(clip, res, folders[p], kind, embed)
                except (MediaError, OSError, ValueError) as e:
                    failed[str(p)] = error_line(p, e)
                    continue
                done[str(p)] = folders[p]
                report(f"[{len(done) + len(failed)}/{len(videos)}] {p} -> {folders[p]} "
                       f"({time.perf_counter() - t0:.1f} s)")
    return done, failed
