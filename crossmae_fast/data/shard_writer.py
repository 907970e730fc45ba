"""Write a manifest's clips into webdataset tar shards (layout: `crossmae_fast.data.shards`).

Clips are shuffled once (seeded) and cut into shards of `clips_per_shard`; each clip's audio and
frames are read and decoded by a pool of worker processes before they are written (a clip that fails
is listed in `failures.jsonl` and left out). Each shard is written to a temporary file, renamed, and
followed by its index and a marker in `.done/`; a re-run with the same manifest and settings skips
the shards whose marker, tar and index are there, so an interrupted run resumes. `shards.json` is
written last, atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from crossmae_fast.config import NUM_FRAMES
from crossmae_fast.data.manifest import PATH_FIELDS, frame_path, read_manifest, write_manifest
from crossmae_fast.data.media import MediaError, read_audio, require
from crossmae_fast.data.normalisation import STATS_KEY, read_stats
from crossmae_fast.data.shards import FORMAT, index_text, tar_members
from crossmae_fast.files import atomic_write

log = logging.getLogger("crossmae_fast.data")
LABEL_CSV = "class_labels_indices.csv"
MTIME = 0  # fixed member times: the same clips give the same bytes


@dataclass
class ShardSummary:
    shards: int = 0
    written: int = 0
    already: int = 0
    clips: int = 0
    failed: int = 0
    seconds: float = 0.0
    manifest: str = ""
    failures: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"shard: {self.clips} clips in {self.shards} shards ({self.written} written, {self.already} "
                f"already done), {self.failed} clips failed and left out, in {self.seconds:.1f} s\n"
                f"shard manifest: {self.manifest}")


def clip_key(video_id: str, row: int, taken: set[str]) -> str:
    """A tar key for the clip: its id with every character but letters, digits, '_' and '-' replaced
    (DALI and webdataset split member names at the first dot; the index is space-separated), made
    unique with the row number."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", video_id)[:80] or "clip"
    if key in taken:
        key = f"{key}_{row}"
    taken.add(key)
    return key


def load_clip(job: tuple[int, dict, dict, int]) -> tuple[int, dict | None, str]:
    """(row, webdataset sample, "") for a clip whose audio and frames decode, else (row, None, reason)."""
    row, resolved, source, frames = job
    try:
        audio_path = resolved["wav"]
        ext = Path(audio_path).suffix.lower().lstrip(".")
        if ext not in ("flac", "wav", "ogg"):
            raise MediaError("audio_format", f"{audio_path}: stored audio must be FLAC, WAV or OGG")
        read_audio(audio_path)  # decodes, or raises MediaError
        sample = {ext: Path(audio_path).read_bytes()}
        for i in range(frames):
            path = frame_path(resolved, i)
            with Image.open(path) as im:
                im.load()
                size = list(im.size)
            sample[f"f{i}.jpg"] = Path(path).read_bytes()
    except (OSError, ValueError) as e:
        return row, None, f"{type(e).__name__}: {e}"
    sample["json"] = json.dumps({**source, "row": row}, sort_keys=True).encode()
    sample["__size__"] = size  # the frames' [width, height], for shards.json (not a tar member)
    return row, sample, ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(out: Path, name: str, samples: list[tuple[str, dict]]) -> dict:
    """Write one tar (temporary name, renamed), then its index; return its shards.json entry."""
    wds = require("webdataset")
    tar, idx = out / f"{name}.tar", out / f"{name}.idx"

    def write_tar(f) -> None:
        with wds.TarWriter(f, encoder=False, mtime=MTIME) as w:  # leaves `f` open for atomic_write's fsync
            for key, sample in samples:
                w.write({"__key__": key, **sample})

    atomic_write(tar, write_tar)
    text = index_text(tar_members(tar))
    atomic_write(idx, lambda f: f.write(text.encode()))
    return {"tar": tar.name, "index": idx.name, "samples": len(samples), "bytes": tar.stat().st_size,
            "sha256": _sha256(tar)}


def _plan(n: int, clips_per_shard: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + clips_per_shard] for i in range(0, n, clips_per_shard)]


def write_shards(manifest: str | os.PathLike, out: str | os.PathLike, *, clips_per_shard: int = 1000,
                 processes: int = 0, seed: int = 0, name: str | None = None, frames: int = NUM_FRAMES,
                 labels: str | os.PathLike | None = None, progress: bool = True) -> ShardSummary:
    """Write the clips of `manifest` as shards into `out`; see the module docstring."""
    if clips_per_shard < 1 or processes < 0 or seed < 0 or not 1 <= frames <= NUM_FRAMES:
        raise ValueError(f"need clips_per_shard >= 1, processes >= 0, seed >= 0 and 1 <= frames <= {NUM_FRAMES}")
    t0, manifest, out = time.perf_counter(), Path(manifest), Path(out)
    name = name or manifest.stem
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"shard name {name!r}: use letters, digits, '_' and '-' only")
    resolved, source = read_manifest(manifest), read_manifest(manifest, resolve=False)
    if not resolved:
        raise ValueError(f"{manifest}: no clips")
    settings = {"manifest": str(manifest.resolve()), "clips": len(resolved), "clips_per_shard": clips_per_shard,
                "seed": seed, "frames": frames, "name": name}
    (out / ".done").mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    keys = [clip_key(r["video_id"], i, taken) for i, r in enumerate(resolved)]
    plan = _plan(len(resolved), clips_per_shard, seed)
    summary = ShardSummary(shards=len(plan))
    entries, placed = [], {}
    bar = _progress(len(resolved), progress)
    with multiprocessing.get_context("fork").Pool(processes or os.cpu_count() or 1) as pool:
        for s, rows in enumerate(plan):
            shard = f"{name}-{s:06d}"
            marker = out / ".done" / f"{shard}.json"
            done = json.loads(marker.read_text()) if marker.exists() else None
            if not (done and done["settings"] == settings and (out / f"{shard}.tar").exists()
                    and (out / f"{shard}.idx").exists()):
                jobs = [(int(r), resolved[r], source[r], frames) for r in rows]
                loaded = list(pool.imap(load_clip, jobs, chunksize=4))
                sizes = {r: sample.pop("__size__") for r, sample, _ in loaded if sample is not None}
                kept = [(keys[r], sample) for r, sample, _ in loaded if sample is not None]
                failed = [{"row": r, "video_id": resolved[r]["video_id"], "error": why}
                          for r, sample, why in loaded if sample is None]
                done = {"settings": settings, "entry": _write_shard(out, shard, kept),
                        "rows": sorted(sizes), "sizes": [sizes[r] for r in sorted(sizes)], "failures": failed}
                atomic_write(marker, lambda f, d=done: f.write(json.dumps(d).encode()))
                summary.written += 1
            else:
                summary.already += 1
            entries.append(done["entry"])
            placed.update({r: (s, size) for r, size in zip(done["rows"], done["sizes"])})
            summary.failures += done["failures"]
            bar.update(len(rows))
    bar.close()
    return _finish(out, manifest, source, keys, placed, entries, summary, labels, t0)


def _finish(out: Path, manifest: Path, source: list[dict], keys: list[str], placed: dict, entries: list[dict],
            summary: ShardSummary, labels, t0: float) -> ShardSummary:
    """failures.jsonl, the label CSV and shards.json (rows in the source order, failed ones left out)."""
    atomic_write(out / "failures.jsonl",
                 lambda f: f.write("".join(json.dumps(x) + "\n" for x in summary.failures).encode()))
    labels = Path(labels) if labels else manifest.parent / LABEL_CSV
    extra = {"format": FORMAT, "version": 1, "shards": entries, "source": str(manifest.resolve()),
             "failures": len(summary.failures)}
    if labels.is_file():
        shutil.copyfile(labels, out / LABEL_CSV)
        extra["label_csv"] = LABEL_CSV
    stats = read_stats(manifest)
    if stats:
        extra[STATS_KEY] = stats
    rows = []
    for r in sorted(placed):
        shard, size = placed[r]
        row = {k: v for k, v in source[r].items() if k not in PATH_FIELDS}
        tar = entries[shard]["tar"]
        rows.append({**row, "wav": tar, "video_path": tar, "shard": shard, "key": keys[r], "frame_size": size})
    path = write_manifest(out / "shards.json", rows, **extra)
    summary.clips, summary.failed = len(rows), len(summary.failures)
    summary.manifest, summary.seconds = str(path), time.perf_counter() - t0
    if summary.failed:
        log.warning("shard: %d clips failed and were left out (%s)", summary.failed, out / "failures.jsonl")
    return summary


def _progress(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="clip", desc="shard", disable=not show)


def verify_shards(path: str | os.PathLike) -> list[str]:
    """Problems of a shard folder (empty: sound): each tar's size and SHA-256 against `shards.json`, and
    its members' headers against its index (a copy that was cut short or altered shows here)."""
    from crossmae_fast.data.shards import is_shard_manifest, read_document

    path = Path(path)
    doc = read_document(path)
    if not is_shard_manifest(doc):
        return [f"{path}: not a shard manifest"]
    problems = []
    for entry in doc.get("shards") or []:
        tar, idx = path.parent / entry["tar"], path.parent / entry["index"]
        if not tar.is_file() or not idx.is_file():
            problems.append(f"{entry['tar']}: {'tar' if not tar.is_file() else 'index'} missing")
            continue
        if tar.stat().st_size != entry.get("bytes") or _sha256(tar) != entry.get("sha256"):
            problems.append(f"{entry['tar']}: size or SHA-256 differs from shards.json")
            continue
        if index_text(tar_members(tar)) != idx.read_text():
            problems.append(f"{entry['index']}: does not match its tar")
    return problems
