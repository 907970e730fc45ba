"""Per-dataset fbank statistics: computed by synth / prepare, stored with the manifest, used by both
loaders, overridable, recorded by a run and reused by evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchaudio
from optional import needs_media

from crossmae_fast.config import AUDIOSET_FBANK_MEAN, AUDIOSET_FBANK_STD, data_config, model_config
from crossmae_fast.data import make_loader, normalisation
from crossmae_fast.data.manifest import read_manifest, write_manifest

pytestmark = needs_media  # every test reads or writes audio files


def independent_stats(manifest, bins: int) -> tuple[float, float]:
    """Mean / std over every frame and bin of the split's Kaldi fbank, read with soundfile."""
    import soundfile

    values = []
    for row in read_manifest(manifest):
        wave, sr = soundfile.read(row["wav"], dtype="float32")
        t = torch.from_numpy(wave)[None]
        values.append(torchaudio.compliance.kaldi.fbank(
            t - t.mean(), htk_compat=True, sample_frequency=sr, use_energy=False, window_type="hanning",
            num_mel_bins=bins, dither=0.0, frame_shift=10, frame_length=25).double().flatten())
    v = torch.cat(values)
    return v.mean().item(), v.std(unbiased=False).item()


@pytest.fixture(scope="module")
def stats_set(tmp_path_factory):
    from crossmae_fast.data.synthetic import make_synthetic_set

    return make_synthetic_set(tmp_path_factory.mktemp("norm"), 12, seed=5, seconds=2.7, image_size=64)


def test_synth_stores_train_split_stats_in_both_manifests(stats_set):
    train, ev = (json.loads(stats_set[k].read_text())["fbank_stats"] for k in ("train", "eval"))
    assert train == ev and train["split"] == "train" and train["clips"] == train["of"] == 9
    assert set(train["mel_bins"]) == {str(b) for b in normalisation.preset_mel_bins()} >= {"64", "128"}
    for bins in (64, 128):
        mean, std = independent_stats(stats_set["train"], bins)
        got = train["mel_bins"][str(bins)]
        assert got["mean"] == pytest.approx(mean, abs=1e-4) and got["std"] == pytest.approx(std, abs=1e-4)
    # different filter banks, different statistics: why they are stored per bin count
    assert abs(train["mel_bins"]["64"]["mean"] - train["mel_bins"]["128"]["mean"]) > 0.1


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loaders_use_manifest_stats_unless_overridden(stats_set, tmp_path, backend):
    cfg = data_config(model_config("tiny"))
    mean, std = normalisation.stats_for(stats_set["eval"], cfg.audio_bins)

    def first_clip(manifest, **over):
        loader = make_loader(manifest, backend=backend, batch_size=1, train=False,
                             data_config=data_config(model_config("tiny"), workers=0, **over))
        assert loader.cfg.audio_mean is not None  # resolved when the loader is built
        return next(iter(loader))["audio"][0].double()

    x = first_clip(stats_set["eval"])
    raw = x * std + mean
    assert abs(x.mean().item()) < 0.5 and 0.5 < x.std().item() < 1.5  # standardised by its own split
    forced = first_clip(stats_set["eval"], audio_mean=1.0, audio_std=2.0)
    torch.testing.assert_close(forced, (raw - 1.0) / 2.0, atol=1e-4, rtol=0)
    bare = tmp_path / "bare.json"  # the same rows without statistics: AudioSet's constants
    write_manifest(bare, read_manifest(stats_set["eval"]))
    torch.testing.assert_close(first_clip(bare), (raw - AUDIOSET_FBANK_MEAN) / AUDIOSET_FBANK_STD, atol=1e-4, rtol=0)


def test_resolve_keeps_given_values_and_falls_back(stats_set):
    cfg = data_config(model_config("tiny"))
    assert normalisation.resolve(cfg, None).audio_norm() == (AUDIOSET_FBANK_MEAN, AUDIOSET_FBANK_STD)
    odd = data_config(model_config("tiny"), audio_bins=40)  # no statistics stored for 40 bins
    assert normalisation.resolve(odd, stats_set["train"]).audio_norm() == (AUDIOSET_FBANK_MEAN, AUDIOSET_FBANK_STD)
    half = normalisation.resolve(data_config(model_config("tiny"), audio_std=3.0), stats_set["train"])
    assert half.audio_std == 3.0 and half.audio_mean == normalisation.stats_for(stats_set["train"], 64)[0]


def test_stats_skip_unreadable_clips(tmp_path):
    import soundfile

    wav = tmp_path / "a.wav"
    soundfile.write(wav, (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 16000)
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    s = normalisation.fbank_stats([wav, tmp_path / "bad.wav"], mel_bins=[64])
    assert s["clips"] == 1 and s["of"] == 2 and s["mel_bins"]["64"]["std"] > 0


def test_run_records_stats_and_evaluate_reuses_them(tiny_set, tmp_path, capsys):
    """Round trip: a run normalises with its train manifest's statistics, its checkpoint and config.json
    record them, a resume keeps them, and `evaluate` normalises the eval split with them."""
    from crossmae_fast import evaluate, pretrain
    from crossmae_fast.components.checkpoint import checkpoint_data_config
    from crossmae_fast.config import run_config
    from crossmae_fast.train.trainer import Trainer

    n = torch.get_num_threads()
    base = dict(data=str(tiny_set["train"]), eval_data=str(tiny_set["eval"]), out=str(tmp_path), batch_size=4,
                ops="reference", loader="torch", workers=0, save_every=0, export_encoders=False, eval_pictures=0,
                threads=1, device="cpu")
    try:
        cfg = run_config({**base, "steps": 1})
        summary = Trainer(cfg, pretrain.make_validator(cfg)).fit()
        Trainer(run_config({**base, "steps": 2, "resume": "auto"})).fit()  # resumes with the recorded values
    finally:
        torch.set_num_threads(n)
    want = normalisation.stats_for(tiny_set["train"], 64)
    assert summary["eval"]["audio_norm"] == list(want)
    assert checkpoint_data_config(tmp_path).audio_norm() == want
    assert json.loads((tmp_path / "config.json").read_text())["data"]["audio_mean"] == want[0]
    assert evaluate.main(["--checkpoint", str(tmp_path), "--data", str(tiny_set["eval"]), "--loader", "torch",
                          "--workers", "0", "--pictures", "0", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["audio_norm"] == list(want)
    assert evaluate.main(["--checkpoint", str(tmp_path), "--data", str(tiny_set["eval"]), "--loader", "torch",
                          "--workers", "0", "--pictures", "0", "--out", str(tmp_path / "ev2"), "--audio-mean", "1",
                          "--audio-std", "2"]) == 0
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["audio_norm"] == [1.0, 2.0]
