"""Retrieval and localization metrics against hand-computed cases and brute-force loops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossmae_fast.eval.metrics import (
    gt_from_boxes,
    localization_map,
    localization_metrics,
    retrieval_metrics,
    retrieval_ranks,
    retrieval_report,
)

# ---------------------------------------------------------------- retrieval

def brute_force_retrieval(sim: np.ndarray) -> dict[str, float]:
    """Loop reference: rank = how many other columns are at least as similar as the true one."""
    n = sim.shape[0]
    ranks = []
    for i in range(n):
        ranks.append(sum(1 for j in range(n) if j != i and sim[i, j] >= sim[i, i]))
    ranks = sorted(ranks)
    mid = (ranks[(n - 1) // 2] + ranks[n // 2]) / 2
    return {
        "r1": sum(r < 1 for r in ranks) / n,
        "r5": sum(r < 5 for r in ranks) / n,
        "r10": sum(r < 10 for r in ranks) / n,
        "median_rank": mid + 1,
        "mean_rank": sum(ranks) / n + 1,
    }


@pytest.mark.parametrize("n", [1, 2, 13, 40])
def test_retrieval_matches_brute_force(n):
    g = torch.Generator().manual_seed(n)
    # integer values so the true column often ties, plus a diagonal boost so ranks spread out
    boost = torch.diag(torch.randint(0, 3, (n,), generator=g))
    sim = (torch.randint(0, 6, (n, n), generator=g) + boost).float()
    got = retrieval_metrics(sim)
    want = brute_force_retrieval(sim.numpy())
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_retrieval_ties_count_against():
    sim = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # row 0: one tie -> rank 1; row 1: one larger -> rank 1; row 2: two ties -> rank 2
    assert retrieval_ranks(sim).tolist() == [1, 1, 2]
    m = retrieval_metrics(sim)
    assert m["r1"] == 0 and m["r5"] == 1
    assert m["median_rank"] == 2 and m["mean_rank"] == pytest.approx(1 + 4 / 3)


def test_constant_features_are_not_rewarded():
    n = 12
    m = retrieval_report(torch.ones(n, 8), torch.ones(n, 8))
    for d in ("a2v", "v2a"):
        assert m[d]["r1"] == 0 and m[d]["r10"] == 0
        assert m[d]["median_rank"] == n


def test_retrieval_report_directions():
    g = torch.Generator().manual_seed(0)
    n, d = 31, 7
    a, v = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 3
    sim = np.array([[float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for y in v.numpy()]
                    for x in a.numpy()])
    rep = retrieval_report(a, v)
    for key, val in brute_force_retrieval(sim).items():
        assert rep["a2v"][key] == pytest.approx(val), key
    for key, val in brute_force_retrieval(sim.T).items():
        assert rep["v2a"][key] == pytest.approx(val), key
    # a perfect pairing retrieves everything at rank 0
    perfect = retrieval_report(a, a * 2)
    assert perfect["a2v"]["r1"] == 1 and perfect["v2a"]["median_rank"] == 1


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 4), torch.zeros(3), torch.tensor([[0.0, float("nan")], [0.0, 1.0]])]
)
def test_retrieval_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        retrieval_metrics(bad)


# ---------------------------------------------------------------- localization

def reference_ciou(pred_map: np.ndarray, gt: np.ndarray) -> float:
    """Per-map loop in EZ-VSL's steps: min-max, threshold at sorted[H*W//2], consensus IoU."""
    lo, hi = pred_map.min(), pred_map.max()
    if hi - lo != 0:
        pred_map = (pred_map - lo) / (hi - lo)
    thr = np.sort(pred_map.flatten())[pred_map.size // 2]
    infer = np.zeros_like(pred_map)
    infer[pred_map >= thr] = 1
    return float(np.sum(infer * gt) / (np.sum(gt) + np.sum(infer * (gt == 0))))


def reference_metrics(cious: list[float]) -> dict[str, float]:
    c = np.array(cious)
    thr = [0.05 * i for i in range(21)]
    success = [np.mean(c >= t) for t in thr]
    auc = sum((thr[i + 1] - thr[i]) * (success[i] + success[i + 1]) / 2 for i in range(20))
    return {"ap50": float(np.mean(c >= 0.5)), "ciou": float(c.mean()), "auc": auc}


def paint(boxes, size, mode):
    """Loop reference for ground-truth maps."""
    gt = np.zeros((size, size))
    for x0, y0, x1, y1 in boxes:
        e = [int(min(max(v, 0.0), 1.0) * size) for v in (x0, y0, x1, y1)]
        temp = np.zeros((size, size))
        temp[e[1]:e[3], e[0]:e[2]] = 1
        gt += temp
    if mode == "flickr":
        return np.minimum(gt / 2, 1)
    return (gt > 0).astype(float)


@pytest.mark.parametrize("mode", ["flickr", "vggss"])
def test_gt_from_boxes_matches_painting(mode):
    rng = np.random.default_rng(1)
    for _ in range(5):
        k = rng.integers(1, 4)
        boxes = np.sort(rng.uniform(-0.1, 1.1, (k, 2, 2)), axis=1).transpose(0, 2, 1).reshape(k, 4)
        boxes = boxes[:, [0, 2, 1, 3]].tolist()  # [x0, y0, x1, y1] with x0 <= x1, y0 <= y1
        np.testing.assert_array_equal(gt_from_boxes(boxes, 37, mode).numpy(), paint(boxes, 37, mode))


def test_flickr_pixel_scale_matches_ezvsl_rounding():
    # Flickr boxes come in 256 px; EZ-VSL maps them with int(224 * v / 256)
    x0, y0, x1, y1 = [int(224 * v / 256) for v in (13, 97, 255, 200)]
    gt = gt_from_boxes([[13 / 256, 97 / 256, 255 / 256, 200 / 256]], 224, "vggss")
    want = torch.zeros(224, 224)
    want[y0:y1, x0:x1] = 1
    assert torch.equal(gt.float(), want)


def test_localization_matches_reference_loop():
    g = torch.Generator().manual_seed(3)
    n, size = 9, 40
    maps = torch.randn(n, 5, 5, generator=g)
    maps = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    maps[0] = 0.25  # a constant map
    maps[1] = torch.randint(0, 3, (size, size), generator=g).float()  # many ties at the median
    rng = np.random.default_rng(3)
    gts = []
    for i in range(n):
        xy = np.sort(rng.uniform(0, 1, (2, 2)), axis=1)
        box = [xy[0, 0], xy[1, 0], xy[0, 1], xy[1, 1]]
        gts.append(gt_from_boxes([box], size, "flickr" if i % 2 else "vggss"))
    gt = torch.stack(gts)
    got = localization_metrics(maps, gt)
    want = reference_metrics([reference_ciou(m.numpy(), t.numpy()) for m, t in zip(maps, gt)])
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_perfect_and_inverted_maps():
    size = 224
    gt = gt_from_boxes([[0.0, 0.0, 0.5, 1.0]], size, "vggss")  # left half: exactly H*W/2 pixels
    perfect = localization_metrics(gt[None] * 3 + 1, gt[None])
    assert perfect == {"ap50": 1.0, "ciou": 1.0, "auc": pytest.approx(1.0)}
    inverted = localization_metrics(1 - gt[None], gt[None])
    # cIoU 0: success(0) = 1 and 0 for every t > 0, so AUC = 0.05 * (1 + 0) / 2
    assert inverted == {"ap50": 0.0, "ciou": 0.0, "auc": pytest.approx(0.025)}


@pytest.mark.parametrize("mode, annotators", [("vggss", 1), ("flickr", 1), ("flickr", 2)])
def test_box_covering_whole_frame(mode, annotators):
    """Half the pixels are selected; gt is everywhere c (1, or 0.5 for one Flickr annotator):
    cIoU = (H*W/2 * c) / (H*W * c) = 0.5, whatever the map."""
    g = torch.Generator().manual_seed(annotators)
    gt = gt_from_boxes([[0, 0, 1, 1]] * annotators, 224, mode)
    assert gt.unique().tolist() == ([0.5] if mode == "flickr" and annotators == 1 else [1.0])
    maps = torch.rand(3, 224, 224, generator=g)
    m = localization_metrics(maps, gt.expand(3, -1, -1))
    assert m["ciou"] == pytest.approx(0.5)
    assert m["ap50"] == 1.0
    assert m["auc"] == pytest.approx(0.05 * 10 + 0.05 / 2)  # success 1 up to t = 0.5, then 0


def test_uniform_map_scores_box_area():
    gt = gt_from_boxes([[0.25, 0.25, 0.75, 0.75]], 224, "vggss")
    m = localization_metrics(torch.zeros(1, 224, 224), gt[None])
    assert m["ciou"] == pytest.approx(0.25)


def test_localization_map_cosine_and_upsampling():
    g = torch.Generator().manual_seed(5)
    n, h, w, d = 3, 3, 4, 6
    a, v = torch.randn(n, d, generator=g), torch.randn(n, h * w, d, generator=g)
    out = localization_map(a, v, (h, w), size=13)
    assert out.shape == (n, 13, 13)
    # corners of an align_corners=True upsampling are the grid corners
    for i in range(n):
        corners = {(0, 0): (0, 0), (0, 12): (0, w - 1), (12, 0): (h - 1, 0), (12, 12): (h - 1, w - 1)}
        for (r, c), (gr, gc) in corners.items():
            x, y = a[i], v[i, gr * w + gc]
            assert out[i, r, c].item() == pytest.approx((x @ y / (x.norm() * y.norm())).item(), abs=1e-6)
    # a visual patch equal to the audio feature is the map's maximum, 1
    v[0, 5] = a[0] * 2
    top = localization_map(a, v, (h, w), size=13)[0]  # 13 puts every grid point on a pixel
    assert top.max().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        localization_map(a, v, (h, w + 1))


def test_localization_rejects_bad_shapes():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        localization_metrics(torch.rand(2, 8, 8, generator=g), torch.rand(2, 8, 9, generator=g))
    with pytest.raises(ValueError):
        gt_from_boxes([[0, 0, 1, 1]], 8, mode="coco")
    assert math.isfinite(localization_metrics(torch.rand(1, 8, 8, generator=g), torch.zeros(1, 8, 8))["ciou"])
