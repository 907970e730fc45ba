"""Readers for the public sound-source localization test sets, written out as manifest rows.

Rows follow the CAV-MAE datafile schema plus boxes: `{"video_id", "wav",
"video_path", "labels", "bbox": [[x0, y0, x1, y1], ...]}` with box corners normalised to [0, 1].

- Flickr-SoundNet (Senocak et al.): one XML file per clip, named `<video_id>.xml`, each `<bbox>`
  element holding one annotator's box in 256x256 pixels. Every box is kept (several annotators per
  clip): the Flickr ground truth is their consensus (`metrics.gt_from_boxes(mode="flickr")`).
- VGG-SS (Chen et al.): `vggss.json`, a list of `{"file", "bbox": [[x0, y0, x1, y1], ...], "class"}`
  with normalised boxes (the ground truth is their union).

Frames are expected where the rest of the toolkit looks for them, `video_path/frame_{i}/{video_id}.jpg`
(evaluation uses frame 5); the test sets ship one frame per clip, which goes there. Boxes are
normalised to the full frame; the loaders centre-crop non-square frames, which `center_crop_boxes`
accounts for. Write the rows with `crossmae_fast.data.manifest.write_manifest`, or run
`python -m crossmae_fast.annotations {flickr,vggss} ANNOTATIONS --audio-dir A --frame-dir F --out M`.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path

from crossmae_fast.config import EVAL_FRAME
from crossmae_fast.data.manifest import frame_path

log = logging.getLogger(__name__)

FLICKR_SCALE = 256
CORNERS = ("xmin", "ymin", "xmax", "ymax")


def normalise_box(box: Sequence[float], scale: float = 1.0) -> list[float] | None:
    """`[x0, y0, x1, y1] / scale` clipped to [0, 1]; None when the box is empty or malformed."""
    if len(box) != 4:
        return None
    b = [min(max(float(v) / scale, 0.0), 1.0) for v in box]
    if not all(v == v for v in b) or b[2] <= b[0] or b[3] <= b[1]:  # v == v is False for NaN
        return None
    return b


def read_flickr_xml(path: str | Path, scale: float = FLICKR_SCALE) -> list[list[float]]:
    """Normalised boxes of all annotators in one Flickr-SoundNet XML file.

    A `<bbox>` either names its corners (`<xmin>`, `<ymin>`, `<xmax>`, `<ymax>`) or, as in the released
    files, lists a leading field followed by the four corners in that order; the last four are read.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML ({e})") from e
    boxes = []
    for i, node in enumerate(root.iter("bbox")):
        named = {child.tag: child.text for child in node}
        named_all = all(k in named for k in CORNERS)
        texts = [named[k] for k in CORNERS] if named_all else [c.text for c in node][-4:]
        try:
            raw = [float(t) for t in texts]
        except (TypeError, ValueError):
            raise ValueError(f"{path}: bbox {i} has non-numeric corners {texts}") from None
        box = normalise_box(raw, scale)
        if box is None:
            log.warning("%s: dropping empty or malformed bbox %d %s", path, i, raw)
        else:
            boxes.append(box)
    return boxes


def manifest_row(video_id: str, boxes: list[list[float]], audio_dir: str | Path, frame_dir: str | Path,
                 labels: str = "", audio_ext: str = ".wav") -> dict:
    """One manifest row for a clip whose audio is `audio_dir/<id><audio_ext>` and frames under `frame_dir`."""
    return {
        "video_id": video_id,
        "wav": str(Path(audio_dir) / f"{video_id}{audio_ext}"),
        "video_path": str(frame_dir),
        "labels": labels,
        "bbox": boxes,
    }


def flickr_soundnet_rows(annotation_dir: str | Path, audio_dir: str | Path, frame_dir: str | Path,
                         ids: Iterable[str] | None = None, scale: float = FLICKR_SCALE,
                         audio_ext: str = ".wav") -> list[dict]:
    """Manifest rows from a directory of Flickr-SoundNet XML files, sorted by id; `ids` selects a subset
    (e.g. the 250-clip test list). Clips without a usable box are skipped with a warning."""
    annotation_dir = Path(annotation_dir)
    files = {p.stem: p for p in annotation_dir.glob("*.xml")}
    if not files:
        raise FileNotFoundError(f"no .xml annotation files in {annotation_dir}")
    wanted = sorted(files) if ids is None else sorted(set(ids))
    missing = [i for i in wanted if i not in files]
    if missing:
        log.warning("%d requested ids have no annotation in %s, e.g. %s", len(missing), annotation_dir,
                    missing[:3])
    rows = []
    for vid in wanted:
        if vid not in files:
            continue
        boxes = read_flickr_xml(files[vid], scale)
        if boxes:
            rows.append(manifest_row(vid, boxes, audio_dir, frame_dir, audio_ext=audio_ext))
        else:
            log.warning("%s: no usable boxes, clip skipped", files[vid])
    return rows


def vggss_rows(json_path: str | Path, audio_dir: str | Path, frame_dir: str | Path,
               audio_ext: str = ".wav") -> list[dict]:
    """Manifest rows from VGG-SS's `vggss.json`, in file order; `class` becomes `labels`."""
    json_path = Path(json_path)
    entries = json.loads(json_path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: expected a JSON list of annotations, got {type(entries).__name__}")
    rows, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "file" not in entry or "bbox" not in entry:
            raise ValueError(f"{json_path}: entry {i} lacks 'file' or 'bbox': {entry!r}")
        vid = str(entry["file"])
        if vid in seen:
            raise ValueError(f"{json_path}: entry {i} repeats file {vid!r}")
        seen.add(vid)
        boxes = []
        for j, raw in enumerate(entry["bbox"]):
            box = normalise_box(raw) if isinstance(raw, (list, tuple)) else None
            if box is None:
                log.warning("%s: %s: dropping empty or malformed bbox %d %s", json_path, vid, j, raw)
            else:
                boxes.append(box)
        if boxes:
            label = str(entry.get("class", ""))
            rows.append(manifest_row(vid, boxes, audio_dir, frame_dir, label, audio_ext))
        else:
            log.warning("%s: %s has no usable boxes, clip skipped", json_path, vid)
    return rows


def keep_available(rows: list[dict], frame_index: int = EVAL_FRAME) -> list[dict]:
    """Rows whose audio file and frame `video_path/frame_{frame_index}/<id>.jpg` exist; logs the rest."""
    kept = [r for r in rows if Path(r["wav"]).is_file() and Path(frame_path(r, frame_index)).is_file()]
    if len(kept) < len(rows):
        log.warning("%d of %d clips lack their audio or frame %d and are left out", len(rows) - len(kept),
                    len(rows), frame_index)
    return kept


def center_crop_boxes(boxes: Sequence[Sequence[float]], width: int, height: int) -> list[list[float]]:
    """Map boxes normalised to a `width` x `height` frame into the square centre crop the loaders take
    (short side resized, centre crop); boxes are clipped to the crop and empty ones dropped."""
    side = min(width, height)
    ox, oy = (width - side) / 2, (height - side) / 2
    out = []
    for x0, y0, x1, y1 in boxes:
        box = normalise_box([x0 * width - ox, y0 * height - oy, x1 * width - ox, y1 * height - oy], side)
        if box is not None:
            out.append(box)
    return out


def read_ids(path: str | Path) -> list[str]:
    """Clip ids from the first column of each line of `path` (a list or a CSV), file extensions dropped."""
    ids = []
    for line in Path(path).read_text().splitlines():
        name = line.split(",")[0].strip()
        ext = next((e for e in (".xml", ".jpg", ".wav", ".flac", ".mp4") if name.endswith(e)), "")
        if name:
            ids.append(name.removesuffix(ext))
    return ids
