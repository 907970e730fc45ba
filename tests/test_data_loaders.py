"""DALI (CPU) and torch loaders against each other and against independent references.

The clips are written here: harmonic-plus-noise mixtures as 16 kHz WAV, 16 kHz FLAC and 44.1 kHz
stereo WAV, longer and shorter than the 1024-frame target and one shorter than a single window; smooth
random pictures (with a sharp-edged box) of several aspect ratios as JPEG frames. Video mode: synth clips
with VP9 files, plus VP9 and H.264 (B-frames) clips whose frames all differ.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import sys
import weakref
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from media_fixtures import av, soundfile
from optional import missing, needs
from PIL import Image

from crossmae_fast.config import SAMPLE_RATE, DataConfig
from crossmae_fast.data import make_loader
from crossmae_fast.data.clips import ClipSet, epoch_batches
from crossmae_fast.data.fbank import image_features, kaldi_fbank
from crossmae_fast.data.manifest import ManifestError, frame_path, read_manifest
from crossmae_fast.data.media import frame_indices, save_jpeg
from crossmae_fast.data.synthetic import make_synthetic_set

CFG = DataConfig(audio_frames=1024, audio_bins=128, image_size=64)
SR = SAMPLE_RATE
# (seconds, sample rate, channels, format): 10 s (998 frames), crop, resample + downmix, pad, < 1 window
CLIPS = [(10.0, SR, 1, "wav"), (12.3, SR, 1, "flac"), (3.3, 44100, 2, "wav"), (2.0, SR, 1, "wav"),
         (0.02, SR, 1, "wav"), (10.4, SR, 1, "wav"), (6.0, SR, 1, "flac")]
# (74, 70) and (110, 70) are where a rounded long side or a floored crop offset would differ from torchvision
SIZES = [(96, 72), (72, 96), (64, 64), (74, 70), (50, 40), (110, 70), (81, 67)]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
# Without DALI, backend="dali" falls back to the torch loader: comparisons between the two would pass
# trivially, so they are skipped, and loops over the backends run the torch loader alone.
needs_dali = needs("nvidia.dali")
BACKENDS = ("torch",) if missing("nvidia.dali") else ("dali", "torch")


def mixture(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Three amplitude-modulated harmonic tones (80 Hz - 1 kHz) plus a noise-like sum of 48 random
    partials (50 Hz - 7 kHz); a function of time only, so any sample rate samples the same signal."""
    x = np.zeros_like(t)
    for _ in range(3):
        f0 = rng.uniform(80, 1000)
        env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 4) * t + rng.uniform(0, 6))
        x += env * sum(rng.uniform(0.05, 0.2) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6))
                       for k in range(1, 6))
    level = rng.uniform(0.01, 0.1)
    for f in rng.uniform(50, 7000, 48):
        x += level / 5 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6))
    return x / 2.6  # the worst-case peak (2.33) stays below 0.9


def picture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth colour waves with a flat, sharp-edged box."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    waves = [np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy) + rng.uniform(0, 6))
             for _ in range(3)]
    a = 128 + 100 * np.stack(waves, -1)
    a[h // 4: h // 2, w // 4: w // 2] = rng.integers(0, 256, 3)
    return a.clip(0, 255).astype(np.uint8)


def write_set(folder: Path, seed: int = 0) -> tuple[Path, list[np.ndarray]]:
    """Clips of CLIPS with frames of SIZES; returns the manifest and each clip's ideal 16 kHz mono wave."""
    rows, ideal = [], []
    for j, ((sec, sr, ch, fmt), (w, h)) in enumerate(zip(CLIPS, SIZES)):
        vid = f"clip{j}"
        sub = np.random.default_rng([seed, j])
        t = np.arange(round(sec * sr)) / sr
        waves = [mixture(np.random.default_rng([seed, j, c]), t) for c in range(ch)]
        (folder / "audio").mkdir(parents=True, exist_ok=True)
        soundfile.write(folder / "audio" / f"{vid}.{fmt}", np.stack(waves, 1), sr, subtype="PCM_16")
        t16 = np.arange(round(sec * SR)) / SR  # the same mixture sampled at 16 kHz, channels averaged
        ideal.append(np.mean([mixture(np.random.default_rng([seed, j, c]), t16) for c in range(ch)], 0))
        for i in range(CFG.num_frames):
            (folder / "frames" / f"frame_{i}").mkdir(parents=True, exist_ok=True)
            save_jpeg(Image.fromarray(picture(sub, w, h)), folder / "frames" / f"frame_{i}" / f"{vid}.jpg")
        rows.append({"video_id": vid, "wav": f"audio/{vid}.{fmt}", "video_path": "frames", "labels": "x"})
    path = folder / "manifest.json"
    path.write_text(json.dumps({"data": rows}))
    return path, ideal


@pytest.fixture(scope="module")
def clipset(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("clips"))


def epoch(manifest, backend, **kw) -> dict[str, torch.Tensor]:
    """Every batch of one epoch, concatenated; `workers` and `video` are set on the data config."""
    over = {k: kw.pop(k) for k in ("workers", "video") if k in kw}
    kw = {"batch_size": 3, "train": False, "data_config": dataclasses.replace(CFG, **over), **kw}
    loader = make_loader(manifest, backend=backend, **kw)
    batches = list(loader)
    assert len(batches) == len(loader)
    out = {k: torch.cat([b[k] for b in batches]) for k in ("audio", "image", "index")}
    assert out["audio"].dtype == out["image"].dtype == torch.float32 and out["index"].dtype == torch.int64
    return out


def logmel(audio: torch.Tensor) -> torch.Tensor:
    mean, std = CFG.audio_norm()
    return audio * std + mean


@needs_dali
def test_dali_matches_torch_and_kaldi(clipset):
    manifest, ideal = clipset
    dali, ref = epoch(manifest, "dali"), epoch(manifest, "torch")
    n = len(CLIPS)
    assert dali["index"].tolist() == ref["index"].tolist() == list(range(n))
    assert dali["audio"].shape == ref["audio"].shape == (n, CFG.audio_frames, CFG.audio_bins)
    assert dali["image"].shape == ref["image"].shape == (n, 3, CFG.image_size, CFG.image_size)

    clips = ClipSet(manifest, CFG)
    for j, (sec, sr, ch, fmt) in enumerate(CLIPS):
        valid = min(CFG.audio_frames, max(0, (round(sec * SR) - 400) // 160 + 1))
        d, r = logmel(dali["audio"][j]), logmel(ref["audio"][j])
        assert (r[valid:] == 0).all() and (d[valid:].abs() < 1e-4).all(), f"clip {j}: padding"
        if valid == 0:
            continue
        d, r = d[:valid], r[:valid]
        diff = (d - r).abs().mean().item()
        corr = torch.corrcoef(torch.stack([d.flatten(), r.flatten()]))[0, 1].item()
        print(f"clip {j} ({sr} Hz, {ch} ch, {fmt}): DALI vs torch log-mel |diff| {diff:.4f}, corr {corr:.6f}")
        if sr == SR:  # same samples on both sides: DALI's fbank vs torchaudio's Kaldi fbank
            assert diff <= 0.02 and corr >= 0.999, f"clip {j}: |diff| {diff}, corr {corr}"
            oracle = kaldi_fbank(soundfile.read(clips.audio[j], dtype="float32")[0], CFG)[:valid]
            assert torch.allclose(r, oracle, atol=1e-4), f"clip {j}: torch loader is not the Kaldi fbank"
        # Resampled and downmixed (two different resamplers): both near the ideal 16 kHz mono signal.
        ideal_fb = kaldi_fbank(ideal[j].astype(np.float32), CFG)[:valid]
        for name, x in (("dali", d), ("torch", r)):
            e = (x - ideal_fb).abs().mean().item()
            assert e <= (0.03 if sr == SR else 0.1), f"clip {j} {name}: |diff| {e} from the ideal mono 16 kHz"

    img_diff = (dali["image"] - ref["image"]).abs()
    print(f"image |diff| (normalised units): mean {img_diff.mean():.4f}, max {img_diff.max():.3f}")
    assert img_diff.mean() <= 0.01 and img_diff.max() <= 0.1  # a 1-pixel crop shift gives ~0.2 mean
    oracle = torch.stack([image_features(Image.open(clips.frame_path(j, CFG.eval_frame)), CFG)
                          for j in range(n)])
    assert torch.equal(ref["image"], oracle)


@needs_dali
def test_train_shuffles_by_epoch_and_draws_frames(clipset):
    manifest, _ = clipset
    kw = {"batch_size": 2, "train": True, "seed": 3}
    loaders = {b: make_loader(manifest, backend=b, data_config=CFG, **kw) for b in ("dali", "torch")}
    for loader in loaders.values():
        next(iter(loader))  # an epoch left after one batch must not disturb the next
    orders = []
    for ep in (0, 1):
        got = {}
        for b, loader in loaders.items():
            loader.set_epoch(ep)
            batches = list(loader)
            assert len(batches) == len(loader) == len(CLIPS) // 2  # drop_last in training
            got[b] = {k: torch.cat([x[k] for x in batches]) for k in ("image", "index")}
        assert got["dali"]["index"].tolist() == got["torch"]["index"].tolist()
        assert (got["dali"]["image"] - got["torch"]["image"]).abs().mean() <= 0.01
        rows = got["torch"]["index"].tolist()
        assert len(set(rows)) == len(rows) == len(CLIPS) // 2 * 2
        clips = loaders["torch"].clips
        frames = [clips.frame(r, True, 3, ep) for r in rows]
        want = torch.stack([image_features(Image.open(clips.frame_path(r, f)), CFG)
                            for r, f in zip(rows, frames)])
        assert torch.equal(got["torch"]["image"], want)
        orders.append((rows, frames))
    assert orders[0][0] != orders[1][0], "set_epoch must reshuffle"
    all_frames = [clips.frame(r, True, 3, e) for r in range(len(CLIPS)) for e in range(4)]
    assert len(set(all_frames)) > 1, "training must draw different frames"


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_set_epoch_start_batch_resumes_the_epoch_tail(clipset, backend):
    """A loader started at batch k of an epoch yields exactly the tail of that epoch read in one go
    (rows, audio, pictures), and reads no file of the batches it skips."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    manifest, _ = clipset
    # workers=0: the DataLoader in this process, so the patched reader below sees every read
    loader = make_loader(manifest, backend=backend, batch_size=2, train=True, seed=4,
                         data_config=dataclasses.replace(CFG, workers=0))
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == len(loader) == 3
    read = []
    original = loader.clips.frame_path
    loader.clips.frame_path = lambda row, frame: read.append(row) or original(row, frame)
    loader.set_epoch(2, start_batch=1)
    tail = list(loader)
    assert len(tail) == 2
    for got, want in zip(tail, full[1:]):
        for k in ("index", "audio", "image"):
            assert torch.equal(got[k], want[k]), k
    assert sorted(read) == sorted(torch.cat([b["index"] for b in full[1:]]).tolist())
    loader.set_epoch(2, start_batch=3)
    assert list(loader) == []
    loader.set_epoch(3)
    assert loader.start_batch == 0 and len(list(loader)) == 3
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(2, start_batch=4)


@pytest.mark.parametrize("n, world, batch, shuffle, drop_last", [
    (7, 2, 3, False, False), (7, 2, 2, True, True), (12, 3, 4, True, False), (5, 4, 1, False, False),
])
def test_epoch_batches_shard(n, world, batch, shuffle, drop_last):
    shards = [np.concatenate(epoch_batches(n, batch_size=batch, shuffle=shuffle, seed=1, epoch=2, rank=r,
                                           world_size=world, drop_last=drop_last) or [np.zeros(0, int)])
              for r in range(world)]
    per_rank = -(-n // world)
    kept = per_rank - per_rank % batch if drop_last else per_rank
    assert all(len(s) == kept for s in shards)
    if not drop_last:
        flat = np.concatenate(shards)
        assert set(flat.tolist()) == set(range(n))  # covering
        assert len(flat) - len(set(flat.tolist())) == per_rank * world - n  # only the padding repeats
    for s in shards:
        assert len(set(s.tolist())) == len(s)


def test_two_ranks_disjoint_and_covering(clipset):
    manifest, _ = clipset
    n = len(CLIPS)
    for backend in BACKENDS:
        for train in (False, True):
            kw = {"train": train, "drop_last": False, "world_size": 2}
            seen = [epoch(manifest, backend, rank=r, **kw)["index"].tolist() for r in (0, 1)]
            assert len(seen[0]) == len(seen[1]) == (n + 1) // 2
            assert set(seen[0]) | set(seen[1]) == set(range(n))
            assert len(set(seen[0]) & set(seen[1])) == 1  # 7 rows on 2 ranks: one row padded in twice


def test_bad_files_logged_replaced_counted(clipset, tmp_path, caplog):
    manifest, _ = clipset
    rows = json.loads(manifest.read_text())["data"]
    base = manifest.parent
    rows = [{**r, "wav": str(base / r["wav"]), "video_path": str(base / r["video_path"])} for r in rows]
    (tmp_path / "frames" / f"frame_{CFG.eval_frame}").mkdir(parents=True)
    bad = {
        1: dict(rows[1], wav=str(tmp_path / "missing.wav")),
        3: dict(rows[3], wav=str(tmp_path / "notes.wav")),  # a text file
        4: dict(rows[4], video_id="cut", video_path=str(tmp_path / "frames")),  # truncated JPEG
    }
    (tmp_path / "notes.wav").write_text("this is not audio\n")
    jpg = Path(frame_path(rows[0], CFG.eval_frame)).read_bytes()
    Path(frame_path(bad[4], CFG.eval_frame)).write_bytes(jpg[: len(jpg) // 2])
    rows = [bad.get(j, r) for j, r in enumerate(rows)]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"data": rows}))
    want = [0, 2, 2, 5, 5, 5, 6]  # each bad row replaced by the next good one
    for backend in BACKENDS:
        caplog.clear()
        loader = make_loader(path, backend=backend, batch_size=3, train=False, data_config=CFG)
        with caplog.at_level(logging.WARNING, logger="crossmae_fast.data"):
            for ep in range(2):
                loader.set_epoch(ep)
                assert torch.cat([b["index"] for b in loader]).tolist() == want
        assert sorted(loader.stats.bad) == [1, 3, 4], (backend, loader.stats.bad)
        assert loader.stats.replaced == 2 * 3
        logged = [r.getMessage() for r in caplog.records if "skipped and replaced" in r.getMessage()]
        assert len(logged) == 3, logged  # once per bad row, not once per epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_schema_names_row_and_field(clipset, tmp_path, backend):
    rows = json.loads(clipset[0].read_text())["data"]
    rows[2] = {k: v for k, v in rows[2].items() if k != "wav"}
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"data": rows}))
    with pytest.raises(ManifestError, match=r"row 2 .*'wav'"):
        make_loader(path, backend=backend, batch_size=2, train=True, data_config=CFG)
    with pytest.raises(ValueError, match="rank"):
        make_loader(clipset[0], backend=backend, batch_size=2, train=True, data_config=CFG, rank=2,
                    world_size=2)


def test_missing_pyav_is_one_clear_error_not_bad_clips(clipset, monkeypatch):
    """Without PyAV no clip is readable: the loader says so instead of marking every row bad."""
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    with pytest.raises(ImportError, match="pip install av"):
        epoch(clipset[0], "torch", workers=0)


def test_dali_missing_falls_back_with_one_warning(clipset, monkeypatch, caplog):
    import crossmae_fast.data as data

    monkeypatch.setitem(sys.modules, "crossmae_fast.data.dali_loader", None)  # import raises ImportError
    monkeypatch.setattr(data, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="crossmae_fast.data"):
        loaders = [make_loader(clipset[0], backend="dali", batch_size=2, train=False, data_config=CFG)
                   for _ in range(2)]
    assert all(type(x).__name__ == "TorchLoader" for x in loaders)
    assert sum("DALI is not importable" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="backend"):
        make_loader(clipset[0], backend="jax", batch_size=2, train=False, data_config=CFG)


@needs_dali
def test_dropped_dali_loader_frees_its_pipeline(clipset):
    """Without the cyclic GC: otherwise a forked DataLoader worker may finalise it and crash."""
    loader = make_loader(clipset[0], backend="dali", batch_size=4, train=False, data_config=CFG)
    list(loader)
    pipe = weakref.ref(loader._pipe)
    gc.disable()
    try:
        del loader
        assert pipe() is None
    finally:
        gc.enable()


@needs_dali
@pytest.mark.gpu
def test_dali_gpu_matches_cpu(clipset):
    manifest, _ = clipset
    gpu, cpu = epoch(manifest, "dali", device="cuda"), epoch(manifest, "dali")
    assert gpu["audio"].is_cuda and gpu["image"].is_cuda
    assert torch.equal(gpu["index"].cpu(), cpu["index"])
    assert (gpu["audio"].cpu() - cpu["audio"]).abs().max() <= 1e-3
    assert (gpu["image"].cpu() - cpu["image"]).abs().mean() <= 0.02  # nvJPEG vs libjpeg-turbo


def write_video(path: Path, frames: list[np.ndarray], codec: str, fmt: str, **options: str) -> None:
    with av.open(str(path), "w", format=fmt) as out:
        vs = out.add_stream(codec, rate=25)
        vs.height, vs.width = frames[0].shape[:2]
        vs.pix_fmt, vs.options = "yuv420p", options
        for k, pix in enumerate(frames):
            f = av.VideoFrame.from_ndarray(pix, format="rgb24")
            f.pts, f.time_base = k, Fraction(1, 25)
            out.mux(vs.encode(f))
        out.mux(vs.encode(None))


def decoded(path: str) -> list[Image.Image]:
    """Every frame, decoded from the start (the oracle of seeking)."""
    with av.open(path) as c:
        return [f.to_image() for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def videoset(tmp_path_factory):
    """4 synth clips (VP9, 64 px, frames differing only in noise) plus two clips whose 23 frames all
    differ, with frequent keyframes (seeking matters) and a resize: VP9 80x60 and H.264 with B-frames
    60x80. Their JPEG frames follow `prepare`'s rule."""
    out = tmp_path_factory.mktemp("video")
    make_synthetic_set(out, 4, seed=5, video=True, seconds=2.0, image_size=64, eval_fraction=0.5)
    rows = read_manifest(out / "train.json") + read_manifest(out / "eval.json")
    rng = np.random.default_rng(7)
    for vid, codec, fmt, (w, h), opts in [("vp9", "libvpx-vp9", "webm", (80, 60), {"g": "4"}),
                                          ("h264", "libx264", "mp4", (60, 80), {"g": "5", "bf": "2"})]:
        path = out / f"{vid}.{fmt}"
        write_video(path, [picture(rng, w, h) for _ in range(23)], codec, fmt, **opts)
        frames = decoded(str(path))
        row = {"video_id": vid, "wav": rows[0]["wav"], "video_path": str(out / "frames"), "labels": "x",
               "video": str(path)}
        for i, k in enumerate(frame_indices(len(frames), CFG.num_frames)):
            save_jpeg(frames[k], frame_path(row, i))
        rows.append(row)
    path = out / "all.json"
    path.write_text(json.dumps({"data": rows}))
    return path


@needs_dali
def test_video_decode_matches_jpeg_frames_and_backends(videoset, caplog):
    clips = ClipSet(videoset, CFG)
    got = {}
    with caplog.at_level(logging.WARNING, logger="crossmae_fast.data"):
        for backend in ("torch", "dali"):
            for video in (False, True):
                got[backend, video] = epoch(videoset, backend, video=video)["image"]
    assert any("h264" in r.getMessage() for r in caplog.records)  # DALI on the CPU: JPEG for H.264
    # The torch loader decodes the frame of the JPEG rule (seeking), exactly as decoding from the start.
    oracle = []
    for r in range(len(clips)):
        index, k = clips.video_frame(r, CFG.eval_frame)
        assert k == frame_indices(index.total, CFG.num_frames)[CFG.eval_frame]
        oracle.append(image_features(decoded(clips.video(r))[k], CFG))
    assert torch.equal(got["torch", True], torch.stack(oracle))
    vs_jpeg = (got["torch", True] - got["torch", False]).abs().mean((1, 2, 3))
    vs_dali = (got["dali", True] - got["torch", True]).abs().mean((1, 2, 3))
    print(f"video vs JPEG frames {vs_jpeg.numpy().round(4)}; DALI vs torch video {vs_dali.numpy().round(4)}")
    assert vs_jpeg.max() <= 0.12  # JPEG q90 of the same decoded frame (synth: VP9 of noisy frames)
    # FFmpeg's YUV -> RGB (and PIL's resize) vs DALI's; a neighbouring frame of the last two gives ~1.
    # The H.264 row (last) is the JPEG frame in DALI on the CPU.
    assert vs_dali[:-1].max() <= 0.08 and vs_dali[-1] <= 0.12
    # Training: both backends draw the same random frame of the distinct-frame clips.
    kw = {"train": True, "seed": 2, "batch_size": 6}
    train = {b: make_loader(videoset, backend=b, data_config=dataclasses.replace(CFG, video=True), **kw)
             for b in ("dali", "torch")}
    for ep in (0, 1):
        batches = {}
        for b, loader in train.items():
            loader.set_epoch(ep)
            batches[b] = next(iter(loader))
        assert batches["dali"]["index"].tolist() == batches["torch"]["index"].tolist()
        diff = (batches["dali"]["image"] - batches["torch"]["image"]).abs().mean((1, 2, 3))
        assert diff.max() <= 0.12, diff


def test_corrupt_video_replaced_and_counted(videoset, tmp_path, caplog):
    rows = read_manifest(videoset)
    (tmp_path / "notes.webm").write_text("not a video\n")
    garbled = tmp_path / "garbled.webm"  # a valid container with random VP9 payloads after the keyframe
    rng = np.random.default_rng(0)
    with av.open(rows[4]["video"]) as src, av.open(str(garbled), "w", format="webm") as out:
        s = out.add_stream_from_template(src.streams.video[0])
        for p in src.demux(video=0):
            if p.size:
                q = av.Packet(bytes(p) if p.is_keyframe else rng.integers(0, 256, p.size, np.uint8).tobytes())
                q.pts, q.dts, q.time_base, q.stream = p.pts, p.dts, p.time_base, s
                out.mux(q)
    rows[1] = dict(rows[1], video=str(tmp_path / "notes.webm"))
    rows[4] = dict(rows[4], video=str(garbled))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"data": rows}))
    for backend in BACKENDS:
        caplog.clear()
        loader = make_loader(path, backend=backend, batch_size=3, train=False,
                             data_config=dataclasses.replace(CFG, video=True))
        with caplog.at_level(logging.WARNING, logger="crossmae_fast.data"):
            assert torch.cat([b["index"] for b in loader]).tolist() == [0, 2, 2, 3, 5, 5]
        assert sorted(loader.stats.bad) == [1, 4], (backend, loader.stats.bad)
        assert loader.stats.replaced == 2
        assert sum("skipped and replaced" in r.getMessage() for r in caplog.records) == 2
