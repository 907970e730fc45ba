"""CAV-MAE datafile manifests: read, validate, write.

Format (docs/design.md section 1): `{"data": [{"video_id", "wav", "video_path", "labels", "video"?, "bbox"?}]}`.
Frame `i` of a row is `video_path/frame_{i}/{video_id}.jpg`. `labels` is CAV-MAE's comma-separated
label string; `bbox` is a list of `[x0, y0, x1, y1]` boxes normalised to [0, 1]. Other keys are kept.
Relative paths are relative to the manifest's folder; `read_manifest` resolves them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from crossmae_fast.files import atomic_write

REQUIRED = ("video_id", "wav", "video_path", "labels")
PATH_FIELDS = ("wav", "video_path", "video")


class ManifestError(ValueError):
    """A manifest that does not follow the schema; the message names the row and field."""


def validate(manifest: object, source: str = "manifest") -> list[dict]:
    """Check the schema and return the rows; raise `ManifestError` naming row index and field."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("data"), list):
        raise ManifestError(f'{source}: expected an object with a "data" list of rows')
    rows = manifest["data"]
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: expected an object, got {type(row).__name__}")
        for key in REQUIRED:
            if key not in row:
                raise ManifestError(f"{where} field {key!r}: missing")
            if not isinstance(row[key], str):
                raise ManifestError(f"{where} field {key!r}: expected a string, got {row[key]!r}")
        for key in ("video_id", "wav", "video_path"):
            if not row[key]:
                raise ManifestError(f"{where} field {key!r}: empty")
        if "/" in row["video_id"] or "\\" in row["video_id"]:
            raise ManifestError(f"{where} field 'video_id': {row['video_id']!r} contains a path separator")
        if "video" in row and (not isinstance(row["video"], str) or not row["video"]):
            raise ManifestError(f"{where} field 'video': expected a non-empty string, got {row['video']!r}")
        if "bbox" in row:
            _check_boxes(row["bbox"], f"{where} field 'bbox'")
    return rows


def _check_boxes(boxes: object, where: str) -> None:
    if not isinstance(boxes, list) or not boxes:
        raise ManifestError(f"{where}: expected a non-empty list of [x0, y0, x1, y1] boxes, got {boxes!r}")
    for b in boxes:
        ok = isinstance(b, list) and len(b) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in b
        )
        if not ok:
            raise ManifestError(f"{where}: box {b!r} is not four numbers [x0, y0, x1, y1]")
        x0, y0, x1, y1 = b
        if not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
            raise ManifestError(f"{where}: box {b!r} must satisfy 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1")


def read_manifest(path: str | os.PathLike, resolve: bool = True) -> list[dict]:
    """Rows of the manifest at `path`, validated; with `resolve`, relative paths become absolute."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    rows = validate(manifest, str(path))
    return resolve_paths(rows, path.resolve().parent) if resolve else rows


def resolve_paths(rows: list[dict], base: Path) -> list[dict]:
    """`rows` with relative file paths made absolute against `base` (the manifest's folder)."""
    return [{**r, **{k: str(base / r[k]) for k in PATH_FIELDS if k in r}} for r in rows]


def write_manifest(path: str | os.PathLike, rows: list[dict], **extra) -> Path:
    """Validate and write `{"data": rows, **extra}` atomically (`crossmae_fast.files.atomic_write`).
    `extra`: top-level keys beside the rows, e.g. `fbank_stats` (data/normalisation.py)."""
    path = Path(path)
    manifest = {"data": list(rows), **extra}
    validate(manifest, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(manifest, indent=1) + "\n", mode=0o644)
    return path


def frame_path(row: dict, i: int) -> str:
    """Path of frame `i` of a manifest row: `video_path/frame_{i}/{video_id}.jpg`."""
    return os.path.join(row["video_path"], f"frame_{i}", f"{row['video_id']}.jpg")
