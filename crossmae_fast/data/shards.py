"""Sharded storage: webdataset tars, their DALI `wds2idx` indexes and the shard manifest `shards.json`.

Layout of a shard folder (written by `shard_writer.write_shards`, docs/design.md "Sharded storage"):

- `NAME-000000.tar`, ...: standard webdataset tars, one sample per clip, its members adjacent:
  `KEY.f0.jpg` ... `KEY.f9.jpg`, `KEY.flac` (or `.wav`, as stored), `KEY.json` (the manifest row).
- `NAME-000000.idx`, ...: the DALI index of each tar, format v1.2 as DALI's `wds2idx` writes it:
  a header line `v1.2 <samples>`, then one line per sample listing `<ext> <offset> <size> <name>`
  for each of its members (offsets of the data, after the 512-byte tar header).
- `shards.json`: a manifest (`"data"` rows in the source manifest's order, so row `i` is the same clip
  as row `i` of the files it came from; `"frame_size"` = the frames' [width, height]) plus `"shards"`
  (file, index, samples, bytes, sha256), `"fbank_stats"` and `"label_csv"`. A row's `"shard"` and
  `"key"` say where its members are.

Readers (`ShardStore`) load every index once and then read members by offset (`os.pread`), so the
loaders keep their own order (epoch permutation, rank split, mid-epoch resume) whatever the layout, and
a member that is truncated or fails to decode makes its row bad, like a bad file, without stopping
the epoch.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from crossmae_fast.data.manifest import ManifestError, resolve_paths, validate

FORMAT = "crossmae-shards"
INDEX_VERSION = "v1.2"
AUDIO_EXTS = ("flac", "wav", "ogg")
MAX_OPEN = 256  # shard descriptors one process keeps open
log = logging.getLogger("crossmae_fast.data")


class ShardError(ManifestError):
    """A shard folder that cannot be used (a missing tar or index, a mismatched index, a bad shards.json)."""


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the extension starts at the first dot of the base name,
    as webdataset and DALI split it (`KEY.f3.jpg` -> `KEY`, `f3.jpg`)."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def tar_members(tar: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a tar, in order, from its headers."""
    import tarfile

    with tarfile.open(tar, "r:") as t:
        return [(m.name, m.offset_data, m.size) for m in t if m.isreg()]


def index_text(members: list[tuple[str, int, int]]) -> str:
    """The `wds2idx` v1.2 index of a tar's members: consecutive members with one key form a sample."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    for name, offset, size in members:
        key, ext = split_name(name)
        if not key or key.endswith("/"):
            continue  # hidden files and folders: DALI's indexer skips them too
        if key != last:
            samples.append([])
            last = key
        samples[-1].append((ext, offset, size, name))
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def read_index(path: str | os.PathLike) -> list[dict[str, tuple[int, int]]]:
    """Samples of a v1.2 index: per sample `{"__key__": key, ext: (offset, size), ...}`; `ShardError`."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ShardError(f"{path}: cannot read the index ({e})") from e
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise ShardError(f"{path}: not a {INDEX_VERSION} webdataset index with a matching sample count")
    samples = []
    for n, line in enumerate(lines[1:], 2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise ShardError(f"{path}: line {n}: expected '<ext> <offset> <size> <name>' per member")
        sample: dict = dict(zip(parts[0::4], zip(map(int, parts[1::4]), map(int, parts[2::4]))))
        sample["__key__"] = split_name(parts[3])[0]
        samples.append(sample)
    return samples


def is_shard_manifest(doc: dict) -> bool:
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def read_document(path: str | os.PathLike) -> dict:
    """The JSON object of a manifest or shard manifest; `ManifestError` when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e


class ShardStore:
    """Random access to the members of a shard folder's clips, by manifest row.

    Loads every shard's index at construction (the startup cost docs/design.md measures) into arrays:
    the audio member and `num_frames` frame members of each row (offset, size; -1 when absent).
    Reads use `os.pread` on descriptors opened per process, so forked DataLoader workers share nothing.
    """

    def __init__(self, path: str | os.PathLike, doc: dict, rows: list[dict], num_frames: int):
        self.root = Path(path).resolve().parent
        shards = doc.get("shards")
        if not isinstance(shards, list) or not shards or not all(
                isinstance(e, dict) and isinstance(e.get("tar"), str) and isinstance(e.get("index"), str)
                for e in shards):
            raise ShardError(f"{path}: a shard manifest needs a non-empty 'shards' list of {{'tar', 'index', ...}}")
        for i, r in enumerate(rows):
            shard = r.get("shard")
            if not (isinstance(shard, int) and 0 <= shard < len(shards) and isinstance(r.get("key"), str)):
                raise ShardError(f"{path}: row {i}: needs 'shard' (0..{len(shards) - 1}) and 'key'")
        self.tars = [str(self.root / s["tar"]) for s in shards]
        n = len(rows)
        self.shard = np.full(n, -1, np.int32)
        self.audio = np.full((n, 2), -1, np.int64)
        self.frames = np.full((n, num_frames, 2), -1, np.int64)
        self.audio_ext = [""] * n
        where = {(r["shard"], r["key"]): i for i, r in enumerate(rows)}
        for s, entry in enumerate(shards):
            self._load(s, entry, where, num_frames)
        missing = np.flatnonzero(self.shard < 0)
        if len(missing):
            raise ShardError(f"{path}: {len(missing)} rows (first: {rows[missing[0]]['key']!r}) are in no index")
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def _load(self, s: int, entry: dict, where: dict, num_frames: int) -> None:
        tar = Path(self.tars[s])
        samples = read_index(self.root / entry["index"])
        if len(samples) != entry.get("samples", len(samples)):
            raise ShardError(f"{entry['index']}: {len(samples)} samples, shards.json says {entry['samples']}")
        if not tar.is_file():
            raise ShardError(f"{tar}: shard missing")
        size = tar.stat().st_size
        if size != entry.get("bytes", size):
            log.warning("data: shard %s is %d bytes, shards.json says %d; its clips past the end are replaced",
                        tar.name, size, entry["bytes"])
        rows, audio, frames, absent = [], [], [], (-1, -1)
        names = [f"f{f}.jpg" for f in range(num_frames)]
        for sample in samples:
            i = where.get((s, sample["__key__"]))
            if i is None:
                continue  # a clip the manifest does not list
            ext = next((e for e in AUDIO_EXTS if e in sample), "")
            self.audio_ext[i] = ext
            rows.append(i)
            audio.append(sample.get(ext, absent))
            frames.append([sample.get(name, absent) for name in names])
        if rows:  # filled in bulk: per-element numpy writes would dominate the startup
            self.shard[rows], self.audio[rows], self.frames[rows] = s, audio, frames

    def _fd(self, s: int) -> int:
        """A descriptor of shard `s`; at most `MAX_OPEN` stay open (least recently used closed first),
        so 2,000 shards fit under the usual 1,024-descriptor limit."""
        if self._pid != os.getpid():  # a forked worker: open its own descriptors
            self._fds, self._pid = OrderedDict(), os.getpid()
        if s in self._fds:
            self._fds.move_to_end(s)
            return self._fds[s]
        if len(self._fds) >= MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[s] = os.open(self.tars[s], os.O_RDONLY)
        return self._fds[s]

    def _read(self, row: int, loc: np.ndarray, what: str) -> bytes:
        offset, size = int(loc[0]), int(loc[1])
        tar = self.tars[self.shard[row]]
        if offset < 0:
            raise OSError(f"{tar}: row {row} has no {what} member")
        data = os.pread(self._fd(int(self.shard[row])), size, offset)
        if len(data) != size:
            raise OSError(f"{tar}: {what} member of row {row} truncated ({len(data)} of {size} bytes)")
        return data

    def audio_bytes(self, row: int) -> bytes:
        return self._read(row, self.audio[row], "audio")

    def frame_bytes(self, row: int, frame: int) -> bytes:
        return self._read(row, self.frames[row, frame], f"f{frame}.jpg")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict:  # descriptors do not travel to spawned processes
        return {**self.__dict__, "_fds": OrderedDict()}

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


def open_rows(path: str | os.PathLike, num_frames: int) -> tuple[list[dict], ShardStore | None]:
    """Rows of a manifest or shard manifest (validated, file paths absolute) and, for a shard
    manifest, its `ShardStore`."""
    doc = read_document(path)
    rows = validate(doc, str(path))
    if not is_shard_manifest(doc):
        return resolve_paths(rows, Path(path).resolve().parent), None
    return rows, ShardStore(path, doc, rows, num_frames)
