"""Initialise a `Classifier`'s encoders from a pre-training checkpoint, exported timm encoders or an
ImageNet MAE checkpoint, and check what was loaded.

Sources (files; the caller resolves a run folder to its checkpoint or its exported encoders):
- a crossmae_fast pre-training checkpoint (`model` + `config`): both encoders by name;
- `encoder_audio.pth` / `encoder_image.pth` (timm state dicts a run exports): the one encoder, told
  apart by the patch embedding's input channels (1 = audio) or the file name;
- any other ViT state dict (ImageNet MAE, timm): both encoders, the audio patch embedding summed over
  RGB (CAV-MAE).
Position embeddings: the source's (a pre-training checkpoint's fixed sin-cos rebuilt from its config)
resized bicubically to this model's grids (`resize_pos_embed`), e.g. for 5 s clips. After loading,
every encoder key must have been written (only the head may stay as initialised) and every source
encoder key must have found its parameter with the same shape: otherwise `InitError` lists them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crossmae_fast.config import ModelConfig
from crossmae_fast.model.classifier import Classifier, resize_pos_embed
from crossmae_fast.model.pos_embed import sincos_2d
from crossmae_fast.model.weights import read_state_dict

log = logging.getLogger("crossmae_fast.finetune")

_NOT_ENCODER = ("mask_token", "decoder", "head.", "fc_norm.", "audio_decoder", "image_decoder",
                "audio_to_image", "image_to_audio")


class InitError(ValueError):
    """An initialisation that does not fit the classifier; the message lists the keys."""


@dataclass
class InitReport:
    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # source keys that are not encoder weights (decoders, heads)
    mismatched: list[str] = field(default_factory=list)  # encoder keys with no parameter or another shape
    missing: list[str] = field(default_factory=list)  # classifier keys left as initialised


def _read(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, tuple[int, int]], list[str]]:
    """({encoder prefix: its state dict}, {prefix: grid of the source's position embedding}, unused keys)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "config" in obj:
        cfg = ModelConfig(**obj["config"]["model"])
        parts: dict[str, dict] = {"audio_encoder": {}, "image_encoder": {}}
        unused = []
        for k, v in obj["model"].items():
            prefix, _, rest = k.partition(".")
            (parts[prefix].__setitem__(rest, v) if prefix in parts else unused.append(k))
        grids = {"audio_encoder": cfg.audio_grid, "image_encoder": cfg.image_grid}
        for prefix, grid in grids.items():
            parts[prefix]["pos_embed"] = sincos_2d(cfg.embed_dim, grid, cls_token=True)[None]
        return parts, grids, unused
    state = read_state_dict(path)
    unused = [k for k in state if k.startswith(_NOT_ENCODER)]
    state = {k: v for k, v in state.items() if not k.startswith(_NOT_ENCODER)}
    w = state.get("patch_embed.proj.weight")
    if w is None:
        raise InitError(f"--init {path}: no ViT encoder weights in it (no patch_embed.proj.weight)")
    if w.shape[1] == 1 or "encoder_audio" in path.name:
        prefixes = ["audio_encoder"]
    elif "encoder_image" in path.name:
        prefixes = ["image_encoder"]
    else:  # an ImageNet ViT for both encoders
        audio = dict(state, **{"patch_embed.proj.weight": w.sum(dim=1, keepdim=True)})
        return {"image_encoder": state, "audio_encoder": audio}, {}, unused
    return {prefixes[0]: state}, {}, unused


def _source_grid(pos: torch.Tensor, new_grid: tuple[int, int], prefix: str) -> tuple[int, int]:
    """Grid of a [1, 1 + L, D] position embedding: square for images, the same frequency rows for audio."""
    n = pos.shape[1] - 1
    if prefix == "image_encoder":
        side = math.isqrt(n)
        if side * side == n:
            return side, side
    elif n % new_grid[1] == 0:
        return n // new_grid[1], new_grid[1]
    raise InitError(f"{prefix}.pos_embed: {n} positions do not form a grid like {new_grid}")


def init_classifier(model: Classifier, paths: list[str | Path]) -> InitReport:
    """Load the encoders from `paths` (see the module docstring); InitError when keys do not fit."""
    report = InitReport()
    own = model.state_dict()
    written: dict[str, torch.Tensor] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise InitError(f"--init {path}: no such file")
        try:
            parts, grids, unused = _read(path)
        except InitError:
            raise
        except Exception as e:  # not a torch file, pickled objects refused by weights_only, ...
            raise InitError(f"--init {path}: not a checkpoint or state dict ({type(e).__name__}: {e})") from None
        report.unused += [f"{path.name}:{k}" for k in unused]
        for prefix, state in parts.items():
            enc = getattr(model, prefix)
            if enc is None:  # the mode does not use this encoder
                report.unused += [f"{path.name}:{prefix}.*"]
                continue
            for key, value in state.items():
                name = f"{prefix}.{key}"
                if key == "pos_embed" and name in own:
                    grid = grids.get(prefix) or _source_grid(value, enc.grid, prefix)
                    value = resize_pos_embed(value.reshape(1, -1, value.shape[-1]), grid, enc.grid)
                if name not in own or own[name].shape != value.shape:
                    shape = f"{tuple(value.shape)} != {tuple(own[name].shape)}" if name in own else ""
                    report.mismatched.append(f"{name} ({shape or 'no such parameter'})")
                    continue
                written[name] = value
    report.loaded = sorted(written)
    report.missing = sorted(set(own) - set(written) - model.head_keys())
    if report.mismatched or report.missing:
        lines = [f"unexpected {k}" for k in report.mismatched] + [f"missing {k}" for k in report.missing]
        raise InitError(f"--init {', '.join(map(str, paths))} does not fit the classifier (only the head may be "
                        f"missing):\n  " + "\n  ".join(lines[:20]) + ("\n  ..." if len(lines) > 20 else ""))
    model.load_state_dict({**own, **written})
    log.info("init: %d tensors loaded from %s; %d unused (decoders, heads); head initialised at random",
             len(report.loaded), ", ".join(map(str, paths)), len(report.unused))
    return report
