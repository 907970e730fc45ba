"""Loss terms of CrossMAE: pixel reconstruction, embedding reconstruction and contrastive (eq. 1)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

NORM_PIX_EPS = 1e-6
"""Added to each patch's variance when reconstruction targets are normalised per patch (MAE)."""


def patchify_image(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], MAE's patch order and channel-last pixels."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def patchify_audio(audio: torch.Tensor, p: int) -> torch.Tensor:
    """[B, T, F] fbank -> [B, (T/p)*(F/p), p*p], time-major (AudioMAE's order)."""
    return patchify_image(audio.unsqueeze(1), p)


def recon_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
               on: str = "masked") -> torch.Tensor:
    """Per-patch MSE averaged over masked patches (MAE), or over visible ones (`on="visible"`,
    the literal reading of the paper's eq. 9). Targets are per-patch normalised when `norm_pix`."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = mask if on == "masked" else 1.0 - mask
    return (per_patch * weight).sum() / weight.sum()


def embedding_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over every token and channel of the cross-embedding prediction."""
    return F.mse_loss(pred.float(), target.float())


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows, gradients flowing back to each rank's own; (x, 0) outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank() * x.shape[0]


def contrastive_loss(audio: torch.Tensor, visual: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised global features (eq. 1: the sum of both directions).

    Under DDP the negatives are every rank's features; each rank averages over its own rows."""
    all_audio, offset = gather_with_grad(audio)
    all_visual, _ = gather_with_grad(visual)
    labels = torch.arange(audio.shape[0], device=audio.device) + offset
    a2v = audio.float() @ all_visual.float().t() / temperature
    v2a = visual.float() @ all_audio.float().t() / temperature
    return F.cross_entropy(a2v, labels) + F.cross_entropy(v2a, labels)
