"""Class labels of a manifest: CAV-MAE's label CSV, the `labels` column, targets, subsets and the
balanced-sampling weights.

Label CSV (CAV-MAE's `class_labels_indices.csv`): a header `index,mid,display_name`, then one row per
class; a manifest row's `labels` is a comma-separated list of `mid`s. Without a CSV the classes are the
sorted labels the train manifest uses. Data is multi-label when some clip has several labels
(BCE and mAP), single-label otherwise (cross-entropy and accuracy).

Balanced sampling (CAV-MAE's `gen_weight_file`): class `k` seen `n_k` times in the train manifest
weighs `1000 / (n_k + 0.01)`, a clip the sum over its labels. `python -m crossmae_fast.data.labels
weights MANIFEST [--label-csv CSV] --out FILE` writes one weight per manifest row (the file
`--balanced FILE` reads).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crossmae_fast.files import atomic_write

log = logging.getLogger("crossmae_fast.data")


class LabelError(ValueError):
    """Labels that cannot be used; the message names the file, the row and the label."""


@dataclass(frozen=True)
class LabelSet:
    """Class ids (`mid`s, in index order) and their display names."""

    mids: tuple[str, ...]
    names: tuple[str, ...]

    @property
    def index(self) -> dict[str, int]:
        return {m: i for i, m in enumerate(self.mids)}

    def __len__(self) -> int:
        return len(self.mids)


def read_label_csv(path: str | Path) -> LabelSet:
    """The classes of a CAV-MAE label CSV (`index,mid,display_name`); indices must be 0..C-1."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"--label-csv {path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows or [c.strip() for c in rows[0][:2]] != ["index", "mid"]:
        raise LabelError(f"{path}: expected a header 'index,mid,display_name'")
    by_index: dict[int, tuple[str, str]] = {}
    for n, r in enumerate(rows[1:], start=2):
        try:
            i, mid = int(r[0]), r[1].strip()
        except (ValueError, IndexError):
            raise LabelError(f"{path}: line {n}: expected 'index,mid,display_name', got {','.join(r)!r}") from None
        if not mid or i in by_index:
            raise LabelError(f"{path}: line {n}: empty mid or repeated index {i}")
        by_index[i] = (mid, r[2].strip() if len(r) > 2 else mid)
    if sorted(by_index) != list(range(len(by_index))):
        raise LabelError(f"{path}: indices must be 0..{len(by_index) - 1}, each once")
    mids = tuple(by_index[i][0] for i in range(len(by_index)))
    if len(set(mids)) != len(mids):
        raise LabelError(f"{path}: a mid appears twice")
    return LabelSet(mids, tuple(by_index[i][1] for i in range(len(by_index))))


def label_csv_text(labels: LabelSet) -> str:
    """The CSV `read_label_csv` reads (`csv` quoting for names with commas)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "mid", "display_name"])
    w.writerows([i, m, n] for i, (m, n) in enumerate(zip(labels.mids, labels.names)))
    return buf.getvalue()


def write_label_csv(path: str | Path, labels: LabelSet) -> Path:
    """Write the label CSV of `labels` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, label_csv_text(labels))
    return path


def row_labels(row: dict, where: str) -> list[str]:
    """The `mid`s of a manifest row; LabelError for a row without any."""
    mids = [m.strip() for m in str(row.get("labels", "")).split(",") if m.strip()]
    if not mids:
        raise LabelError(f"{where} (video_id {row.get('video_id')!r}): no labels; fine-tuning needs a "
                         "'labels' value on every row")
    return mids


def labels_from_rows(rows: list[dict], source: str) -> LabelSet:
    """The sorted labels `rows` use (the classes when no label CSV is given)."""
    mids = sorted({m for i, r in enumerate(rows) for m in row_labels(r, f"{source}: row {i}")})
    return LabelSet(tuple(mids), tuple(mids))


def targets(rows: list[dict], labels: LabelSet, source: str) -> torch.Tensor:
    """[N, C] multi-hot float targets; LabelError naming the row and label missing from `labels`."""
    index = labels.index
    out = torch.zeros(len(rows), len(labels))
    for i, r in enumerate(rows):
        for m in row_labels(r, f"{source}: row {i}"):
            if m not in index:
                raise LabelError(f"{source}: row {i} (video_id {r.get('video_id')!r}): label {m!r} is not "
                                 "in the label CSV")
            out[i, index[m]] = 1.0
    return out


def is_multi_label(target: torch.Tensor) -> bool:
    """Whether some clip has more than one label."""
    return bool((target.sum(1) > 1).any())


def balanced_weights(target: torch.Tensor) -> np.ndarray:
    """Per-clip sampling weights: sum over the clip's labels of 1000 / (label count + 0.01)."""
    t = target.double().numpy()
    per_class = 1000.0 / (t.sum(0) + 0.01)
    return t @ per_class


def read_weights(path: str | Path, n: int) -> np.ndarray:
    """Weights written by the `weights` tool: one positive number per manifest row."""
    try:
        w = np.loadtxt(path, ndmin=1, dtype=np.float64)
    except (OSError, ValueError) as e:
        raise LabelError(f"--balanced {path}: not a weights file ({e})") from None
    if w.shape != (n,) or not np.all(w >= 0) or not w.sum() > 0:
        raise LabelError(f"--balanced {path}: expected {n} non-negative weights (one per train row), found "
                         f"{w.size}")
    return w


def per_class_subset(target: torch.Tensor, per_class: int, seed: int) -> np.ndarray:
    """Sorted row indices keeping `per_class` clips of each class (a clip counts for its first label),
    chosen by `seed`: the few-label setting."""
    order = np.random.default_rng(seed).permutation(len(target))
    first = target.argmax(1).numpy()
    kept, count = [], np.zeros(target.shape[1], dtype=np.int64)
    for i in order:
        if count[first[i]] < per_class:
            count[first[i]] += 1
            kept.append(i)
    return np.sort(np.asarray(kept, dtype=np.int64))


def main(argv: list[str] | None = None) -> int:
    """`weights MANIFEST [--label-csv CSV] --out FILE`: the balanced-sampling weights of a manifest."""
    from crossmae_fast.data.manifest import ManifestError, read_manifest

    ap = argparse.ArgumentParser(prog="python -m crossmae_fast.data.labels", description=main.__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("weights", help="per-clip balanced-sampling weights, one per line")
    w.add_argument("manifest")
    w.add_argument("--label-csv", help="CAV-MAE class_labels_indices.csv (default: the manifest's labels)")
    w.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        rows = read_manifest(args.manifest, resolve=False)
        labels = read_label_csv(args.label_csv) if args.label_csv else labels_from_rows(rows, args.manifest)
        weights = balanced_weights(targets(rows, labels, args.manifest))
    except (ManifestError, LabelError, OSError) as e:
        print(f"labels: error: {e}", file=sys.stderr)
        return 2
    atomic_write(Path(args.out), "".join(f"{x:.6f}\n" for x in weights))
    print(f"{args.out}: {len(weights)} weights over {len(labels)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
