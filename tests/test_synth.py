"""The synthetic set: byte determinism, schema, boxes on the sounding object, pitch and timbre rule."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from media_fixtures import av, soundfile
from PIL import Image

from crossmae_fast.config import SAMPLE_RATE
from crossmae_fast.data.manifest import frame_path, read_manifest
from crossmae_fast.data.synthetic import make_synthetic_set
from crossmae_fast.synth import main

# The documented rule, restated here rather than imported.
F0 = {"circle": 200.0, "square": 300.0, "triangle": 450.0, "cross": 675.0}
SECONDS, SIZE, CLIPS = 1.0, 48, 40


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    paths = make_synthetic_set(out, CLIPS, seed=0, seconds=SECONDS, image_size=SIZE, eval_fraction=0.25)
    rows = read_manifest(paths["train"]) + read_manifest(paths["eval"])
    return out, paths, rows


def spectrum(path: str) -> tuple[np.ndarray, np.ndarray]:
    x, sr = soundfile.read(path, dtype="float32")
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr), mag


def band_peak(freqs, mag, f, rel=0.05):
    band = (freqs > f * (1 - rel)) & (freqs < f * (1 + rel))
    return mag[band].max()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(clips=5, seconds=0.5, image_size=32, video=True)
    make_synthetic_set(tmp_path / "a", seed=7, **kw)
    make_synthetic_set(tmp_path / "b", seed=7, **kw)
    make_synthetic_set(tmp_path / "c", seed=8, **kw)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b
    assert len(a) == 5 * 12 + 5  # 10 frames, wav, webm per clip; 2 manifests, csv, json, readme
    media = [k for k in a if k.endswith((".jpg", ".wav", ".webm"))]
    assert all(a[k] != c[k] for k in media)


def test_clip_does_not_depend_on_set_size(tmp_path, synth_set):
    out, _, _ = synth_set
    make_synthetic_set(tmp_path, 3, seed=0, seconds=SECONDS, image_size=SIZE)
    small = {k: v for k, v in digest(tmp_path).items() if k.endswith((".jpg", ".wav"))}
    big = digest(out)
    assert small and all(big[k] == v for k, v in small.items())


def test_schema_split_and_files(synth_set):
    out, paths, rows = synth_set
    train, eval_ = (json.loads(paths[k].read_text())["data"] for k in ("train", "eval"))
    assert (len(train), len(eval_)) == (30, 10)
    assert len({r["video_id"] for r in rows}) == CLIPS
    classes = [line.split(",")[2] for line in (out / "class_labels_indices.csv").read_text().split()[1:]]
    assert len(classes) == 16
    info = json.loads((out / "synth.json").read_text())
    assert info["chance"]["eval"]["retrieval_recall_at"]["1"] == pytest.approx(1 / 10)
    assert "Generative rule" in (out / "README.txt").read_text()
    for r in rows:
        assert r["labels"] in classes and "video" not in r
        assert 2 <= len(r["objects"]) <= 3
        assert len({o["label"] for o in r["objects"]}) == len(r["objects"])
        assert [r["labels"], r["bbox"][0]] in [[o["label"], o["bbox"]] for o in r["objects"]]
        x, sr = soundfile.read(r["wav"])
        assert (sr, x.ndim, len(x)) == (SAMPLE_RATE, 1, round(SECONDS * SAMPLE_RATE))
        for i in range(10):
            with Image.open(frame_path(r, i)) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (SIZE, SIZE))


def test_video_frames_match_jpegs(tmp_path):
    paths = make_synthetic_set(tmp_path, 2, seed=1, video=True, seconds=2.0, image_size=32)
    for r in read_manifest(paths["train"]) + read_manifest(paths["eval"]):
        with av.open(r["video"]) as c:
            assert c.streams.video[0].codec_context.name == "vp9" and not c.streams.audio
            frames = [f.to_ndarray(format="rgb24").astype(float) for f in c.decode(video=0)]
        assert len(frames) == 20
        for i in range(10):
            jpg = np.asarray(Image.open(frame_path(r, i)), float)
            errs = [np.abs(f - jpg).mean() for f in frames]
            assert errs[int(i * 20 / 10)] < 12, errs  # same picture up to VP9 + JPEG loss


COLOUR_TEST = {  # channel order R, G, B: which channels are high for each colour name
    "red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0),
}


def test_boxes_hold_their_objects(synth_set):
    _, _, rows = synth_set
    for r in rows:
        img = np.asarray(Image.open(frame_path(r, 5)), float)
        for o in r["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            # every shape covers the centre of its box: the centre pixels carry the object's colour
            cx, cy = int((x0 + x1) / 2 * SIZE), int((y0 + y1) / 2 * SIZE)
            rgb = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            high = np.array(COLOUR_TEST[o["label"].split("_")[0]], bool)
            assert rgb[high].min() > 150 and rgb[~high].max() < 130, (o, rgb)
            # and the box is tight: a ring just outside it is background, unlike the centre
            px0, py0, px1, py1 = (int(v * SIZE) for v in (x0, y0, x1, y1))
            ring = np.concatenate([img[max(py0 - 2, 0):py0, px0:px1], img[py1 + 1:py1 + 3, px0:px1]], 0)
            if ring.size:
                assert np.abs(ring.reshape(-1, 3).mean(0) - rgb).max() > 30


def test_pitch_follows_shape_and_position(synth_set):
    _, _, rows = synth_set
    for r in rows:
        freqs, mag = spectrum(r["wav"])
        x0, _, x1, _ = r["bbox"][0]
        expect = F0[r["labels"].split("_")[1]] * 2 ** (0.5 * ((x0 + x1) / 2 - 0.5))
        peak = freqs[np.argmax(mag * (freqs > 50))]
        assert abs(peak / expect - 1) < 0.04, (r["labels"], peak, expect)


def test_timbre_depends_on_colour(synth_set):
    _, _, rows = synth_set
    ratios = {}
    for r in rows:
        colour, shape = r["labels"].split("_")
        freqs, mag = spectrum(r["wav"])
        x0, _, x1, _ = r["bbox"][0]
        f = F0[shape] * 2 ** (0.5 * ((x0 + x1) / 2 - 0.5))
        ratios.setdefault(colour, []).append(band_peak(freqs, mag, 2 * f) / band_peak(freqs, mag, f))
    assert {"red", "green"} <= set(ratios)
    assert min(ratios["red"]) > 0.3  # harmonics 1/k: the octave is strong
    assert max(ratios["green"]) < 0.1  # odd harmonics only


def test_cli_and_bad_arguments(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--clips", "2", "--seed", "0", "--seconds", "0.5",
                 "--image-size", "16"]) == 0
    assert "2 clips (1 train, 1 eval)" in capsys.readouterr().out
    assert main(["--out", str(tmp_path), "--clips", "0", "--seed", "0"]) == 2
    with pytest.raises(ValueError, match="even"):
        make_synthetic_set(tmp_path, 1, 0, video=True, image_size=33)


def test_cached_set_is_made_once_per_parameters(tmp_path, monkeypatch):
    from crossmae_fast.data import synthetic

    made = []
    real = synthetic.make_synthetic_set
    monkeypatch.setattr(synthetic, "make_synthetic_set", lambda out, **kw: made.append(kw) or real(out, **kw))
    kw = dict(seconds=0.5, image_size=16, root=tmp_path)
    first = synthetic.cached_synthetic_set(2, 4, **kw)
    assert synthetic.cached_synthetic_set(2, 4, **kw) == first and len(made) == 1
    other = synthetic.cached_synthetic_set(2, 5, **kw)
    assert len(made) == 2 and other["train"].parent != first["train"].parent
    assert read_manifest(first["train"]) and sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []
    monkeypatch.setenv("CROSSMAE_CACHE", str(tmp_path / "env"))
    assert synthetic.cached_synthetic_set(2, 4, seconds=0.5, image_size=16)["train"].is_relative_to(tmp_path / "env")
