"""Labels (CSV, targets, subsets, balanced weights), SpecAugment in both loaders, mixup, balanced sampling."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from test_data_loaders import CFG, clipset  # noqa: F401 (fixture)

from crossmae_fast.data import labels as L
from crossmae_fast.data import make_loader
from crossmae_fast.data.augment import batch_rng, mixup, spec_augment
from crossmae_fast.data.clips import epoch_batches


def test_label_csv_round_trip_and_errors(tmp_path):
    labels = L.LabelSet(("/m/a", "/m/b", "/m/c"), ("Alpha", "Beta, with comma", "Gamma"))
    path = L.write_label_csv(tmp_path / "labels.csv", labels)
    assert L.read_label_csv(path) == labels
    (tmp_path / "bad.csv").write_text("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n")
    with pytest.raises(L.LabelError, match="indices must be 0..1"):
        L.read_label_csv(tmp_path / "bad.csv")


def test_targets_name_row_and_missing_label():
    rows = [{"video_id": "v0", "labels": "/m/a,/m/b"}, {"video_id": "v1", "labels": "/m/c"}]
    labels = L.LabelSet(("/m/a", "/m/b", "/m/c"), ("a", "b", "c"))
    t = L.targets(rows, labels, "m.json")
    assert t.tolist() == [[1, 1, 0], [0, 0, 1]] and L.is_multi_label(t)
    with pytest.raises(L.LabelError, match=r"m.json: row 1 \(video_id 'v1'\): label '/m/c' is not in"):
        L.targets(rows, L.LabelSet(("/m/a", "/m/b"), ("a", "b")), "m.json")
    with pytest.raises(L.LabelError, match="row 0.*no labels"):
        L.targets([{"video_id": "v0", "labels": " "}], labels, "m.json")


def test_balanced_weights_as_cavmae():
    t = torch.tensor([[1, 0], [1, 0], [1, 1]], dtype=torch.float32)
    w = L.balanced_weights(t)
    np.testing.assert_allclose(w, [1000 / 3.01, 1000 / 3.01, 1000 / 3.01 + 1000 / 1.01])


def test_weights_tool_and_subset(tmp_path, capsys):
    rows = [{"video_id": f"v{i}", "wav": "a.wav", "video_path": "f", "labels": "xyz"[i % 3]} for i in range(12)]
    (tmp_path / "m.json").write_text(json.dumps({"data": rows}))
    assert L.main(["weights", str(tmp_path / "m.json"), "--out", str(tmp_path / "w.txt")]) == 0
    assert L.read_weights(tmp_path / "w.txt", 12) == pytest.approx([1000 / 4.01] * 12)
    rows[3]["labels"] = "q"
    (tmp_path / "m.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "l.csv").write_text("index,mid,display_name\n0,x,x\n1,y,y\n2,z,z\n")
    assert L.main(["weights", str(tmp_path / "m.json"), "--label-csv", str(tmp_path / "l.csv"),
                   "--out", str(tmp_path / "w2.txt")]) == 2
    assert "row 3" in capsys.readouterr().err and not (tmp_path / "w2.txt").exists()
    t = L.targets([{"labels": "xyz"[i % 3]} for i in range(30)], L.LabelSet(("x", "y", "z"), ("x", "y", "z")), "")
    sub = L.per_class_subset(t, 4, seed=1)
    assert len(sub) == 12 and t[sub].sum(0).tolist() == [4, 4, 4]
    assert not np.array_equal(sub, L.per_class_subset(t, 4, seed=2))


def test_spec_augment_masks_one_band_each():
    audio = torch.randn(8, 100, 32)
    out = spec_augment(audio, 10, 30, fill=-7.0, g=batch_rng(0, 0, 0))
    masked = out == -7.0
    for b in range(8):
        cols = masked[b].all(0).sum().item()  # masked mel bins (whole column)
        rows = masked[b].all(1).sum().item()  # masked frames
        assert cols < 10 and rows < 30
    assert torch.equal(out[~masked], audio[~masked])
    again = spec_augment(audio, 10, 30, fill=-7.0, g=batch_rng(0, 0, 0))
    assert torch.equal(out, again)


def test_mixup_one_lambda_for_audio_image_target():
    a, v = torch.randn(6, 4, 3), torch.randn(6, 3, 2, 2)
    t = torch.eye(6)
    ma, mv, mt = mixup(a, v, t, 1.0, batch_rng(1))
    lam = mt.diagonal()
    assert torch.all((lam > 0.1) & (lam < 0.9)) and lam.std() > 0  # Beta(10, 10), one per clip
    torch.testing.assert_close(ma, lam.view(-1, 1, 1) * a + (1 - lam.view(-1, 1, 1)) * a.flip(0))
    torch.testing.assert_close(mv, lam.view(-1, 1, 1, 1) * v + (1 - lam.view(-1, 1, 1, 1)) * v.flip(0))
    same = mixup(a, v, t, 0.0, batch_rng(1))
    assert same[0] is a


def test_balanced_sampling_draws_by_weight_with_replacement():
    w = np.array([1.0, 0, 0, 0, 3.0])
    rows = np.concatenate(epoch_batches(5, batch_size=1, shuffle=True, seed=0, epoch=0, rank=0, world_size=1,
                                        drop_last=True, weights=w))
    assert set(rows.tolist()) <= {0, 4} and len(rows) == 5
    ranks = [np.concatenate(epoch_batches(5, batch_size=1, shuffle=True, seed=0, epoch=0, rank=r, world_size=2,
                                          drop_last=False, weights=w)) for r in (0, 1)]
    assert sorted(np.concatenate(ranks).tolist()[:5]) == sorted(rows.tolist())


def test_loader_applies_spec_augment_in_training_only(clipset):  # noqa: F811
    manifest, _ = clipset
    cfg = dataclasses.replace(CFG, freqm=20, timem=100)
    mean, std = cfg.audio_norm()
    fill = -mean / std
    for backend in ("torch", "dali"):
        plain = next(iter(make_loader(manifest, backend=backend, batch_size=3, train=True, data_config=CFG)))
        aug = next(iter(make_loader(manifest, backend=backend, batch_size=3, train=True, data_config=cfg)))
        assert torch.equal(plain["index"], aug["index"])
        changed = plain["audio"] != aug["audio"]
        assert changed.any() and torch.all(aug["audio"][changed] == fill)
        ev = next(iter(make_loader(manifest, backend=backend, batch_size=3, train=False, data_config=cfg)))
        ev0 = next(iter(make_loader(manifest, backend=backend, batch_size=3, train=False, data_config=CFG)))
        assert torch.equal(ev["audio"], ev0["audio"])
