"""Pre-training recipe (docs/design.md section 4): AdamW parameter groups and `TrainStep`, one
optimisation step of CrossMAE that runs as a single CUDA graph on GPUs (the machinery:
components/graph_step.py; the schedule: components/lr_schedule.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn

from crossmae_fast.components.graph_step import GraphStep
from crossmae_fast.config import TrainConfig

log = logging.getLogger("crossmae_fast.train")

NO_DECAY = ("cls_token", "mask_token", "queries", "pos_embed")
"""Parameter names (last component) kept out of weight decay besides biases and 1-D weights (MAE)."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """MAE's two AdamW groups: no decay on biases, 1-D weights (norms), CLS / mask tokens, queries."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in NO_DECAY
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); `capturable` on CUDA so its step can live inside a CUDA graph."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.95),
                             capturable=device.type == "cuda")


class TrainStep(GraphStep):
    """Forward, backward and AdamW update of CrossMAE on one batch (`step(audio, image[, noise_audio,
    noise_image])`), eagerly or as one CUDA graph (`GraphStep`). Masking noise is drawn inside the step
    (graph-safe Philox) unless the caller passes it explicitly."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, terms, device: torch.device,
                 precision: str = "fp32", cuda_graph: bool = True, warmup: int = 3,
                 capture: Callable[[Callable[[], None]], object] | None = None):
        super().__init__(model, optimizer, ("loss", *sorted(terms)), device, precision, cuda_graph, warmup, capture)

    def _step(self, audio, image, noise_audio=None, noise_image=None) -> None:
        with self.autocast():
            out = self.model(audio, image, noise_audio=noise_audio, noise_image=noise_image)
        out["loss"].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        self.sums += torch.stack([out[k].detach().float() for k in self.keys])

    def __call__(self, audio: torch.Tensor, image: torch.Tensor, noise_audio: torch.Tensor | None = None,
                 noise_image: torch.Tensor | None = None) -> None:
        super().__call__(audio, image, noise_audio, noise_image)
