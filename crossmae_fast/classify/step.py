"""The fine-tuning step: forward, loss against (soft) targets, backward, AdamW with per-group learning
rates, on the pre-training step's machinery (`TrainStep`: warm-up, one CUDA graph, fallback)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crossmae_fast.train.step import TrainStep


def classification_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """BCE with logits (multi-label) or cross-entropy with probability targets (single-label)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target)


class ClassifyStep(TrainStep):
    """`step(audio, image, target)`; the learning rate of group g is `lr * g["lr_scale"]` (layer decay,
    head multiplier). Inputs have static shapes (drop_last batches; mixup and smoothing happen before),
    so on CUDA the step is captured once and replayed."""

    def __init__(self, model, optimizer, loss: str, device, precision: str = "fp32", cuda_graph: bool = True,
                 warmup: int = 3, capture=None):
        self.loss_kind = loss
        self.scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        super().__init__(model, optimizer, (), device, precision, cuda_graph, warmup, capture)

    def bind_lr(self) -> None:
        if self.lr is not None:  # one device tensor per group, written between replays
            self.group_lr = torch.zeros(len(self.opt.param_groups), device=self.device)
            self.group_scale = torch.tensor(self.scales, device=self.device)
            for i, g in enumerate(self.opt.param_groups):
                g["lr"] = self.group_lr[i]

    def set_lr(self, value: float) -> None:
        if self.lr is not None:
            self.group_lr.copy_(self.group_scale * value)
        else:
            for g, s in zip(self.opt.param_groups, self.scales):
                g["lr"] = value * s

    def _step(self, audio, image, target, _unused=None) -> None:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            logits = self.model(audio, image)
        loss = classification_loss(logits.float(), target, self.loss_kind)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        self.sums += loss.detach().float().view(1)

    def __call__(self, audio: torch.Tensor, image: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().__call__(audio, image, target)
