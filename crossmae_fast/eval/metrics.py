"""Evaluation metrics: audio-visual retrieval and sound-source localization (docs/design.md section 5).

Retrieval follows CAV-MAE's `src/retrieval.py`: cosine similarity of global features, the 0-based
rank of the true pair in each row, R@K = mean(rank < K), median rank reported 1-based
(`median(rank) + 1`, numpy's median: the mean of the two middle values for even N).

One deliberate difference: CAV-MAE's rank is the position of the first column equal to the true
similarity, so ties count in the query's favour (a collapsed model with identical features would
score R@1 = 1). Here ties count *against* the query: rank = number of other columns whose
similarity is >= the true one. For tie-free matrices both definitions agree.

Localization follows EZ-VSL's `utils.py` / `test.py`: per map, min-max normalise (a constant map is
left as is), threshold at the element of index `H*W // 2` of the ascending sorted map (pixels >= it
are 1), `cIoU = sum(pred*gt) / (sum(gt) + sum(pred*(gt==0)))`; AP50 = mean(cIoU >= 0.5), AUC =
trapezoid of success(t) = mean(cIoU >= t) over t = 0.05*i, i = 0..20. A constant (uniform) map
selects every pixel, so its cIoU is the ground-truth area fraction: the chance level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

RECALL_AT = (1, 5, 10)
AUC_THRESHOLDS = tuple(0.05 * i for i in range(21))


def retrieval_ranks(sim: torch.Tensor) -> torch.Tensor:
    """0-based rank of the true match (column i) in each row i of an [N, N] similarity matrix.

    rank = number of columns j != i with sim[i, j] >= sim[i, i]: ties count against the query.
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity matrix must be square [N, N], got shape {tuple(sim.shape)}")
    if sim.shape[0] == 0:
        raise ValueError("similarity matrix is empty")
    if not torch.isfinite(sim).all():
        raise ValueError("similarity matrix has NaN or infinite entries")
    true = sim.diagonal().unsqueeze(1)
    return (sim >= true).sum(1) - 1  # the true column itself is always counted once


def retrieval_metrics(sim: torch.Tensor, recall_at: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """R@K (fractions in [0, 1]; keys `r1`, `r5`, `r10`), `median_rank` and `mean_rank` (both 1-based)."""
    rank = retrieval_ranks(sim).double()
    out = {f"r{k}": (rank < k).double().mean().item() for k in recall_at}
    out["median_rank"] = torch.quantile(rank, 0.5).item() + 1  # linear interpolation == numpy median
    out["mean_rank"] = rank.mean().item() + 1
    return out


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, M] cosine similarities between the rows of `a` [N, D] and `b` [M, D], in float32 or wider."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, torch.float32)
    return F.normalize(a.to(dtype), dim=1) @ F.normalize(b.to(dtype), dim=1).T


def retrieval_report(audio_feat: torch.Tensor, visual_feat: torch.Tensor) -> dict[str, dict[str, float]]:
    """Both directions from paired global features [N, D]: `a2v` (audio queries) and `v2a`."""
    if audio_feat.shape != visual_feat.shape:
        raise ValueError(
            f"audio and visual features must be paired with equal shapes, "
            f"got {tuple(audio_feat.shape)} and {tuple(visual_feat.shape)}"
        )
    sim = cosine_similarity_matrix(audio_feat, visual_feat)
    return {"a2v": retrieval_metrics(sim), "v2a": retrieval_metrics(sim.T)}


def localization_map(
    audio_global: torch.Tensor, visual_patches: torch.Tensor, grid: tuple[int, int], size: int = 224
) -> torch.Tensor:
    """Cosine map between each clip's audio feature [N, D] and its visual patches [N, h*w, D] (row-major
    patch order), bilinearly upsampled (align_corners=True) to [N, size, size]."""
    n, length, dim = visual_patches.shape
    h, w = grid
    if h * w != length:
        raise ValueError(f"grid {grid} has {h * w} cells but visual_patches has {length} tokens")
    if audio_global.shape != (n, dim):
        raise ValueError(f"audio_global must be [{n}, {dim}], got {tuple(audio_global.shape)}")
    dtype = torch.promote_types(visual_patches.dtype, torch.float32)
    a = F.normalize(audio_global.to(dtype), dim=-1)
    v = F.normalize(visual_patches.to(dtype), dim=-1)
    cos = torch.einsum("nd,nld->nl", a, v).reshape(n, 1, h, w)
    return F.interpolate(cos, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation of [N, H, W] maps to [0, 1]; constant maps are returned unchanged."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), flat)
    return out.view_as(maps)


def binarize_at_median(maps: torch.Tensor) -> torch.Tensor:
    """[N, H, W] min-max normalised maps -> 0/1 maps, 1 where the pixel >= the (H*W//2)-th smallest value."""
    flat = normalise_maps(maps).flatten(1)
    thr = flat.kthvalue(flat.shape[1] // 2 + 1, dim=1, keepdim=True).values
    return (flat >= thr).to(flat.dtype).view_as(maps)


def ciou(maps: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Consensus IoU [N] of median-thresholded prediction maps against ground-truth maps in [0, 1]."""
    if maps.ndim != 3 or maps.shape != gt.shape:
        raise ValueError(f"maps and gt must both be [N, H, W], got {tuple(maps.shape)} and {tuple(gt.shape)}")
    if not torch.isfinite(maps).all():
        raise ValueError("localization maps have NaN or infinite entries")
    maps, gt = maps.double(), gt.double()
    pred = binarize_at_median(maps)
    inter = (pred * gt).sum((1, 2))
    return inter / (gt.sum((1, 2)) + (pred * (gt == 0)).sum((1, 2)))


def localization_metrics(maps: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """`ap50` = mean(cIoU >= 0.5), `ciou` = mean cIoU, `auc` of the success curve over 21 thresholds."""
    return summarize_ciou(ciou(maps, gt))


def summarize_ciou(scores: torch.Tensor) -> dict[str, float]:
    """`localization_metrics` from per-clip cIoU scores [N] (lets callers score batch by batch)."""
    scores = scores.double().flatten()
    if scores.numel() == 0:
        raise ValueError("no cIoU scores to summarise")
    thresholds = torch.tensor(AUC_THRESHOLDS, dtype=torch.float64)
    success = (scores.unsqueeze(0) >= thresholds.unsqueeze(1)).double().mean(1)
    return {
        "ap50": (scores >= 0.5).double().mean().item(),
        "ciou": scores.mean().item(),
        "auc": torch.trapezoid(success, thresholds).item(),
    }


def gt_from_boxes(boxes: Sequence[Sequence[float]], size: int = 224, mode: str = "flickr") -> torch.Tensor:
    """Ground-truth map [size, size] from normalised `[x0, y0, x1, y1]` boxes.

    Pixel edges are `int(clip(v, 0, 1) * size)`, end exclusive, as EZ-VSL rounds them. `flickr`: sum of
    the annotators' boxes / 2, clipped to 1 (two of three annotators agreeing is full confidence);
    `vggss`: union of the boxes.
    """
    if mode not in ("flickr", "vggss"):
        raise ValueError(f"mode={mode!r} is not one of 'flickr', 'vggss'")
    b = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    if not torch.isfinite(b).all():
        raise ValueError(f"boxes have NaN or infinite coordinates: {b.tolist()}")
    edges = (b.clamp(0, 1) * size).long()
    pos = torch.arange(size)
    rows = (pos >= edges[:, 1:2]) & (pos < edges[:, 3:4])  # [B, size]
    cols = (pos >= edges[:, 0:1]) & (pos < edges[:, 2:3])
    count = (rows.unsqueeze(2) & cols.unsqueeze(1)).double().sum(0)
    return (count / 2).clamp(max=1) if mode == "flickr" else (count > 0).double()
