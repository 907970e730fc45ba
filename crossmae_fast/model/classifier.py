"""The fine-tuning model: CrossMAE's encoders, pooled, with a randomly initialised linear head (the
paper's Table 1 protocol), plus what MAE's and CAV-MAE's fine-tuning code does around it.

- `mode`: `av` (both encoders, pooled features concatenated), `audio` or `visual` (one encoder).
- `pool`: the CLS output or the mean of the patch tokens (both after the encoder's final norm).
- `linear_probe`: frozen encoders (always in eval mode), BatchNorm without affine before the head (MAE).
- `drop_path`: stochastic depth, rising linearly over the blocks to this rate (MAE / timm).
- `forward(..., missing="audio"|"visual")`: an `av` model evaluated with one modality absent (CAV-MAE's
  `missingaudioonly` / `missingvideoonly`): the absent modality's normalised feature is zero, i.e. the
  head sees its training mean (linear probe) or nothing (fine-tuning).
- Encoder parameter names are CrossMAE's (`audio_encoder.blocks.0.attn.qkv.weight`, ...), so a
  pre-training checkpoint loads without renaming; the position embeddings are stored (a timm or MAE
  checkpoint may bring its own, resized to this input with `resize_pos_embed`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import drop_path

from crossmae_fast.config import ModelConfig
from crossmae_fast.model.crossmae import Encoder, resolve_ops

MODES = ("av", "audio", "visual")
POOLS = ("cls", "mean")
MISSING = (None, "audio", "visual")
NO_DECAY = ("cls_token", "pos_embed")


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """[1, 1 + h*w, D] position embeddings (CLS first) for another patch grid: the patch part
    interpolated bicubically over the grid, the CLS position kept (MAE's `interpolate_pos_embed`)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    cls, grid = pos[:, :1], pos[:, 1:]
    d = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)], dim=1)


def _persistent_pos_embed(enc: Encoder) -> None:
    pos = enc.pos_embed
    del enc.pos_embed
    enc.register_buffer("pos_embed", pos.clone())


class Classifier(nn.Module):
    """Pooled encoder features -> (BatchNorm) -> Linear; `forward(audio [B,T,F], image [B,3,H,W])`
    returns logits [B, num_classes] (the input a mode does not use may be None)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, mode: str = "av", pool: str = "cls",
                 linear_probe: bool = False, drop_path_rate: float = 0.0):
        super().__init__()
        if mode not in MODES or pool not in POOLS:
            raise ValueError(f"mode={mode!r} / pool={pool!r}: expected one of {MODES} / {POOLS}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path={drop_path_rate} must lie in [0, 1)")
        self.cfg, self.mode, self.pool, self.linear_probe = cfg, mode, pool, linear_probe
        ops = resolve_ops("reference")  # no masking here: the fused token ops are not used
        self.audio_encoder = self.image_encoder = None
        if mode in ("av", "audio"):
            self.audio_encoder = Encoder(cfg, 1, (cfg.audio_frames, cfg.audio_bins), cfg.audio_patch, ops)
        if mode in ("av", "visual"):
            self.image_encoder = Encoder(cfg, 3, (cfg.image_size, cfg.image_size), cfg.image_patch, ops)
        self.drop_rates = [x.item() for x in torch.linspace(0, drop_path_rate, cfg.depth)]
        dim = cfg.embed_dim * (2 if mode == "av" else 1)
        self.head_norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if linear_probe else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        for enc in self.encoders():
            _persistent_pos_embed(enc)
            enc.apply(_init_like_crossmae)
            nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.01 if linear_probe else 2e-5)
        nn.init.zeros_(self.head.bias)
        if linear_probe:
            for enc in self.encoders():
                enc.requires_grad_(False)

    def encoders(self) -> list[Encoder]:
        return [e for e in (self.audio_encoder, self.image_encoder) if e is not None]

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.linear_probe:  # frozen encoders stay in eval mode (MAE's linear probe)
            for enc in self.encoders():
                enc.eval()
        return self

    def _encode(self, enc: Encoder, x: torch.Tensor) -> torch.Tensor:
        x = enc.patch_embed(x) + enc.pos_embed[:, 1:]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        train = self.training and not self.linear_probe
        for blk, p in zip(enc.blocks, self.drop_rates):
            x = x + drop_path(blk.attn(blk.norm1(x)), p, train)
            x = x + drop_path(blk.mlp(blk.norm2(x)), p, train)
        x = enc.norm(x)
        return x[:, 0] if self.pool == "cls" else x[:, 1:].mean(1)

    def features(self, audio: torch.Tensor | None, image: torch.Tensor | None) -> torch.Tensor:
        """Pooled features [B, D] (`av`: audio then visual, concatenated)."""
        parts = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.linear_probe):
            if self.audio_encoder is not None:
                parts.append(self._encode(self.audio_encoder, audio.unsqueeze(1)))
            if self.image_encoder is not None:
                parts.append(self._encode(self.image_encoder, image))
        return torch.cat(parts, dim=1)

    def forward(self, audio: torch.Tensor | None, image: torch.Tensor | None, missing: str | None = None
                ) -> torch.Tensor:
        if missing not in MISSING or (missing and self.mode != "av"):
            raise ValueError(f"missing={missing!r}: only an 'av' model takes missing='audio' or 'visual'")
        if missing == "audio":
            audio = torch.zeros(image.shape[0], self.cfg.audio_frames, self.cfg.audio_bins, device=image.device)
        if missing == "visual":
            s = self.cfg.image_size
            image = torch.zeros(audio.shape[0], 3, s, s, device=audio.device)
        x = self.head_norm(self.features(audio, image))
        if missing:
            a, v = x.split(self.cfg.embed_dim, dim=1)
            x = torch.cat([a * float(missing != "audio"), v * float(missing != "visual")], dim=1)
        return self.head(x)

    def head_keys(self) -> set[str]:
        """State-dict keys of the head (the only ones an initialisation may leave missing)."""
        return {k for k in self.state_dict() if k.startswith(("head.", "head_norm."))}


def _init_like_crossmae(m: nn.Module) -> None:
    from crossmae_fast.model.crossmae import mae_init_

    mae_init_(m)
    if isinstance(m, nn.Conv2d):  # patch embedding: Xavier over the flattened kernel, as CrossMAE
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))


def layer_id(name: str, depth: int) -> int:
    """MAE's layer index of a parameter: 0 for the embeddings, i + 1 for block i, depth + 1 above."""
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if len(parts) > 2 and parts[1] == "blocks":
        return int(parts[2]) + 1
    return depth + 1


def param_groups(model: Classifier, weight_decay: float, layer_decay: float = 1.0,
                 head_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups with MAE's layer-wise lr decay (`lr_scale = layer_decay ** (depth + 1 - layer)`)
    and CAV-MAE's head lr multiplier; no weight decay on 1-D parameters, position and CLS embeddings."""
    depth = model.cfg.depth
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.rsplit(".", 1)[-1] in NO_DECAY
        head = name.startswith("head")
        scale = head_lr_scale if head else layer_decay ** (depth + 1 - layer_id(name, depth))
        key = (head, scale, no_decay)
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                    "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())


def num_parameters(model: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


__all__ = ["MODES", "POOLS", "Classifier", "layer_id", "param_groups", "resize_pos_embed"]
