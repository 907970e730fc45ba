"""Localization probe and map scoring with controls, on planted features where the answer is known."""

from __future__ import annotations

import pytest
import torch

from crossmae_fast.eval.localization import ClipBoxes, MapScores, clip_boxes, selection_hits
from crossmae_fast.eval.metrics import gt_from_boxes, localization_map
from crossmae_fast.eval.probe import ProbeConfig, fit_probe, mil_contrastive_loss

GRID, SIZE, WIDTH, CLASSES = (4, 4), 16, 24, 6


def test_mil_loss_matches_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(5, 7, 8, generator=g), dim=-1)
    scores = torch.tensor([[max(float(a[i] @ p[j, k]) for k in range(7)) for j in range(5)] for i in range(5)]) / 0.1
    want = sum(-torch.log_softmax(scores[i], 0)[i] - torch.log_softmax(scores[:, i], 0)[i] for i in range(5)) / 5
    torch.testing.assert_close(mil_contrastive_loss(a, p, 0.1), want.float(), rtol=1e-5, atol=1e-5)


def planted(n: int, seed: int, signal: bool = True):
    """Clips with 2-3 objects on a 4x4 grid of patch features; each object cell carries its class
    embedding (when `signal`) plus noise; the audio feature is the sounding class's own embedding
    (rotated) plus noise. Returns audio [n, D], patches [n, 16, D], targets."""
    g = torch.Generator().manual_seed(seed)
    emb_v = torch.randn(CLASSES, WIDTH, generator=torch.Generator().manual_seed(99)).unbind(0)
    mix = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(98)))[0]
    audio, patches, clips = [], [], []
    for _ in range(n):
        k = int(torch.randint(2, 4, (1,), generator=g))
        cells = torch.randperm(16, generator=g)[:k].tolist()
        classes = torch.randperm(CLASSES, generator=g)[:k].tolist()
        p = torch.randn(16, WIDTH, generator=g)
        if signal:
            for c, cls in zip(cells, classes):
                p[c] += 3 * emb_v[cls]
        sounding = int(torch.randint(k, (1,), generator=g))
        audio.append(emb_v[classes[sounding]] @ mix + 0.3 * torch.randn(WIDTH, generator=g))
        patches.append(p)
        boxes = [[(c % 4) / 4, (c // 4) / 4, (c % 4 + 1) / 4, (c // 4 + 1) / 4] for c in cells]
        clips.append(ClipBoxes(gt_from_boxes([boxes[sounding]], SIZE, "vggss").float(),
                               [gt_from_boxes([b], SIZE, "vggss").float() for b in boxes], sounding))
    return torch.stack(audio), torch.stack(patches), clips


def scores_of(heads, audio, patches, clips) -> dict:
    a, p = heads(audio, patches)
    s = MapScores()
    s.add(localization_map(a, p, GRID, SIZE), clips, localization_map(a.roll(1, 0), p, GRID, SIZE))
    return s.summary()


def test_probe_finds_planted_sounding_object_and_controls_stay_at_chance():
    cfg = ProbeConfig(steps=200, dim=16, lr=1e-2)
    audio, patches, _ = planted(512, seed=0)
    ev_audio, ev_patches, ev_clips = planted(200, seed=1)
    heads = fit_probe(audio, patches, cfg, seed=0)
    s = scores_of(heads, ev_audio, ev_patches, ev_clips)
    assert s["selection_accuracy"] > 0.75 and s["ciou_x_uniform"] > 1.5
    assert abs(s["mismatched_selection_accuracy"] - s["selection_chance"]) < 0.15
    assert s["nonsounding_ciou_x_uniform"] < 1
    # the same probe on features without the planted signal: chance
    audio0, patches0, _ = planted(512, seed=0, signal=False)
    ev0 = planted(200, seed=1, signal=False)
    s0 = scores_of(fit_probe(audio0, patches0, cfg, seed=0), *ev0)
    assert abs(s0["selection_accuracy"] - s0["selection_chance"]) < 0.15


def test_probe_is_seeded():
    audio, patches, _ = planted(64, seed=0)
    cfg = ProbeConfig(steps=3, dim=8)
    a, b, c = (fit_probe(audio, patches, cfg, seed=s).audio.weight for s in (0, 0, 1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_map_scores_on_exact_and_uniform_maps():
    _, _, clips = planted(20, seed=2)
    # the sounding box plus faint noise: the median threshold keeps the box and half the background
    noise = torch.rand(20, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    exact = torch.stack([c.gt for c in clips]) + 1e-3 * noise
    s = MapScores()
    s.add(exact, clips, torch.zeros_like(exact))
    out = s.summary()
    assert out["selection_accuracy"] == 1.0 and out["ciou_x_uniform"] > 1.8 and out["nonsounding_ciou_x_uniform"] < 1.2
    assert out["mismatched_ciou_x_uniform"] == pytest.approx(1.0)  # a constant map selects every pixel
    assert out["selection_chance"] == pytest.approx(sum(1 / len(c.objects) for c in clips) / 20)
    assert selection_hits(exact, [ClipBoxes(c.gt) for c in clips]) == []  # no objects listed: skipped


def test_clip_boxes_reads_synthetic_rows():
    row = {"bbox": [[0.5, 0.5, 1.0, 1.0]], "objects": [{"label": "a", "bbox": [0.0, 0.0, 0.25, 0.25]},
                                                       {"label": "b", "bbox": [0.5, 0.5, 1.0, 1.0]}]}
    c = clip_boxes(row, 8, "vggss", (8, 8))
    assert c.sounding == 1 and len(c.objects) == 2 and c.gt.sum() == 16 and c.objects[0].sum() == 4
    wide = clip_boxes(row, 8, "vggss", (16, 8))  # centre crop of a 2:1 frame keeps x in [0.25, 0.75]
    assert wide.objects is None or wide.objects[0].sum() == 0 or wide.sounding == 1
    assert clip_boxes({"bbox": row["bbox"]}, 8, "vggss", None).objects is None
