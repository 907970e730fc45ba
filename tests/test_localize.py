"""localize: a user's video in, heatmaps, an overlay MP4 and embeddings out; bad inputs one line each.

Media are made here: H.264/AAC mp4 and VP9/Opus webm (tests/media_fixtures.py), a video without
audio, a truncated file, a text file; and `synth --video` clips with their WAV muxed in as PCM
(`mux_clip`), so that localize's inputs can be compared with the loaders' for the same clip.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from media_fixtures import av, frame_level, make_video, truncate

from crossmae_fast import localize as cli
from crossmae_fast.components.checkpoint import (
    TrainState,
    checkpoint_data_config,
    checkpoint_state,
    model_from_checkpoint,
)
from crossmae_fast.config import data_config, model_config, run_config
from crossmae_fast.data import make_loader, normalisation
from crossmae_fast.data.manifest import read_manifest
from crossmae_fast.eval.localizer import clip_maps, folder_names, peak
from crossmae_fast.eval.metrics import localization_map
from crossmae_fast.eval.probe import ProbeConfig, fit_probe, load_probes, save_probes
from crossmae_fast.eval.video import MediaError, Window, crop_box, display_size, mux_clip, read_clip
from crossmae_fast.model.crossmae import CrossMAE


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding one checkpoint of an untrained tiny model, with its own fbank statistics."""
    root = tmp_path_factory.mktemp("localize_run")
    torch.manual_seed(0)
    cfg = model_config("tiny", ops="reference")
    run_cfg = run_config({"model": cfg.to_dict(), "data": {"audio_mean": -3.0, "audio_std": 2.5}})
    net = CrossMAE(cfg)
    torch.save(checkpoint_state(net, torch.optim.SGD(net.parameters()), run_cfg, 1, TrainState(1)),
               root / "checkpoint-00000001.pt")
    return root


@pytest.fixture(scope="module")
def model(run):
    return model_from_checkpoint(run)


@pytest.fixture(scope="module")
def synth_video(synthetic_set, tmp_path_factory):
    """The eval rows of a tiny `synth --video` set and each clip muxed with its audio."""
    paths = synthetic_set(6, seed=5, seconds=2.7, image_size=64, video=True)
    rows = read_manifest(paths["eval"])
    folder = tmp_path_factory.mktemp("muxed")
    return paths["eval"], rows, [mux_clip(r["video"], r["wav"], folder / f"{r['video_id']}.mkv") for r in rows]


def test_inputs_are_the_loaders(synth_video, model):
    manifest, rows, muxed = synth_video
    cfg = normalisation.resolve(data_config(model.cfg), manifest)
    loader_cfg = dataclasses.replace(cfg, loader="torch", workers=0, video=True)
    batch = next(iter(make_loader(manifest, batch_size=len(rows), train=False, data_config=loader_cfg)))
    for j, path in enumerate(muxed):
        clip = read_clip(path, cfg)
        assert clip.total == 27 and clip.sampled == [int(i * 27 / 10) for i in range(10)]
        assert clip.times == pytest.approx([k / 10 for k in clip.sampled])
        torch.testing.assert_close(clip.audio, batch["audio"][j], atol=1e-4, rtol=0)  # same fbank, same padding
        torch.testing.assert_close(clip.images[cfg.eval_frame], batch["image"][j])  # same frame, same crop


def test_maps_are_the_evaluation_maps_batched_or_not(synth_video, model):
    manifest, rows, muxed = synth_video
    cfg = normalisation.resolve(data_config(model.cfg), manifest)
    clips = [read_clip(p, cfg) for p in muxed[:3]]
    together = clip_maps(model, clips)
    for clip, res in zip(clips, together):
        a, v, patches = model.eval_features(clip.audio[None].expand(10, -1, -1), clip.images)
        torch.testing.assert_close(res.maps, localization_map(a, patches, model.cfg.image_grid, 64))
        torch.testing.assert_close(res.audio, a[0])
        torch.testing.assert_close(res.visual, v)
        alone = clip_maps(model, [clip])[0]
        torch.testing.assert_close(alone.maps, res.maps, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0].maps, together[1].maps)  # each clip its own audio


def test_probe_file_round_trip_and_its_maps(synth_video, model, tmp_path):
    _, _, muxed = synth_video
    clip = read_clip(muxed[0], data_config(model.cfg))
    a, _, p = model.eval_features(torch.stack([clip.audio] * 10), clip.images)
    pcfg = ProbeConfig(steps=3, batch_size=4, seeds=(0, 1))
    heads = {s: fit_probe(a, p, pcfg, s) for s in pcfg.seeds}
    path = save_probes(tmp_path / "probe.pt", heads, pcfg, {"checkpoint": "x"})
    loaded, meta = load_probes(path)
    assert meta["width"] == model.cfg.embed_dim and meta["source"] == {"checkpoint": "x"} and len(loaded) == 2
    want = torch.stack([localization_map(*h(a, p), model.cfg.image_grid, 64) for h in heads.values()]).mean(0)
    torch.testing.assert_close(clip_maps(model, [clip], loaded)[0].maps, want)
    assert not torch.allclose(want, clip_maps(model, [clip])[0].maps)


def test_window_padding_and_geometry(tmp_path, model):
    path = make_video(tmp_path / "grey.mp4", seconds=3.0, size=(80, 48))  # frame k is grey frame_level(k, 30)
    cfg = data_config(model.cfg)
    clip = read_clip(path, cfg, Window(start=1.0, seconds=1.0))
    assert clip.total == 10 and clip.audio_seconds == pytest.approx(1.0, abs=0.03)
    levels = [int(np.asarray(f)[..., 0].mean().round()) for f in clip.display]
    assert levels == pytest.approx([frame_level(10 + i, 30) for i in range(10)], abs=3)
    # 1 s of audio is 98 fbank frames; the rest of the 256 are the padding's value, as the loaders pad
    mean, std = cfg.audio_norm()
    torch.testing.assert_close(clip.audio[100:], torch.full_like(clip.audio[100:], -mean / std))
    assert not torch.allclose(clip.audio[:90], torch.full_like(clip.audio[:90], -mean / std))
    assert display_size(1920, 1080) == (852, 480) and display_size(81, 49) == (80, 48)
    assert crop_box((80, 48)) == (16, 0, 64, 48)
    m = torch.zeros(64, 64)
    m[0, 63] = 1  # top right of the square the model saw
    assert peak(m, (80, 48)) == pytest.approx([(16 + 63.5 * 48 / 64) / 80, 0.5 * 48 / 64 / 48], abs=1e-3)
    with pytest.raises(MediaError, match="no video frame between 5 s"):
        read_clip(path, cfg, Window(start=5.0, seconds=1.0))
    with pytest.raises(ValueError):
        Window(seconds=0)


def test_folder_names_are_unique():
    assert folder_names([Path("a/x.mp4"), Path("b/x.webm"), Path("y.mp4")]) == ["x", "x_2", "y"]


def run_cli(capsys, *args: str) -> tuple[int, list[str], str]:
    rc = cli.main([*args, "--device", "cpu", "--workers", "1"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return rc, captured.err.strip().splitlines(), captured.out


def test_cli_on_user_media_with_bad_files_beside(run, tmp_path, capsys):
    good = {
        "h264": make_video(tmp_path / "h264.mp4", seconds=2.0, size=(80, 48)),
        "vp9": make_video(tmp_path / "vp9.webm", seconds=1.5, fps=12, size=(48, 64), vcodec="libvpx-vp9",
                          acodec="libopus", sample_rate=48000, tone_hz=1000.0),
    }
    silent = make_video(tmp_path / "silent.mp4", acodec=None)
    whole = make_video(tmp_path / "whole.mp4", seconds=2.0, faststart=True)
    cut = truncate(whole, tmp_path / "cut.mp4", 0.4)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    out = tmp_path / "out"
    rc, err, stdout = run_cli(capsys, str(silent), str(good["h264"]), str(cut), str(text), str(good["vp9"]),
                              "--checkpoint", str(run), "--out", str(out), "--embed", "--batch-size", "2")
    assert rc == 2 and len(err) == 3 and all(line.startswith("localize: error: ") for line in err)
    for bad, words in ((silent, "no audio"), (cut, "cut short"), (text, "not a video")):
        assert any(str(bad) in line and words in line for line in err), (bad, err)
    assert "wrote 2 of 5" in stdout
    run_cfg = checkpoint_data_config(run)  # the run's own fbank statistics, not AudioSet's
    assert run_cfg.audio_mean == -3.0
    want = clip_maps(model_from_checkpoint(run), [read_clip(good["h264"], run_cfg)])[0]
    np.testing.assert_allclose(np.load(out / "h264" / "embeddings.npz")["audio"], want.audio.numpy(), atol=1e-5)
    for name, src in good.items():
        folder = out / name
        assert sorted(p.name for p in folder.glob("frame_*.png")) == [f"frame_{i}.png" for i in range(10)]
        assert (folder / "heatmaps.png").stat().st_size > 0
        summary = json.loads((folder / "localization.json").read_text())
        assert summary["map"] == "zero-shot" and len(summary["frames"]) == 10
        emb = np.load(folder / "embeddings.npz")
        assert emb["audio"].shape == (128,) and emb["visual"].shape == (10, 128)
        assert np.linalg.norm(emb["audio"]) == pytest.approx(1, abs=1e-5)
        with av.open(str(folder / "overlay.mp4")) as c, av.open(str(src)) as s:
            assert [st.type for st in c.streams] == ["video", "audio"]
            assert c.streams.audio[0].rate == s.streams.audio[0].rate
            frames = list(c.decode(video=0))
            assert len(frames) == sum(1 for _ in s.decode(video=0))
            assert (frames[0].width, frames[0].height) == (s.streams.video[0].width, s.streams.video[0].height)
            assert float(c.duration / 1e6) == pytest.approx(float(s.duration / 1e6), abs=0.15)


def test_overlay_carries_each_frames_own_map(tmp_path, model):
    """Frame k of the MP4 shows the map of the last sampled frame at or before k."""
    from crossmae_fast.eval import overlay
    from crossmae_fast.eval.video import window_frames

    path = make_video(tmp_path / "v.mp4", seconds=2.0, size=(64, 64))
    clip = read_clip(path, data_config(model.cfg))
    maps = torch.zeros(10, 8, 8)
    for i in range(10):  # map i is bright in column i % 8 only
        maps[i, :, i % 8] = 1
    heat = overlay.heat_layers(maps, 64)
    out = overlay.write_overlay_mp4(tmp_path / "o.mp4", window_frames(path, clip.window), heat, clip.sampled,
                                    (64, 64), clip.fps, clip.sound, clip.sound_rate)
    with av.open(str(out)) as c:
        written = [f.to_ndarray(format="rgb24").astype(float) for f in c.decode(video=0)]
    source = [img for _, img in window_frames(path, clip.window)]
    assert len(written) == len(source) == 20
    for k, (w, src) in enumerate(zip(written, source)):
        i = max(j for j, s in enumerate(clip.sampled) if s <= k)
        errors = [np.abs(w - overlay.blend(src, h)).mean() for h in heat]  # H.264 is lossy: the nearest
        assert int(np.argmin(errors)) in {j for j in range(10) if j % 8 == i % 8}, (k, i, errors)
        assert errors[i] < 6


def test_bad_checkpoint_and_probe_one_line(run, tmp_path, capsys):
    video = make_video(tmp_path / "v.mp4", seconds=1.0)
    not_ckpt = tmp_path / "checkpoint-00000009.pt"
    not_ckpt.write_bytes(b"not a checkpoint")
    rc, err, _ = run_cli(capsys, str(video), "--checkpoint", str(not_ckpt), "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err) == 1 and str(not_ckpt) in err[0]
    rc, err, _ = run_cli(capsys, str(video), "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err) == 1 and "nowhere" in err[0]
    bad_probe = tmp_path / "probe.pt"
    torch.save({"heads": {}}, bad_probe)
    rc, err, _ = run_cli(capsys, str(video), "--checkpoint", str(run), "--probe", str(bad_probe))
    assert rc == 2 and len(err) == 1 and str(bad_probe) in err[0] and "probe" in err[0]
    wide = tmp_path / "wide.pt"
    heads = {0: fit_probe(torch.randn(8, 32), torch.randn(8, 4, 32), ProbeConfig(steps=1, seeds=(0,)), 0)}
    save_probes(wide, heads, ProbeConfig(steps=1, seeds=(0,)), {})
    rc, err, _ = run_cli(capsys, str(video), "--checkpoint", str(run), "--probe", str(wide))
    assert rc == 2 and len(err) == 1 and "32-wide" in err[0]
    assert not (run / "localize").exists()
    rc, err, out = run_cli(capsys, str(video), "--checkpoint", str(run))
    assert rc == 0 and not err and (run / "localize" / "v" / "overlay.mp4").is_file()


@pytest.mark.gpu
def test_maps_on_gpu_match_cpu(synth_video, model):
    """The same maps on the GPU (bf16 autocast) as on the CPU, within bf16's precision."""
    _, _, muxed = synth_video
    clips = [read_clip(p, data_config(model.cfg)) for p in muxed[:2]]
    cpu = clip_maps(model, clips)
    gpu = clip_maps(model.to("cuda"), clips)
    model.to("cpu")
    for c, g in zip(cpu, gpu):
        assert torch.nn.functional.cosine_similarity(c.maps.flatten(), g.maps.flatten(), dim=0) > 0.99
        assert torch.nn.functional.cosine_similarity(c.audio, g.audio, dim=0) > 0.99


def test_evaluate_saves_the_probe_localize_uses(run, synth_video, tmp_path, capsys):
    """`evaluate --probe-data ... --save-probe FILE` keeps every probe seed's heads; `localize --probe FILE`
    maps with their mean; `--save-probe` without `--probe-data` is refused."""
    from crossmae_fast import evaluate

    manifest, _, muxed = synth_video
    probe = tmp_path / "heads" / "probe.pt"
    common = ["--checkpoint", str(run), "--data", str(manifest), "--loader", "torch", "--workers", "0",
              "--device", "cpu", "--pictures", "0", "--out", str(tmp_path / "eval")]
    assert evaluate.main([*common, "--probe-data", str(manifest), "--probe-steps", "3", "--probe-seeds", "0", "1",
                          "2", "--save-probe", str(probe)]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    per_seed = [s["selection_accuracy"] for s in metrics["probe"]["seeds"].values()]
    assert metrics["probe"]["std"]["selection_accuracy"] == pytest.approx(np.std(per_seed, ddof=1))
    heads, meta = load_probes(probe)
    assert len(heads) == 3 and meta["source"]["checkpoint"] == str(run) and meta["config"]["steps"] == 3
    capsys.readouterr()
    rc, err, _ = run_cli(capsys, str(muxed[0]), "--checkpoint", str(run), "--probe", str(probe), "--out",
                         str(tmp_path / "loc"), "--embed")
    assert rc == 0 and not err
    summary = json.loads((tmp_path / "loc" / muxed[0].stem / "localization.json").read_text())
    assert summary["map"] == "probe (3 heads)"
    model = model_from_checkpoint(run)
    clip = read_clip(muxed[0], checkpoint_data_config(run))
    want = clip_maps(model, [clip], heads)[0].maps
    got = clip_maps(model, [clip])[0].maps
    assert not torch.allclose(want, got)  # the probe's map is not the zero-shot one
    assert [f["peak_xy"] for f in summary["frames"]] == [peak(m, clip.display_size) for m in want]
    with pytest.raises(SystemExit) as stop:
        evaluate.main([*common, "--save-probe", str(probe)])
    assert stop.value.code == 2 and "--save-probe needs --probe-data" in capsys.readouterr().err


def test_unwritable_out_is_one_line_per_video(run, tmp_path, capsys):
    video = make_video(tmp_path / "v.mp4", seconds=1.0)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be\n")
    rc, err, _ = run_cli(capsys, str(video), "--checkpoint", str(run), "--out", str(blocked))
    assert rc == 2 and len(err) == 1 and str(video) in err[0] and str(blocked) in err[0], err
