"""Load ImageNet MAE / timm ViT weights into both encoders; export encoders as timm state dicts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crossmae_fast.model.crossmae import CrossMAE, Encoder

log = logging.getLogger(__name__)

# Recomputed for each input size (fixed sin-cos), or belonging to MAE's decoder / timm's heads.
_NOT_ENCODER = ("pos_embed", "mask_token", "decoder_", "head.", "fc_norm.")


@dataclass
class LoadReport:
    """What `load_mae_checkpoint` did with each checkpoint key."""

    loaded: list[str] = field(default_factory=list)  # model keys written
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason
    missing: list[str] = field(default_factory=list)  # encoder keys the checkpoint lacks


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of an MAE (`{"model": ...}`), timm or plain state-dict file, read with weights_only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled extras (e.g. argparse args) are refused by weights_only
        raise ValueError(f"{path}: not loadable with weights_only=True ({err}); "
                         "re-save it as a plain state dict") from err
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_encoder(encoder: Encoder, state: dict[str, torch.Tensor], prefix: str, report: LoadReport,
                 sum_rgb: bool = False) -> None:
    """Copy matching ViT keys into `encoder`; `sum_rgb` sums the patch embedding over RGB (audio)."""
    own = encoder.state_dict()
    for key, value in state.items():
        if key.startswith(_NOT_ENCODER):
            report.skipped.setdefault(key, "not an encoder weight (recomputed or decoder/head)")
            continue
        if key not in own:
            report.skipped.setdefault(key, "no such encoder parameter")
            continue
        if sum_rgb and key == "patch_embed.proj.weight":
            value = value.sum(dim=1, keepdim=True)
        if value.shape != own[key].shape:
            report.skipped[f"{prefix}{key}"] = f"shape {tuple(value.shape)} != {tuple(own[key].shape)}"
            continue
        own[key] = value
        report.loaded.append(f"{prefix}{key}")
    report.missing += [f"{prefix}{k}" for k in own if k not in state]
    encoder.load_state_dict(own)


def load_mae_checkpoint(model: CrossMAE, path: str | Path) -> LoadReport:
    """Initialise both encoders from an ImageNet MAE / timm ViT checkpoint (docs/design.md, "Initialisation").

    The audio patch embedding is the RGB one summed over channels (CAV-MAE); position embeddings
    stay the fixed sin-cos of this model's grids. Skipped keys are logged with their reason."""
    state = read_state_dict(path)
    report = LoadReport()
    load_encoder(model.image_encoder, state, "image_encoder.", report)
    load_encoder(model.audio_encoder, state, "audio_encoder.", report, sum_rgb=True)
    for key, reason in sorted(report.skipped.items()):
        log.info("init %s: skipped %s (%s)", path, key, reason)
    log.info("init %s: loaded %d tensors, skipped %d, missing %d", path, len(report.loaded),
             len(report.skipped), len(report.missing))
    return report


def encoder_state_dict(model: CrossMAE, modality: str) -> dict[str, torch.Tensor]:
    """One encoder as a timm `VisionTransformer` state dict (`global_pool='token'`, no head), with
    its sin-cos position embedding, for fine-tuning with timm."""
    encoder = {"audio": model.audio_encoder, "image": model.image_encoder}[modality]
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    state["pos_embed"] = encoder.pos_embed.detach().clone()
    return state
