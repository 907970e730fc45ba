"""Annotation readers on small files written in the Flickr-SoundNet XML and VGG-SS JSON formats."""

import json
import logging
import random

import numpy as np
import pytest

from crossmae_fast import annotations as cli
from crossmae_fast.data import box_annotations as ann
from crossmae_fast.eval.metrics import gt_from_boxes


def flickr_xml(boxes, named=False):
    """An annotation file as released: each annotator's box a <bbox> with a leading field and 4 corners."""
    objs = []
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        if named:
            inner = f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
        else:
            inner = f"<label>{k}</label><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
        objs.append(f"<object><bbox>{inner}</bbox></object>")
    return f"<annotation><filename>f.jpg</filename>{''.join(objs)}</annotation>"


def random_boxes(rng, k, scale):
    out = []
    for _ in range(k):
        x0, x1 = sorted(rng.sample(range(scale + 1), 2))
        y0, y1 = sorted(rng.sample(range(scale + 1), 2))
        out.append((x0, y0, x1, y1))
    return out


@pytest.mark.parametrize("named", [False, True])
def test_flickr_reader_keeps_every_annotator(tmp_path, named):
    rng = random.Random(7)
    clips = {str(10_000_000 + i): random_boxes(rng, rng.randint(1, 3), 256) for i in range(5)}
    for vid, boxes in clips.items():
        (tmp_path / f"{vid}.xml").write_text(flickr_xml(boxes, named))
    rows = ann.flickr_soundnet_rows(tmp_path, "/a", "/f")
    assert [r["video_id"] for r in rows] == sorted(clips)
    for r in rows:
        want = [[v / 256 for v in b] for b in clips[r["video_id"]]]
        np.testing.assert_allclose(r["bbox"], want)
        assert r["wav"] == f"/a/{r['video_id']}.wav" and r["video_path"] == "/f" and r["labels"] == ""
        # pixel map equals EZ-VSL's int(224 * v / 256) painting of the 256-px boxes
        want_map = np.zeros((224, 224))
        for x0, y0, x1, y1 in clips[r["video_id"]]:
            e = [int(224 * v / 256) for v in (x0, y0, x1, y1)]
            want_map[e[1]:e[3], e[0]:e[2]] += 1
        gt = gt_from_boxes(r["bbox"], 224, "flickr").numpy()
        np.testing.assert_array_equal(gt, np.minimum(want_map / 2, 1))


def test_flickr_subset_bad_boxes_and_bad_files(tmp_path, caplog):
    (tmp_path / "1.xml").write_text(flickr_xml([(10, 10, 100, 120), (50, 50, 50, 90)]))  # 2nd is empty
    (tmp_path / "2.xml").write_text(flickr_xml([(300, 0, 400, 20)]))  # outside the frame: clipped away
    (tmp_path / "3.xml").write_text(flickr_xml([(0, 0, 256, 256)]))
    with caplog.at_level(logging.WARNING):
        rows = ann.flickr_soundnet_rows(tmp_path, "a", "f", ids=["1", "2", "9"])
    assert [r["video_id"] for r in rows] == ["1"]
    np.testing.assert_allclose(rows[0]["bbox"], [[10 / 256, 10 / 256, 100 / 256, 120 / 256]])
    text = caplog.text
    assert "dropping" in text and "skipped" in text and "no annotation" in text
    (tmp_path / "4.xml").write_text("<annotation><object><bbox>")
    with pytest.raises(ValueError, match="4.xml"):
        ann.read_flickr_xml(tmp_path / "4.xml")
    (tmp_path / "5.xml").write_text(flickr_xml([("a", 1, 2, 3)]))
    with pytest.raises(ValueError, match="non-numeric"):
        ann.read_flickr_xml(tmp_path / "5.xml")
    with pytest.raises(FileNotFoundError):
        ann.flickr_soundnet_rows(tmp_path / "none", "a", "f")


def test_vggss_reader(tmp_path):
    rng = random.Random(3)
    entries = []
    for i in range(6):
        boxes = [[round(v / 1000, 3) for v in b] for b in random_boxes(rng, rng.randint(1, 2), 1000)]
        entries.append({"file": f"vid{i:08d}X_{30 * i:06d}", "bbox": boxes, "class": f"class {i % 3}"})
    entries[2]["bbox"].append([0.5, 0.5, 1.4, 1.2])  # clipped to the frame as EZ-VSL does
    path = tmp_path / "vggss.json"
    path.write_text(json.dumps(entries))
    rows = ann.vggss_rows(path, "aud", "frames", audio_ext=".flac")
    assert [r["video_id"] for r in rows] == [e["file"] for e in entries]
    for r, e in zip(rows, entries):
        assert r["labels"] == e["class"] and r["wav"] == f"aud/{e['file']}.flac"
        want = [[min(v, 1.0) for v in b] for b in e["bbox"]]
        np.testing.assert_allclose(r["bbox"], want)
    path.write_text(json.dumps([{"file": "x"}]))
    with pytest.raises(ValueError, match="entry 0"):
        ann.vggss_rows(path, "a", "f")
    path.write_text(json.dumps([{"file": "x", "bbox": [[0, 0, 1, 1]]}] * 2))
    with pytest.raises(ValueError, match="repeats"):
        ann.vggss_rows(path, "a", "f")


def test_cli_writes_manifest_and_checks_files(tmp_path):
    (tmp_path / "ann").mkdir()
    for vid in ("11", "22"):
        (tmp_path / "ann" / f"{vid}.xml").write_text(flickr_xml([(0, 0, 128, 128), (10, 10, 140, 150)]))
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "11.wav").write_bytes(b"")
    (tmp_path / "frames" / "frame_5").mkdir(parents=True)
    (tmp_path / "frames" / "frame_5" / "11.jpg").write_bytes(b"")
    (tmp_path / "ids.csv").write_text("11.jpg,x\n22,y\n")
    out = tmp_path / "m.json"
    common = ["flickr", str(tmp_path / "ann"), "--audio-dir", str(tmp_path / "audio"),
              "--frame-dir", str(tmp_path / "frames"), "--ids", str(tmp_path / "ids.csv"), "--out", str(out)]
    assert cli.main(common) == 0
    assert [r["video_id"] for r in json.loads(out.read_text())["data"]] == ["11", "22"]
    assert cli.main(common + ["--check-files"]) == 0
    data = json.loads(out.read_text())["data"]
    assert [r["video_id"] for r in data] == ["11"] and len(data[0]["bbox"]) == 2


def test_center_crop_boxes_follow_the_crop():
    """Paint the box on a wide frame, centre-crop the pixels, and compare with the mapped box."""
    w, h = 320, 200
    box = [0.1, 0.25, 0.55, 0.9]
    frame = np.zeros((h, w))
    frame[int(box[1] * h):int(box[3] * h), int(box[0] * w):int(box[2] * w)] = 1
    crop = frame[:, (w - h) // 2:(w - h) // 2 + h]
    (mapped,) = ann.center_crop_boxes([box], w, h)
    want = [crop.any(0).argmax() / h, crop.any(1).argmax() / h,
            (h - crop.any(0)[::-1].argmax()) / h, (h - crop.any(1)[::-1].argmax()) / h]
    np.testing.assert_allclose(mapped, want, atol=1 / h)
    assert ann.center_crop_boxes([[0.0, 0.0, 0.1, 1.0]], w, h) == []  # entirely cut off
    np.testing.assert_allclose(ann.center_crop_boxes([box], 100, 100), [box])
