"""Manifest schema checks, atomic writes and path helpers."""

import json
import os

import pytest

from crossmae_fast.data.manifest import ManifestError, frame_path, read_manifest, validate, write_manifest


def row(i: int, **extra) -> dict:
    return {"video_id": f"v{i}", "wav": f"audio/v{i}.wav", "video_path": "frames", "labels": "a,b", **extra}


def test_valid_rows_pass_and_keep_extra_keys():
    rows = [row(0), row(1, video="video/v1.webm", bbox=[[0.1, 0.2, 0.5, 0.9], [0, 0, 1, 1]], objects=[])]
    assert validate({"data": rows}) == rows


@pytest.mark.parametrize(
    "bad_row, field",
    [
        ({k: v for k, v in row(2).items() if k != "wav"}, "wav"),
        (row(2, labels=["a"]), "labels"),
        (row(2, video_id=""), "video_id"),
        (row(2, video_id="a/b"), "video_id"),
        (row(2, video_path=3), "video_path"),
        (row(2, video=""), "video"),
        (row(2, bbox=[[0.1, 0.2, 1.5, 0.9]]), "bbox"),
        (row(2, bbox=[[0.6, 0.2, 0.5, 0.9]]), "bbox"),
        (row(2, bbox=[0.1, 0.2, 0.5, 0.9]), "bbox"),
        (row(2, bbox=[[0.1, 0.2, 0.5]]), "bbox"),
        (row(2, bbox=[]), "bbox"),
        (row(2, bbox=[[float("nan"), 0, 1, 1]]), "bbox"),
    ],
)
def test_errors_name_row_and_field(bad_row, field):
    with pytest.raises(ManifestError) as e:
        validate({"data": [row(0), row(1), bad_row, row(3)]}, "m.json")
    msg = str(e.value)
    assert "m.json" in msg and "row 2" in msg and repr(field) in msg, msg


@pytest.mark.parametrize("manifest", [[row(0)], {"rows": []}, {"data": {}}, {"data": [row(0), "x"]}])
def test_wrong_top_level(manifest):
    with pytest.raises(ManifestError):
        validate(manifest)


def test_write_read_roundtrip_resolves_relative_paths(tmp_path):
    rows = [row(0), row(1, video="/abs/v1.mp4", bbox=[[0.25, 0.0, 0.75, 0.5]])]
    path = write_manifest(tmp_path / "sub" / "train.json", rows)
    assert json.loads(path.read_text()) == {"data": rows}
    assert os.listdir(path.parent) == ["train.json"]  # no temporary file left behind
    got = read_manifest(path)
    base = str(path.parent.resolve())
    assert got[0]["wav"] == os.path.join(base, "audio", "v0.wav")
    assert got[0]["video_path"] == os.path.join(base, "frames")
    assert got[1]["video"] == "/abs/v1.mp4"
    assert got[1]["bbox"] == rows[1]["bbox"]
    assert read_manifest(path, resolve=False) == rows


def test_failed_write_keeps_old_file(tmp_path):
    path = write_manifest(tmp_path / "m.json", [row(0)])
    before = path.read_bytes()
    with pytest.raises(ManifestError, match="row 1"):
        write_manifest(path, [row(0), row(1, labels=None)])
    with pytest.raises(TypeError):  # not JSON-serialisable: fails after the temporary file is made
        write_manifest(path, [row(0, extra=object())])
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="bad.json"):
        read_manifest(bad)
    bad.write_text(json.dumps({"data": [row(0), {"video_id": "x"}]}))
    with pytest.raises(ManifestError, match=r"bad.json: row 1 field 'wav'"):
        read_manifest(bad)


def test_frame_path():
    r = {"video_id": "abc", "video_path": "/data/frames"}
    assert frame_path(r, 7) == "/data/frames/frame_7/abc.jpg"
