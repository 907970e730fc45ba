"""`prepare` on clips made here (H.264/AAC mp4, VP9/Opus webm, broken files) and the media helpers."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from media_fixtures import frame_level, make_mixed_folder, make_video, soundfile
from PIL import Image

from crossmae_fast.config import SAMPLE_RATE
from crossmae_fast.data.extract import prepare
from crossmae_fast.data.manifest import frame_path, read_manifest
from crossmae_fast.data.media import MediaError, read_audio, resize_center_crop
from crossmae_fast.prepare import main

SIZE = 32
# video id -> (reason it fails) for the bad files of make_mixed_folder
BAD = {"silent": "no_audio", "truncated": "unreadable", "truncated_faststart": "truncated",
       "notes": "unreadable", "empty": "empty"}
# video id -> (seconds, fps, tone Hz) of the good files
GOOD = {"good_h264": (2.0, 10, 440.0), "sub__good_vp9": (1.5, 12, 1000.0)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "videos"
    make_mixed_folder(folder)
    return folder


@pytest.fixture(scope="module")
def prepared(mixed, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare(mixed, out, processes=1, image_size=SIZE, progress=False)
    return out, summary


def dominant_hz(x: np.ndarray, sr: int) -> float:
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(mag)])


def test_summary_and_failures(prepared):
    out, s = prepared
    assert (s.done, s.already) == (2, 0)
    assert s.failed == Counter(BAD.values())
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert {f["video_id"]: f["reason"] for f in failures} == BAD
    assert all(f["detail"] and f["path"].endswith((".mp4", ".mkv")) for f in failures)
    text = str(s)
    assert "2 done" in text and "5 failed" in text and "no_audio: 1" in text and "unreadable: 2" in text
    # failed clips leave no outputs behind
    assert not [p for p in out.rglob("*") if p.stem in BAD]


def test_outputs(prepared, mixed):
    out, _ = prepared
    rows = read_manifest(out / "manifest.json")
    assert [r["video_id"] for r in rows] == sorted(GOOD)
    for r in rows:
        seconds, fps, tone = GOOD[r["video_id"]]
        assert r["labels"] == "" and r["video"].startswith(str(mixed))
        x, sr = soundfile.read(r["wav"], dtype="float32")
        assert sr == SAMPLE_RATE and x.ndim == 1
        assert abs(len(x) - seconds * sr) < 0.03 * seconds * sr  # codec priming/padding only
        assert abs(dominant_hz(x, sr) - tone) < 5
        total = round(seconds * fps)
        for i in range(10):
            with Image.open(frame_path(r, i)) as im:
                assert (im.format, im.size) == ("JPEG", (SIZE, SIZE))
                level = np.asarray(im, float).mean()
            assert abs(level - frame_level(int(i * total / 10), total)) < 4, (r["video_id"], i, level)
    # the prepared clips' fbank statistics, stored with the manifest for the loaders
    stats = json.loads((out / "manifest.json").read_text())["fbank_stats"]
    assert stats["clips"] == stats["of"] == len(rows) and set(stats["mel_bins"]) >= {"64", "128"}
    assert all(v["std"] > 0 for v in stats["mel_bins"].values())


def test_resume_skips_finished_clips(prepared, mixed):
    out, _ = prepared
    jpg = out / "frames" / "frame_3" / "good_h264.jpg"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    s = prepare(mixed, out, processes=1, image_size=SIZE, progress=False)
    assert (s.done, s.already, sum(s.failed.values())) == (0, 2, 5)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == stamps
    assert len(read_manifest(out / "manifest.json")) == 2
    jpg.unlink()  # an incomplete clip is redone
    s = prepare(mixed, out, processes=1, image_size=SIZE, progress=False)
    assert (s.done, s.already) == (1, 1) and jpg.is_file()


def test_workers_give_same_outputs(prepared, mixed, tmp_path):
    out, _ = prepared
    s = prepare(mixed, tmp_path, processes=2, image_size=SIZE, progress=False)
    assert (s.done, s.failed) == (2, Counter(BAD.values()))
    assert (tmp_path / "manifest.json").read_text() == (out / "manifest.json").read_text()
    for p in out.rglob("*"):
        if p.suffix in (".jpg", ".wav"):
            assert (tmp_path / p.relative_to(out)).read_bytes() == p.read_bytes(), p


def test_csv_labels_flac_downmix_and_missing(mixed, tmp_path):
    make_video(tmp_path / "left only.mov", seconds=1.0, right_gain=0.0, sample_rate=22050, tone_hz=500.0)
    csv = tmp_path / "list.csv"
    csv.write_text(
        "path,labels\n"
        f"{mixed / 'good_h264.mp4'},\"dog,bark\"\n"
        "left only.mov,cat\n"
        "gone.mp4,bird\n"
        f"{mixed / 'silent.mp4'},fish\n"
    )
    s = prepare(csv, tmp_path / "out", processes=0, audio_format="flac", frames=4, image_size=SIZE,
                progress=False)
    assert (s.done, s.failed) == (2, Counter({"missing": 1, "no_audio": 1}))
    rows = read_manifest(tmp_path / "out" / "manifest.json")
    assert [(r["video_id"], r["labels"]) for r in rows] == [("good_h264", "dog,bark"), ("left_only", "cat")]
    x, sr = soundfile.read(rows[1]["wav"])
    assert rows[1]["wav"].endswith(".flac") and sr == SAMPLE_RATE
    mid = x[len(x) // 4: 3 * len(x) // 4]
    assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.25 / np.sqrt(2), rel=0.05)  # mean of 0.5 and 0
    assert all((tmp_path / "out" / "frames" / f"frame_{i}" / "left_only.jpg").is_file() for i in range(4))


def test_settings_change_redoes_clips(prepared, mixed, tmp_path):
    prepare(mixed, tmp_path, processes=1, image_size=SIZE, progress=False)
    s = prepare(mixed, tmp_path, processes=1, image_size=SIZE + 8, progress=False)
    assert (s.done, s.already) == (2, 0)
    with Image.open(tmp_path / "frames" / "frame_0" / "sub__good_vp9.jpg") as im:
        assert im.size == (SIZE + 8, SIZE + 8)


def test_cli(mixed, tmp_path, capsys):
    assert main([str(mixed), "--out", str(tmp_path), "--processes", "1", "--image-size", "16", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "2 done, 0 already done, 5 failed" in printed and "manifest.json (2 clips)" in printed
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_duplicate_stems_get_distinct_ids(tmp_path):
    for d in ("a", "b"):
        make_video(tmp_path / "src" / d / "clip.mp4", seconds=0.5)
    s = prepare(tmp_path / "src", tmp_path / "out", processes=1, image_size=SIZE, progress=False)
    assert s.done == 2
    ids = [r["video_id"] for r in read_manifest(tmp_path / "out" / "manifest.json")]
    assert ids == ["a__clip", "b__clip"]


def test_ids_stable_as_the_folder_grows(tmp_path):
    """A same-named file added in another folder renames nothing: the first clip is not prepared again
    and leaves no orphaned audio, frames or done-marker."""
    src, out = tmp_path / "src", tmp_path / "out"
    make_video(src / "a" / "b" / "c" / "real.mp4", seconds=0.5)
    assert prepare(src, out, processes=1, frames=2, image_size=SIZE, progress=False).done == 1
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    make_video(src / "e" / "real.mp4", seconds=0.5)
    s = prepare(src, out, processes=1, frames=2, image_size=SIZE, progress=False)
    assert (s.done, s.already) == (1, 1)
    assert [r["video_id"] for r in read_manifest(out / "manifest.json")] == ["a__b__c__real", "e__real"]
    after = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    redone = {p for p in before if after.get(p) != before[p]} - {Path("manifest.json"), Path("failures.jsonl")}
    assert not redone
    ids = {p.stem for p in out.rglob("*") if p.is_file() and p.suffix in (".wav", ".jpg", ".json")} - {"manifest"}
    assert ids == {"a__b__c__real", "e__real"}


# ----------------------------------------------------------------- media helpers

def test_read_audio_resamples_and_names_problems(mixed):
    x = read_audio(mixed / "sub" / "good_vp9.webm", 8000)
    assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 12000) < 400
    assert abs(dominant_hz(x, 8000) - 1000) < 5
    for name, reason in [("silent.mp4", "no_audio"), ("notes.mp4", "unreadable"), ("empty.mkv", "empty"),
                         ("absent.mp4", "missing")]:
        with pytest.raises(MediaError, match=name) as e:
            read_audio(mixed / name)
        assert e.value.reason == reason


@pytest.mark.parametrize("w, h, size", [(80, 48, 32), (33, 77, 17), (301, 173, 224), (64, 64, 64)])
def test_resize_center_crop_matches_torchvision(w, h, size):
    T = pytest.importorskip("torchvision.transforms")
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    ref = T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)(img))
    out = resize_center_crop(img, size)
    assert out.size == (size, size) and np.array_equal(np.asarray(out), np.asarray(ref))
