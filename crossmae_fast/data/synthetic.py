"""Synthetic audio-visual set (docs/design.md section 6), written as real media files.

    python -m crossmae_fast.synth --out DIR --clips N --seed S [--video] [--seconds 4]
        [--image-size 224] [--eval-fraction 0.25]

Generative rule, per clip (clip `j` draws from `numpy.random.default_rng([seed, j, ...])`, so a
clip does not depend on the number of clips, and the same seed gives the same bytes):

- Classes: 16 = 4 shapes (circle, square, triangle, cross) x 4 colours (red, green, blue, yellow),
  named `colour_shape`, e.g. `red_circle`.
- Picture (`image_size` square): a grey background with a smooth random colour field, faint
  random stripes and per-frame Gaussian pixel noise (sigma 6/255); 2 or 3 objects of distinct
  classes, radius 9-14 % of the side (each shape fills its square box `centre +- radius`), placed
  uniformly with non-overlapping boxes where possible (rejection sampling). Objects do not move:
  frames differ only in pixel noise, so the box holds for every frame.
- Sound: one object, chosen uniformly, is the sounding one. Its audio is a tone of fundamental
  `f = F0[shape] * 2 ** (0.5 * (x - 0.5))`, where `x` in [0, 1] is the object's horizontal centre
  (half an octave from left to right) and F0 = circle 200, square 300, triangle 450, cross 675 Hz
  (steps of 1.5x, so the shapes' pitch bands do not overlap). The colour sets the timbre: red,
  harmonics 1-8 at 1/k (bright, steady); green, odd harmonics 1-7 at 1/k with 6 Hz tremolo;
  blue, harmonics 1-2 (1, 0.3) with 5 Hz vibrato of +-3 %; yellow, harmonics 1-4 at 1/k^2 gated
  on and off at 4 Hz. Modulation rates vary +-10 % per clip. The fundamental is the strongest
  partial in every class. The tone is peak-normalised to a gain of 0.3-0.7 and white noise is added
  at 10-20 dB SNR. Audio: `seconds` long, 16 kHz mono 16-bit WAV.
- Files: `frames/frame_{i}/{id}.jpg` (10 frames, JPEG quality 90), `audio/{id}.wav`, with
  `--video` also `video/{id}.webm` (VP9, 10 fps, `seconds` long, no audio); JPEG frame `i` is video
  frame `int(i * total / 10)`, the loaders' frame rule.
- Manifests `train.json` and `eval.json` (the last `round(clips * eval_fraction)` clips), CAV-MAE
  rows with `labels` = the sounding class, `bbox` = `[[x0, y0, x1, y1]]` of the sounding object
  (normalised), `objects` = every object's label and box, and `video` with `--video`. Also
  `class_labels_indices.csv` (CAV-MAE's `index,mid,display_name`), `synth.json` (parameters and
  chance levels) and `README.txt` (this rule and the chance levels).

Chance levels: sounding class 1/16; retrieval R@K = K / (clips in the split); picking one of the
visible objects at random hits the sounding one with probability mean(1/k); a random map binarised
at its median scores an expected cIoU of about A / (1 + A) for box area fraction A.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image

from crossmae_fast.config import NUM_FRAMES, SAMPLE_RATE, SYNTH_SECONDS
from crossmae_fast.data.manifest import frame_path, write_manifest
from crossmae_fast.data.media import frame_indices, require, save_jpeg, write_audio
from crossmae_fast.data.normalisation import STATS_KEY, fbank_stats

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 50, 50), "green": (50, 190, 70), "blue": (50, 90, 230), "yellow": (235, 205, 50)}
CLASSES = tuple(f"{c}_{s}" for s in SHAPES for c in COLOURS)
F0 = {"circle": 200.0, "square": 300.0, "triangle": 450.0, "cross": 675.0}
PITCH_OCTAVES = 0.5  # fundamental shift from the left edge to the right edge
VIDEO_FPS = 10
RADIUS = (0.09, 0.14)  # object radius as a fraction of the image side
NOISE_STD = 6.0  # per-frame pixel noise, 0-255 scale
# Gaussian pixel noise by table look-up of uniform bytes (normal quantiles): 5x faster than sampling.
_NOISE_TABLE = np.round([NOISE_STD * NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)]).astype(
    np.int16
)


def pitch(label: str, x: float) -> float:
    """Fundamental (Hz) of class `label` sounding at horizontal centre `x` in [0, 1]."""
    return F0[label.split("_")[1]] * 2.0 ** (PITCH_OCTAVES * (x - 0.5))


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels of a shape of radius `r` at offsets (dx, dy) from its centre; fills the box +- r."""
    ax, ay = np.abs(dx), np.abs(dy)
    inside = (ax <= r) & (ay <= r)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return inside
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return inside & (ax <= (dy + r) / 2)
    return inside & ((ax <= r / 3) | (ay <= r / 3))  # cross


def _layout(rng: np.random.Generator, size: int) -> list[dict]:
    """2-3 objects of distinct classes with boxes that do not overlap where possible."""
    k = int(rng.integers(2, 4))
    labels = [CLASSES[c] for c in rng.choice(len(CLASSES), k, replace=False)]
    objects: list[dict] = []
    for label in labels:
        r = max(2.0, float(rng.uniform(*RADIUS)) * size)
        for _ in range(50):
            cx, cy = rng.uniform(r, size - r, 2)
            if all(max(abs(cx - o["cx"]) - r - o["r"], abs(cy - o["cy"]) - r - o["r"]) >= 1 for o in objects):
                break
        objects.append({"label": label, "cx": float(cx), "cy": float(cy), "r": r})
    return objects


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey base + smooth colour field (bilinear from a 4x4 grid) + faint stripes, float32 HxWx3."""
    g = 4
    grid = rng.normal(0.0, 25.0, (g, g, 3))
    pos = (np.arange(size) + 0.5) * (g - 1) / size
    lo = np.minimum(pos.astype(int), g - 2)
    w = (pos - lo)[:, None]
    interp = np.zeros((size, g))
    interp[np.arange(size), lo] = 1 - w[:, 0]
    interp[np.arange(size), lo + 1] = w[:, 0]
    field = np.stack([interp @ grid[..., c] @ interp.T for c in range(3)], axis=-1)
    theta, period = rng.uniform(0, np.pi), rng.uniform(0.05, 0.2) * size
    c = np.arange(size, dtype=np.float32) + 0.5
    stripes = 8.0 * np.sin((2 * np.pi / period) * (c[None, :] * np.cos(theta) + c[:, None] * np.sin(theta)))
    return (rng.uniform(90, 160) + field + stripes[..., None]).astype(np.float32)


def _picture(rng: np.random.Generator, objects: list[dict], size: int) -> np.ndarray:
    img = _background(rng, size)
    c = np.arange(size, dtype=np.float32) + 0.5
    for o in objects:
        colour, shape = o["label"].split("_")
        mask = _shape_mask(shape, c[None, :] - o["cx"], c[:, None] - o["cy"], o["r"])
        img[mask] = np.asarray(COLOURS[colour], np.float32) + rng.uniform(-15, 15)
    return img


def _sound(rng: np.random.Generator, label: str, x: float, seconds: float) -> np.ndarray:
    """Class timbre at the position's pitch, plus white noise; float32 mono at SAMPLE_RATE."""
    colour = label.split("_")[0]
    n = max(1, round(seconds * SAMPLE_RATE))
    t = np.arange(n, dtype=np.float32) / np.float32(SAMPLE_RATE)
    f = pitch(label, x)
    rate = 2 * np.pi * rng.uniform(0.9, 1.1)  # modulation rates below are in Hz times this
    cycles = ((np.arange(n) * (f / SAMPLE_RATE)) % 1.0).astype(np.float32)  # float64 before the wrap
    env = np.ones(n, np.float32)
    if colour == "red":
        partials = {k: 1 / k for k in range(1, 9)}
    elif colour == "green":
        partials = {k: 1 / k for k in (1, 3, 5, 7)}
        env *= 1 - 0.7 * (0.5 + 0.5 * np.sin(6 * rate * t))
    elif colour == "blue":  # vibrato: instantaneous frequency f * (1 + 0.03 sin(w t)), integrated
        partials = {1: 1.0, 2: 0.3}
        cycles -= (0.03 * f / (5 * rate)) * np.cos(5 * rate * t)
    else:
        partials = {k: 1 / k**2 for k in range(1, 5)}
        gate = np.sin(4 * rate * t + np.float32(rng.uniform(0, 2 * np.pi)))
        env *= np.clip(gate * 4 + 0.5, 0, 1)  # on/off at 4 Hz with ~5 ms ramps
    phase = np.float32(2 * np.pi) * cycles
    offsets = rng.uniform(0, 2 * np.pi, len(partials)).astype(np.float32)
    tone = sum(np.float32(a) * np.sin(k * phase + p) for (k, a), p in zip(partials.items(), offsets)
               if k * f < 7500)
    tone *= env * np.minimum(1, np.minimum(t, t[::-1]) / np.float32(0.01))  # 10 ms fades
    tone *= np.float32(rng.uniform(0.3, 0.7) / max(np.abs(tone).max(), 1e-9))
    snr_db = rng.uniform(10, 20)
    noise_std = np.sqrt(np.mean(tone**2) / 10 ** (snr_db / 10))
    return tone + np.float32(noise_std) * rng.standard_normal(n, dtype=np.float32)


def _box(o: dict, size: int) -> list[float]:
    return [round(float(np.clip(v / size, 0, 1)), 6) for v in
            (o["cx"] - o["r"], o["cy"] - o["r"], o["cx"] + o["r"], o["cy"] + o["r"])]


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    """VP9 webm, single-threaded and bit-exact so the same frames give the same bytes."""
    av = require("av")
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="webm", options={"fflags": "+bitexact"}) as out:
        vs = out.add_stream("libvpx-vp9", rate=VIDEO_FPS)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.thread_count = 1
        vs.codec_context.flags |= av.codec.context.Flags.bitexact
        vs.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"}
        for k, pix in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pix, format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, VIDEO_FPS)
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))


def make_clip(out: Path, seed: int, j: int, *, video: bool, seconds: float, image_size: int) -> dict:
    """Write clip `j` of the set with `seed`; return its manifest row."""
    rng = np.random.default_rng([seed, j, 0])
    objects = _layout(rng, image_size)
    base = _picture(rng, objects, image_size)
    sounding = objects[int(rng.integers(len(objects)))]
    x = sounding["cx"] / image_size
    audio = _sound(np.random.default_rng([seed, j, 1]), sounding["label"], x, seconds)

    vid = f"synth{j:06d}"
    row = {"video_id": vid, "wav": f"audio/{vid}.wav", "video_path": "frames", "labels": sounding["label"],
           "bbox": [_box(sounding, image_size)],
           "objects": [{"label": o["label"], "bbox": _box(o, image_size)} for o in objects]}
    write_audio(out / row["wav"], audio, SAMPLE_RATE)

    still = np.round(base).astype(np.int16)

    def frame(k: int) -> np.ndarray:  # video frame k: the still picture plus its own pixel noise
        u = np.random.default_rng([seed, j, 2, k]).integers(0, 256, base.shape, dtype=np.uint8)
        return np.clip(still + _NOISE_TABLE[u], 0, 255).astype(np.uint8)

    total = max(1, round(seconds * VIDEO_FPS))
    cache: dict[int, np.ndarray] = {}
    for i, k in enumerate(frame_indices(total, NUM_FRAMES)):
        cache[k] = cache[k] if k in cache else frame(k)
        save_jpeg(Image.fromarray(cache[k]), out / frame_path(row, i))
    if video:
        row["video"] = f"video/{vid}.webm"
        _write_video(out / row["video"], [cache[k] if k in cache else frame(k) for k in range(total)])
    return row


def chance_levels(rows: list[dict]) -> dict:
    """Chance scores of a split (see the module docstring)."""
    n = len(rows)
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for r in rows for b in r["bbox"]]
    return {
        "clips": n,
        "sounding_class_accuracy": round(1 / len(CLASSES), 6),
        "retrieval_recall_at": {str(k): round(min(1.0, k / n), 6) if n else None for k in (1, 5, 10)},
        "random_object_hit": round(float(np.mean([1 / len(r["objects"]) for r in rows])), 6) if n else None,
        "mean_box_area": round(float(np.mean(areas)), 6) if n else None,
        "random_map_ciou": round(float(np.mean([a / (1 + a) for a in areas])), 6) if n else None,
    }


def make_synthetic_set(
    out: str | Path,
    clips: int,
    seed: int,
    video: bool = False,
    seconds: float = SYNTH_SECONDS,
    image_size: int = 224,
    eval_fraction: float = 0.25,
    threads: int = 0,
) -> dict[str, Path]:
    """Write the synthetic set into `out`; returns {"train": path, "eval": path} of the manifests.
    `threads` writer threads (0: up to twice the CPU count, at most 8) do not change the bytes."""
    if clips < 1 or seed < 0 or seconds <= 0 or not 0 <= eval_fraction <= 1 or threads < 0:
        raise ValueError(
            f"need clips >= 1, seed >= 0, seconds > 0, 0 <= eval_fraction <= 1, threads >= 0; got clips={clips}, "
            f"seed={seed}, seconds={seconds}, eval_fraction={eval_fraction}, threads={threads}"
        )
    if image_size < 8 or (video and image_size % 2):
        raise ValueError(f"image_size={image_size} must be at least 8 (and even with video)")
    out = Path(out)
    for d in ["audio"] + [f"frames/frame_{i}" for i in range(NUM_FRAMES)] + (["video"] if video else []):
        (out / d).mkdir(parents=True, exist_ok=True)
    # Threads overlap file-system waits with numpy and JPEG work (both release the GIL); every clip
    # has its own random stream, so the result does not depend on the scheduling.
    with ThreadPoolExecutor(threads or max(1, min(8, 2 * (os.cpu_count() or 1)))) as pool:
        rows = list(pool.map(lambda j: make_clip(out, seed, j, video=video, seconds=seconds,
                                                 image_size=image_size), range(clips)))
    n_eval = round(clips * eval_fraction)
    if 0 < eval_fraction < 1 and clips >= 2:
        n_eval = min(clips - 1, max(1, n_eval))
    splits = {"train": rows[: clips - n_eval], "eval": rows[clips - n_eval:]}
    # the train split's fbank statistics, stored with both manifests (evaluation normalises as training)
    stats = fbank_stats([out / r["wav"] for r in splits["train"]]) if splits["train"] else None
    extra = {STATS_KEY: stats} if stats else {}
    paths = {name: write_manifest(out / f"{name}.json", split, **extra) for name, split in splits.items()}

    (out / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n" + "".join(f"{i},{c},{c}\n" for i, c in enumerate(CLASSES))
    )
    info = {
        "seed": seed, "clips": clips, "seconds": seconds, "image_size": image_size, "video": video,
        "sample_rate": SAMPLE_RATE, "frames": NUM_FRAMES, "video_fps": VIDEO_FPS, "classes": list(CLASSES),
        "f0_hz": F0, "pitch_octaves_across_width": PITCH_OCTAVES,
        "chance": {name: chance_levels(split) for name, split in splits.items()},
    }
    (out / "synth.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / "README.txt").write_text(
        "Synthetic audio-visual set written by crossmae_fast.synth.\n\nGenerative rule"
        + __doc__.split("Generative rule", 1)[1]
        + f"\nThis set: seed {seed}, {clips} clips ({len(splits['train'])} train, "
        f"{len(splits['eval'])} eval), "
        f"{seconds} s audio, {image_size} px frames{', VP9 video' if video else ''}.\n"
        f"Chance levels:\n{json.dumps(info['chance'], indent=1)}\n"
    )
    return paths


def cache_root() -> Path:
    """Where generated sets are kept: `$CROSSMAE_CACHE`, else `~/.cache/crossmae_fast`."""
    return Path(os.environ.get("CROSSMAE_CACHE", Path.home() / ".cache" / "crossmae_fast")).expanduser()


def cached_synthetic_set(
    clips: int,
    seed: int = 0,
    *,
    seconds: float = SYNTH_SECONDS,
    image_size: int = 224,
    video: bool = False,
    eval_fraction: float = 0.25,
    root: str | Path | None = None,
) -> dict[str, Path]:
    """Manifests of a synthetic set, generated once and reused: the one way the package, its tools and
    its tests get a synthetic set (`pretrain`'s default data should call this too).

    The set lives in `root` (default `cache_root()`) in a folder named for its parameters and this
    generator's source, so a changed generator never serves a stale set. It is written into a temporary
    sibling and renamed into place: concurrent callers (DDP ranks, parallel tests) and killed runs never
    see a half-written set; a caller that loses the race uses the winner's."""
    params = dict(clips=clips, seed=seed, seconds=seconds, image_size=image_size, video=video,
                  eval_fraction=eval_fraction)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode() + Path(__file__).read_bytes()).hexdigest()
    folder = Path(root if root is not None else cache_root()) / f"synth-{key[:12]}"
    paths = {"train": folder / "train.json", "eval": folder / "eval.json"}
    if all(p.is_file() for p in paths.values()):
        return paths
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make_synthetic_set(tmp, **params)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not all(p.is_file() for p in paths.values()):
            raise
    return paths
