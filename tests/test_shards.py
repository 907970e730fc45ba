"""Sharded storage: the tar layout, the DALI index against DALI's own tools, shards.json as a manifest,
the same batches as the files on both loaders (resume and rank split included), failures left out,
resumable writing, corrupt members replaced."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from optional import MEDIA, needs
from PIL import Image
from test_data_loaders import BACKENDS, CFG, needs_dali, write_set

from crossmae_fast import shard
from crossmae_fast.data import make_loader
from crossmae_fast.data.manifest import ManifestError, read_manifest
from crossmae_fast.data.shard_writer import write_shards
from crossmae_fast.data.shards import index_text, read_index

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), needs(*MEDIA, "webdataset")]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(source manifest, shards.json): the 7 varied clips of test_data_loaders in shards of 3."""
    root = tmp_path_factory.mktemp("sharded")
    manifest, _ = write_set(root / "files")
    summary = write_shards(manifest, root / "shards", clips_per_shard=3, processes=2, seed=4, progress=False)
    assert (summary.clips, summary.shards, summary.failed) == (7, 3, 0)
    return manifest, Path(summary.manifest)


def test_layout_members_and_manifest(sharded):
    manifest, shards = sharded
    doc = json.loads(shards.read_text())
    source = read_manifest(manifest, resolve=False)
    assert [r["video_id"] for r in doc["data"]] == [r["video_id"] for r in source]  # the source order
    assert [s["tar"] for s in doc["shards"]] == [f"manifest-00000{i}.tar" for i in range(3)]
    keys_in_tars = []
    for entry in doc["shards"]:
        tar = shards.parent / entry["tar"]
        assert entry["bytes"] == tar.stat().st_size
        assert entry["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
        with tarfile.open(tar) as t:
            names = t.getnames()
            keys = list(dict.fromkeys(n.split(".")[0] for n in names))
            assert len(keys) == entry["samples"]
            for key in keys:
                row = next(r for r in doc["data"] if r["key"] == key)
                src = source[[r["video_id"] for r in source].index(row["video_id"])]
                ext = Path(src["wav"]).suffix
                want = [f"{key}.f{i}.jpg" for i in range(10)] + [f"{key}{ext}", f"{key}.json"]
                assert sorted(n for n in names if n.startswith(key + ".")) == sorted(want)
                i = names.index(f"{key}.f0.jpg")
                assert names[i:i + 12] == sorted(want)  # a sample's members are adjacent
                assert t.extractfile(f"{key}{ext}").read() == (manifest.parent / src["wav"]).read_bytes()
                with Image.open(manifest.parent / src["video_path"] / "frame_0" / f"{src['video_id']}.jpg") as im:
                    assert row["frame_size"] == list(im.size)
                stored = json.loads(t.extractfile(f"{key}.json").read())
                assert {k: stored[k] for k in src} == src
            keys_in_tars += keys
    assert len(keys_in_tars) == 7
    order = [next(r["video_id"] for r in doc["data"] if r["key"] == k) for k in keys_in_tars]
    assert order != sorted(order)  # shuffled once before writing


def test_index_is_the_one_dali_writes(sharded, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    _, shards = sharded
    for tar in sorted(shards.parent.glob("*.tar")):
        theirs = tmp_path / f"{tar.stem}.idx"
        with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert (shards.parent / f"{tar.stem}.idx").read_text() == theirs.read_text()
    head = (shards.parent / "manifest-000000.idx").read_text().splitlines()[0]
    assert head == "v1.2 3"


def test_index_groups_members_by_key():
    members = [("a.f0.jpg", 512, 10), ("a.flac", 1536, 4), ("b.json", 2560, 3), (".hidden", 3584, 1)]
    text = index_text(members)
    assert text == "v1.2 2\nf0.jpg 512 10 a.f0.jpg flac 1536 4 a.flac\njson 2560 3 b.json\n"


@needs_dali
def test_dali_webdataset_reader_reads_our_shards(sharded):
    from nvidia.dali import fn, pipeline_def

    manifest, shards = sharded
    doc = json.loads(shards.read_text())
    tar, idx = (str(shards.parent / doc["shards"][0][k]) for k in ("tar", "index"))

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def pipe():
        return tuple(fn.readers.webdataset(paths=[tar], index_paths=[idx], ext=["f3.jpg", "json"]))

    p = pipe()
    p.build()
    jpgs, metas = p.run()
    for k in range(3):
        row = json.loads(np.array(metas[k]).tobytes())
        src = read_manifest(manifest)[row["row"]]
        assert np.array(jpgs[k]).tobytes() == Path(src["video_path"], "frame_3", f"{src['video_id']}.jpg").read_bytes()


def _epochs(manifest, backend, **kw):
    loader = make_loader(manifest, backend=backend, batch_size=2, data_config=replace(CFG, workers=2), **kw)
    out = []
    for epoch, start in ((0, 0), (1, 0), (1, 2)):  # a fresh epoch, a reshuffle, a mid-epoch resume
        loader.set_epoch(epoch, start)
        out.append(list(loader))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_give_the_batches_of_their_files(sharded, backend):
    manifest, shards = sharded
    for kw in ({"train": True, "seed": 3}, {"train": False}, {"train": True, "seed": 3, "rank": 1, "world_size": 2}):
        files, tars = _epochs(manifest, backend, **kw), _epochs(shards, backend, **kw)
        assert [len(e) for e in tars] == [len(e) for e in files] and len(tars[2]) < len(tars[1])
        for a, b in zip(sum(files, []), sum(tars, [])):
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (kw, k)


def test_failed_clips_listed_and_left_out(tmp_path):
    manifest, _ = write_set(tmp_path / "files")
    doc = json.loads(manifest.read_text())
    (tmp_path / "files" / "audio" / "clip2.wav").write_bytes(b"RIFF but not audio")
    jpg = tmp_path / "files" / "frames" / "frame_7" / "clip5.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    summary = write_shards(manifest, tmp_path / "shards", clips_per_shard=4, processes=1, progress=False)
    assert (summary.clips, summary.failed) == (5, 2)
    failures = [json.loads(x) for x in (tmp_path / "shards" / "failures.jsonl").read_text().splitlines()]
    assert sorted((f["row"], f["video_id"]) for f in failures) == [(2, "clip2"), (5, "clip5")]
    rows = read_manifest(tmp_path / "shards" / "shards.json")
    assert [r["video_id"] for r in rows] == [r["video_id"] for j, r in enumerate(doc["data"]) if j not in (2, 5)]
    assert sum(len(read_index(p)) for p in (tmp_path / "shards").glob("*.idx")) == 5


def test_interrupted_writing_resumes(tmp_path, monkeypatch):
    from crossmae_fast.data import shard_writer

    manifest, _ = write_set(tmp_path / "files")
    out = tmp_path / "shards"
    real, calls = shard_writer._write_shard, []

    def dies_on_third(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shard_writer, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_shards(manifest, out, clips_per_shard=2, processes=1, progress=False)
    assert not (out / "shards.json").exists() and not list(out.glob(".*.tmp*"))
    monkeypatch.setattr(shard_writer, "_write_shard", real)
    summary = write_shards(manifest, out, clips_per_shard=2, processes=1, progress=False)
    assert (summary.written, summary.already, summary.clips) == (2, 2, 7)
    again = write_shards(manifest, tmp_path / "fresh", clips_per_shard=2, processes=1, progress=False)
    assert [s["sha256"] for s in json.loads((out / "shards.json").read_text())["shards"]] == \
        [s["sha256"] for s in json.loads(Path(again.manifest).read_text())["shards"]]


def test_corrupt_members_replaced_and_counted(sharded, tmp_path, caplog):
    _, shards = sharded
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in shards.parent.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    doc = json.loads(shards.read_text())
    first = read_index(copy / doc["shards"][0]["index"])
    # bit rot: zeros over the evaluation frame of the first sample of shard 0
    offset, size = first[0][f"f{CFG.eval_frame}.jpg"]
    tar0 = copy / doc["shards"][0]["tar"]
    data = bytearray(tar0.read_bytes())
    data[offset:offset + size] = bytes(size)
    tar0.write_bytes(bytes(data))
    # a truncated copy: the last shard loses its second half
    tar2 = copy / doc["shards"][2]["tar"]
    tar2.write_bytes(tar2.read_bytes()[: tar2.stat().st_size // 2])
    rows = [r["key"] for r in doc["data"]]
    cut = {rows.index(s["__key__"]) for s in read_index(copy / doc["shards"][2]["index"])
           if sum(s["flac" if "flac" in s else "wav"]) > tar2.stat().st_size}  # audio past the end
    bad_rows = {rows.index(first[0]["__key__"])} | cut
    assert len(bad_rows) >= 2
    for backend in BACKENDS:
        caplog.clear()
        loader = make_loader(copy / "shards.json", backend=backend, batch_size=3, train=False, data_config=CFG)
        with caplog.at_level(logging.WARNING, logger="crossmae_fast.data"):
            index = torch.cat([b["index"] for b in loader]).tolist()
        assert len(index) == 7 and not bad_rows & set(index)
        assert set(loader.stats.bad) == bad_rows, (backend, loader.stats.bad)
        assert loader.stats.replaced == len(bad_rows)
        assert any("bytes, shards.json says" in r.getMessage() for r in caplog.records)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "m.json").write_text('{"data": [{"video_id": "a"}]}')
    assert shard.main([str(tmp_path / "m.json"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert shard.main([str(tmp_path / "none.json"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("shard: error: ") for e in err)



def test_open_shard_files_are_capped(sharded, monkeypatch):
    from crossmae_fast.data import shards as shards_module

    monkeypatch.setattr(shards_module, "MAX_OPEN", 2)
    _, path = sharded
    loader = make_loader(path, backend="torch", batch_size=7, train=False, data_config=replace(CFG, workers=0))
    want = torch.cat([b["index"] for b in make_loader(path, backend="torch", batch_size=7, train=False,
                                                     data_config=replace(CFG, workers=0))])
    assert torch.equal(next(iter(loader))["index"], want) and not loader.stats.bad
    assert len(loader.clips.store._fds) == 2  # three shards read, the oldest closed


def test_synth_and_prepare_write_shards(tmp_path, capsys):
    from media_fixtures import make_mixed_folder

    from crossmae_fast import prepare, synth

    assert synth.main(["--out", str(tmp_path / "syn"), "--clips", "8", "--seed", "2", "--seconds", "0.5",
                       "--image-size", "16", "--shards", "3"]) == 0
    for split, n in (("train", 6), ("eval", 2)):
        rows = read_manifest(tmp_path / "syn" / "shards" / split / "shards.json")
        source = read_manifest(tmp_path / "syn" / f"{split}.json")
        assert [r["video_id"] for r in rows] == [r["video_id"] for r in source]
        assert len(rows) == n and len(list((tmp_path / "syn" / "shards" / split).glob(f"{split}-*.idx"))) == -(-n // 3)
    make_mixed_folder(tmp_path / "videos")
    assert prepare.main([str(tmp_path / "videos"), "--out", str(tmp_path / "prep"), "--processes", "1",
                         "--image-size", "16", "--quiet", "--shards"]) == 0
    assert len(read_manifest(tmp_path / "prep" / "shards" / "shards.json")) == 2
    assert "shard manifest:" in capsys.readouterr().out


def test_broken_shard_folder_is_one_clear_line(sharded, tmp_path):
    _, shards = sharded
    doc = json.loads(shards.read_text())
    for p in shards.parent.iterdir():
        if p.is_file():
            (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / doc["shards"][1]["tar"]).unlink()
    (tmp_path / "no_key.json").write_text(json.dumps({**doc, "data": [dict(doc["data"][0], key=None)]}))
    for name, message in (("shards.json", "shard missing"), ("no_key.json", "row 0: needs 'shard'")):
        with pytest.raises(ManifestError, match=message):
            make_loader(tmp_path / name, backend="torch", batch_size=2, train=True, data_config=CFG)


def test_verify_finds_a_damaged_copy(sharded, tmp_path, capsys):
    manifest, shards = sharded
    assert shard.main(["--verify", str(shards)]) == 0
    for p in shards.parent.iterdir():
        if p.is_file():
            (tmp_path / p.name).write_bytes(p.read_bytes())
    tar = tmp_path / "manifest-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF  # one flipped bit-pattern inside a member
    tar.write_bytes(bytes(data))
    assert shard.main(["--verify", str(tmp_path / "shards.json")]) == 1
    assert "manifest-000001.tar: size or SHA-256 differs" in capsys.readouterr().err
    assert shard.main(["--verify", str(manifest)]) == 1  # a plain manifest is no shard folder
    with pytest.raises(SystemExit):
        shard.main([str(manifest)])  # writing needs --out
