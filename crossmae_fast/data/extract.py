"""Turn a folder (or CSV) of videos into a CAV-MAE style prepared set (`python -m crossmae_fast.prepare`).

SRC is a folder searched recursively for video files, or a CSV with a `path` column (and optional
`labels`, `video_id` columns; without a header: path, labels). Relative CSV paths are relative to the
CSV. Per clip this writes, under DIR:

- `audio/{video_id}.wav` (or `.flac`): the first audio stream, 16 kHz mono 16-bit (PyAV decode,
  resample, channel mean);
- `frames/frame_{i}/{video_id}.jpg`: frames `int(i * total / frames)` of the first video stream
  (`total` = the container's frame count, else the number of video packets), short side resized to
  `image_size` (bicubic) and centre-cropped, as the loaders do;
- `done/{video_id}.json`: the clip's manifest row and settings, written last: a re-run skips clips
  whose marker matches the settings and whose outputs exist, and redoes the rest.

A clip's `video_id` is its path relative to SRC (a CSV's folder), folders joined by `__`, without the
suffix (`a/b/real.mp4` -> `a__b__real`; a file at the top keeps its stem), or a CSV's `video_id`
column (a CSV's file outside its folder: the stem). It depends on that path alone, so adding files
never renames a prepared clip.

At the end `manifest.json` (`{"data": [...]}`, paths relative to DIR, `"video"` = the absolute
source path) and `failures.jsonl` (one `{"path", "video_id", "reason", "detail"}` per failed clip of
this run) are written atomically. Failure reasons: missing, unreadable (cannot be opened: not a media
file, no index), no_video, no_audio, empty (no frames or samples), truncated (fewer frames or much
less audio than the container declares), corrupt (a decode error), error (anything else). A failed
clip never stops the run. Folder input carries no labels (`"labels": ""`); use a CSV for labels.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from crossmae_fast.config import NUM_FRAMES, SAMPLE_RATE
from crossmae_fast.data.manifest import frame_path, write_manifest
from crossmae_fast.data.media import (
    MediaError,
    frame_indices,
    open_media,
    require,
    resample_mono,
    resize_center_crop,
    save_jpeg,
    write_audio,
)
from crossmae_fast.data.normalisation import STATS_KEY, fbank_stats
from crossmae_fast.files import atomic_write

VIDEO_SUFFIXES = frozenset(
    ".mp4 .m4v .mkv .webm .avi .mov .mpg .mpeg .flv .wmv .3gp .ts .mts .ogv".split()
)


@dataclass(frozen=True)
class Clip:
    path: str
    video_id: str
    labels: str = ""


@dataclass(frozen=True)
class Settings:
    """What a finished clip depends on; a marker with other settings makes the clip redone."""

    frames: int = NUM_FRAMES
    image_size: int = 224
    audio_format: str = "wav"
    sample_rate: int = SAMPLE_RATE


@dataclass
class Summary:
    done: int = 0
    already: int = 0
    failed: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    manifest: str = ""
    failures: str = ""

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.failed.items()))
        return (
            f"prepare: {self.done} done, {self.already} already done, {sum(self.failed.values())} failed"
            + (f" ({reasons})" if reasons else "")
            + f" in {self.seconds:.1f} s\nmanifest: {self.manifest} ({self.done + self.already} clips)"
            + f"\nfailures: {self.failures}"
        )


def find_clips(src: str | os.PathLike) -> list[Clip]:
    """Clips of a folder (recursive, video suffixes, sorted) or of a CSV, with unique video ids."""
    src = Path(src)
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        entries = [(p, "", None) for p in paths]
        root = src
    elif src.is_file():
        entries, root = _read_csv(src), src.parent
    else:
        raise FileNotFoundError(f"{src}: no such folder or CSV file")
    ids = _unique_ids([(p, vid) for p, _, vid in entries], root)
    return [Clip(str(p.resolve()), vid, labels) for (p, labels, _), vid in zip(entries, ids)]


def _read_csv(path: Path) -> list[tuple[Path, str, str | None]]:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0]]
    if "path" in head:
        col = {k: head.index(k) for k in ("path", "labels", "label", "video_id") if k in head}
        col.setdefault("labels", col.get("label"))
        rows = rows[1:]
    else:
        col = {"path": 0, "labels": 1 if len(rows[0]) > 1 else None}

    def cell(r: list[str], k: str) -> str:
        i = col.get(k)
        return r[i].strip() if i is not None and i < len(r) else ""

    out = []
    for r in rows:
        p = Path(cell(r, "path")).expanduser()
        p = p if p.is_absolute() else path.parent / p
        out.append((p, cell(r, "labels"), cell(r, "video_id") or None))
    return out


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _unique_ids(entries: list[tuple[Path, str | None]], root: Path) -> list[str]:
    """Ids from the path relative to `root` (SRC, or a CSV's folder; the stem for a CSV's file outside
    it), folders joined by `__`, suffix dropped, safe characters only: `a/b/real.mp4` -> `a__b__real`.
    An id depends on its own path only, so it stays the same as the folder grows. A CSV's `video_id`
    wins. Paths that still collide (`x.mp4` beside `x.mkv`) take their suffix (`x_mkv`), then a counter."""
    ids = [_clean(given) if given else _path_id(p, root) for p, given in entries]
    counts = Counter(ids)
    for j, (p, given) in enumerate(entries):
        if counts[ids[j]] > 1 and not given and p.suffix:
            ids[j] = f"{ids[j]}_{_clean(p.suffix[1:])}"
    seen: Counter = Counter()
    for j, vid in enumerate(ids):
        seen[vid] += 1
        if seen[vid] > 1:
            ids[j] = f"{vid}_{seen[vid] - 1}"
    return ids


def _path_id(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(path.name)
    return _clean("__".join(rel.with_suffix("").parts))


def _row(clip: Clip, s: Settings) -> dict:
    return {
        "video_id": clip.video_id,
        "wav": f"audio/{clip.video_id}.{s.audio_format}",
        "video_path": "frames",
        "labels": clip.labels,
        "video": clip.path,
    }


def extract(clip: Clip, s: Settings, out: Path, threads: int = 0) -> dict:
    """Write one clip's audio and frames under `out`; return its manifest row. Raises `MediaError`."""
    av = require("av")
    with open_media(clip.path) as c:
        if not c.streams.video:
            raise MediaError("no_video", f"{clip.path} has no video stream")
        if not c.streams.audio:
            raise MediaError("no_audio", f"{clip.path} has no audio stream")
        vs, aus = c.streams.video[0], c.streams.audio[0]
        declared = float(aus.duration * aus.time_base) if aus.duration else 0.0
        packets, reached = 0, 0.0

        def audio_frames():
            nonlocal packets, reached
            for packet in c.demux(aus, vs):
                if packet.stream is vs:
                    packets += packet.size > 0
                else:
                    if packet.pts is not None:
                        reached = float(packet.pts * packet.time_base)
                    yield from packet.decode()

        try:
            audio = resample_mono(audio_frames(), s.sample_rate)
        except av.FFmpegError as e:
            if reached < 0.9 * declared:
                raise MediaError(
                    "truncated", f"audio decode failed at {reached:.2f} s of {declared:.2f} s: {e}"
                ) from e
            raise MediaError("corrupt", f"audio decode: {e}") from e
        total = vs.frames or packets
    if audio.size == 0 or total == 0:
        raise MediaError("empty", f"{audio.size} audio samples, {total} video frames")
    if audio.size < 0.9 * declared * s.sample_rate:
        raise MediaError("truncated", f"decoded {audio.size / s.sample_rate:.2f} s of {declared:.2f} s audio")

    wanted: dict[int, list[int]] = {}
    for i, k in enumerate(frame_indices(total, s.frames)):
        wanted.setdefault(k, []).append(i)
    row = _row(clip, s)
    decoded = 0
    with open_media(clip.path) as c:
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        vs.codec_context.thread_count = threads
        try:
            for k, frame in enumerate(c.decode(vs)):
                decoded = k + 1
                if k in wanted:
                    img = resize_center_crop(frame.to_image(), s.image_size)
                    for i in wanted.pop(k):
                        save_jpeg(img, out / frame_path(row, i))
                if not wanted:
                    break
        except av.FFmpegError as e:
            raise MediaError("corrupt", f"video decode at frame {decoded}: {e}") from e
    if wanted:
        raise MediaError("truncated", f"decoded {decoded} of {total} declared video frames")
    write_audio(out / row["wav"], audio, s.sample_rate)
    return row


def _outputs(row: dict, s: Settings, out: Path) -> list[Path]:
    return [out / row["wav"]] + [out / frame_path(row, i) for i in range(s.frames)]


def _source_stamp(clip: Clip) -> list[int]:
    st = os.stat(clip.path)
    return [st.st_size, st.st_mtime_ns]


def finished(clip: Clip, s: Settings, out: Path) -> dict | None:
    """The manifest row of a clip finished earlier from the same file with the same settings, else None."""
    try:
        marker = json.loads((out / "done" / f"{clip.video_id}.json").read_text())
        same = marker["settings"] == asdict(s) and marker["source"] == [clip.path, *_source_stamp(clip)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    row = _row(clip, s)
    return row if same and all(p.is_file() for p in _outputs(row, s, out)) else None


def _work(job: tuple[Clip, Settings, str, int]) -> tuple[Clip, dict | None, str, str]:
    """Process one clip: (clip, row or None, failure reason, detail). Never raises."""
    clip, s, out_s, threads = job
    out = Path(out_s)
    try:
        stamp = _source_stamp(clip)
        row = extract(clip, s, out, threads)
    except Exception as e:  # one bad file must not stop the run
        for p in _outputs(_row(clip, s), s, out):  # partial outputs of this clip
            p.unlink(missing_ok=True)
        if isinstance(e, MediaError):
            return clip, None, e.reason, e.detail
        if isinstance(e, FileNotFoundError):
            return clip, None, "missing", f"{clip.path}: no such file"
        return clip, None, "error", f"{type(e).__name__}: {e}"
    marker = out / "done" / f"{clip.video_id}.json"
    atomic_write(marker, json.dumps({"source": [clip.path, *stamp], "settings": asdict(s), "row": row}))
    return clip, row, "", ""


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    frames: int = NUM_FRAMES,
    processes: int = 1,
    audio_format: str = "wav",
    image_size: int = 224,
    sample_rate: int = SAMPLE_RATE,
    progress: bool = True,
) -> Summary:
    """Prepare every clip of `src` into `out` (see the module docstring); returns the summary."""
    if audio_format not in ("wav", "flac"):
        raise ValueError(f"audio_format={audio_format!r} must be 'wav' or 'flac'")
    if frames < 1 or image_size < 1:
        raise ValueError(f"frames={frames} and image_size={image_size} must be positive")
    t0 = time.perf_counter()
    s = Settings(frames, image_size, audio_format, sample_rate)
    out = Path(out)
    clips = find_clips(src)
    for d in ["audio", "done"] + [f"frames/frame_{i}" for i in range(frames)]:
        (out / d).mkdir(parents=True, exist_ok=True)

    summary = Summary(manifest=str(out / "manifest.json"), failures=str(out / "failures.jsonl"))
    rows: dict[str, dict] = {}
    todo = []
    for clip in clips:
        row = finished(clip, s, out)
        if row is None:
            todo.append(clip)
        else:
            rows[clip.video_id] = row
    summary.already = len(rows)

    failures = []
    threads = 0 if processes <= 1 else 1
    jobs = [(c, s, str(out), threads) for c in todo]
    pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(processes) \
        if processes > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap_unordered(_work, jobs) if pool else map(_work, jobs)
        bar = tqdm(results, total=len(jobs), unit="clip", disable=not progress, file=sys.stderr)
        for clip, row, reason, detail in bar:
            if row is None:
                failures.append(
                    {"path": clip.path, "video_id": clip.video_id, "reason": reason, "detail": detail}
                )
                summary.failed[reason] += 1
                bar.set_postfix(failed=len(failures), refresh=False)
            else:
                rows[clip.video_id] = row
                summary.done += 1
    finally:
        if pool:
            pool.terminate()
            pool.join()

    kept = [rows[c.video_id] for c in clips if c.video_id in rows]
    stats = fbank_stats([out / r["wav"] for r in kept], split="all") if kept else None
    write_manifest(out / "manifest.json", kept, **({STATS_KEY: stats} if stats else {}))
    order = {c.video_id: j for j, c in enumerate(clips)}
    failures.sort(key=lambda f: order[f["video_id"]])
    atomic_write(out / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
    summary.seconds = time.perf_counter() - t0
    return summary
