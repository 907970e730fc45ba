"""The fine-tuning step: forward, loss against (soft) targets, backward, AdamW with per-group learning
rates (layer decay, head multiplier), eagerly or as one CUDA graph (`GraphStep`, shared with
pre-training's step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crossmae_fast.components.graph_step import GraphStep


def classification_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """BCE with logits (multi-label) or cross-entropy with probability targets (single-label)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target)


class ClassifyStep(GraphStep):
    """`step(audio, image, target)`. Inputs have static shapes (drop_last batches; mixup and label
    smoothing happen before the step), so on CUDA the step is captured once and replayed."""

    def __init__(self, model, optimizer, loss: str, device, precision: str = "fp32", cuda_graph: bool = True,
                 warmup: int = 3, capture=None):
        self.loss_kind = loss
        super().__init__(model, optimizer, ("loss",), device, precision, cuda_graph, warmup, capture)

    def _step(self, audio, image, target) -> None:
        with self.autocast():
            logits = self.model(audio, image)
        loss = classification_loss(logits.float(), target, self.loss_kind)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        self.sums += loss.detach().float().view(1)

    def __call__(self, audio: torch.Tensor, image: torch.Tensor, target: torch.Tensor) -> None:
        super().__call__(audio, image, target)
