"""Scoring localization maps with their controls (docs/design.md, "Evaluation").

For every map kind (the zero-shot cosine map, each probe) `MapScores` collects, per clip with boxes:
cIoU against the sounding object's box and the uniform map's cIoU (its box-area fraction); where the
manifest lists every object (`objects`, as the synthetic set does), the selection accuracy (the
sounding object's box has the highest mean map value among the clip's objects; chance = mean of
1 / objects) and the cIoU against a non-sounding object's box; and the same map computed from a
mismatched clip's audio (the next clip of the batch). A map that does not beat these controls measures
objectness or the probe, not what the audio says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crossmae_fast.data.box_annotations import center_crop_boxes
from crossmae_fast.eval.metrics import ciou, gt_from_boxes, summarize_ciou


@dataclass
class ClipBoxes:
    """One clip's targets on the map grid: the sounding ground truth, and where known every object's
    box mask (the sounding one at `sounding`)."""

    gt: torch.Tensor  # [S, S] in [0, 1]
    objects: list[torch.Tensor] | None = None  # [S, S] 0/1 masks
    sounding: int | None = None


def clip_boxes(row: dict, size: int, mode: str, frame_wh: tuple[int, int] | None) -> ClipBoxes:
    """Targets of a manifest row whose `bbox` holds the sounding object's box(es); `objects` (every
    object's `bbox`) is optional. Boxes are mapped into the centre crop the loaders take."""
    def crop(boxes):
        return center_crop_boxes(boxes, *frame_wh) if frame_wh else [list(b) for b in boxes]

    gt = gt_from_boxes(crop(row["bbox"]), size, mode).float()
    objects = row.get("objects")
    if not objects or len(objects) < 2:
        return ClipBoxes(gt)
    boxes = [crop([o["bbox"]]) for o in objects]
    sounding = [i for i, o in enumerate(objects) if o["bbox"] in row["bbox"]]
    if len(sounding) != 1 or any(not b for b in boxes):
        return ClipBoxes(gt)
    return ClipBoxes(gt, [gt_from_boxes(b, size, "vggss").float() for b in boxes], sounding[0])


def selection_hits(maps: torch.Tensor, clips: list[ClipBoxes]) -> list[float]:
    """1.0 where the sounding object's box has the highest mean map value among the clip's objects
    (clips without objects are skipped)."""
    hits = []
    for m, c in zip(maps, clips):
        if c.objects:
            means = torch.stack([(m * o).sum() / o.sum() for o in c.objects])
            hits.append(float(means.argmax().item() == c.sounding))
    return hits


class MapScores:
    """Accumulates one map kind's scores batch by batch; `summary()` gives the figures."""

    def __init__(self):
        self.ciou, self.uniform, self.hits, self.chance = [], [], [], []
        self.other_ciou, self.other_uniform, self.mis_ciou, self.mis_uniform, self.mis_hits = [], [], [], [], []

    def add(self, maps: torch.Tensor, clips: list[ClipBoxes], mismatched: torch.Tensor | None = None) -> None:
        """maps [N, S, S] of N clips; `mismatched` the same maps from other clips' audio."""
        maps = maps.float().cpu()
        gt = torch.stack([c.gt for c in clips])
        self.ciou.append(ciou(maps, gt))
        self.uniform.append(ciou(torch.zeros_like(gt), gt))
        self.hits += selection_hits(maps, clips)
        self.chance += [1 / len(c.objects) for c in clips if c.objects]
        with_objects = [(m, c) for m, c in zip(maps, clips) if c.objects]
        if with_objects:  # the first object that is not sounding
            other = torch.stack([c.objects[1 if c.sounding == 0 else 0] for _, c in with_objects])
            self.other_ciou.append(ciou(torch.stack([m for m, _ in with_objects]), other))
            self.other_uniform.append(ciou(torch.zeros_like(other), other))
        if mismatched is not None:
            mismatched = mismatched.float().cpu()
            self.mis_ciou.append(ciou(mismatched, gt))
            self.mis_uniform.append(self.uniform[-1])
            self.mis_hits += selection_hits(mismatched, clips)

    def summary(self) -> dict:
        s, u = torch.cat(self.ciou), torch.cat(self.uniform)
        out = {**summarize_ciou(s), "clips": s.numel(), "uniform_map_ciou": u.mean().item(),
               "ciou_x_uniform": (s.mean() / u.mean()).item()}
        if self.hits:
            out.update(selection_accuracy=_mean(self.hits), selection_chance=_mean(self.chance),
                       selection_clips=len(self.hits))
        if self.other_ciou:
            o, ou = torch.cat(self.other_ciou), torch.cat(self.other_uniform)
            out.update(nonsounding_ciou=o.mean().item(), nonsounding_ciou_x_uniform=(o.mean() / ou.mean()).item())
        if self.mis_ciou:
            m, mu = torch.cat(self.mis_ciou), torch.cat(self.mis_uniform)
            out.update(mismatched_ciou=m.mean().item(), mismatched_ciou_x_uniform=(m.mean() / mu.mean()).item())
            if self.mis_hits:
                out["mismatched_selection_accuracy"] = _mean(self.mis_hits)
        return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
