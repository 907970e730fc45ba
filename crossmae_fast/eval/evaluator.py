"""Evaluate a pre-trained CrossMAE: retrieval, sound-source localization and pictures (the protocols
of docs/design.md; the command line is `crossmae_fast.evaluate`).

Audio-to-visual and visual-to-audio retrieval over every clip of the manifest (cosine similarity of
the L2-normalised CLS features of the unmasked encoders); localization over the rows with `bbox`
(cosine map between the audio CLS feature and the unmasked visual patch features, upsampled to
`map_size`). `evaluate(model, manifest, cfg, data)` (cfg: an `EvalConfig`) writes `metrics.json`
and, for the first K clips (those with boxes first), PNG pictures under `pictures/`;
`eval/report.py` prints the tables.

Model API used: `model.cfg` (a `ModelConfig`), `model.eval_features(audio, image)` -> (audio [B, D],
visual [B, D] L2-normalised global features, visual patch features [B, h*w, D]), and for pictures
`model(audio, image, noise_audio, noise_image)`'s dict (`audio_mask`, `image_mask`, `audio_pred`,
`image_pred`, `audio_attentive`, `image_attentive`: full-grid indices), and
`model.query_attention(audio, image)` -> {"image": [B, Q, *image_grid], "audio": [B, Q, *audio_grid]},
the Learnable Queries' attention (last Cross-Embedding block, mean over heads) over the unmasked
patch tokens of the named modality. Pictures a variant has no parts for (no decoder, no queries) are
left out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import statistics
from pathlib import Path

import torch
from PIL import Image

from crossmae_fast.components.run_lock import RunLock
from crossmae_fast.config import DataConfig, EvalConfig, data_config
from crossmae_fast.data import make_loader
from crossmae_fast.data.box_annotations import center_crop_boxes
from crossmae_fast.data.clips import first_seen
from crossmae_fast.data.manifest import frame_path, read_manifest
from crossmae_fast.eval import pictures
from crossmae_fast.eval.localization import ClipBoxes, MapScores, clip_boxes
from crossmae_fast.eval.metrics import RECALL_AT, localization_map, normalise_maps, retrieval_report
from crossmae_fast.eval.probe import ProbeConfig, fit_probe, frozen_features, save_probes
from crossmae_fast.files import atomic_write

log = logging.getLogger(__name__)


def frame_size(row: dict, frame: int) -> tuple[int, int] | None:
    """(width, height) of the evaluation frame's JPEG, read from its header (a shard manifest's row
    records it); None if unreadable."""
    if "frame_size" in row:
        return tuple(row["frame_size"])
    try:
        with Image.open(frame_path(row, frame)) as im:
            return im.size
    except OSError:
        return None


def boxes_of(row: dict, size: int, mode: str, frame: int) -> ClipBoxes:
    """The row's targets on the centre-cropped frame the model sees."""
    wh = frame_size(row, frame)
    if wh is None:
        log.warning("%s: frame %d unreadable, taking its boxes as given on a square frame",
                    row["video_id"], frame)
    clip = clip_boxes(row, size, mode, wh)
    if not clip.gt.any():
        log.warning("%s: every box falls outside the centre crop; its cIoU is 0", row["video_id"])
    return clip


@torch.no_grad()
def evaluate(model: torch.nn.Module, manifest: str | Path, cfg: EvalConfig | None = None,
             data: DataConfig | None = None) -> dict:
    """Retrieval and (where the manifest has boxes) localization metrics with their controls; pictures
    of `cfg.pictures` clips. `data`: the run's input settings (its fbank normalisation, loader and
    workers); by default the model's sizes with the manifest's statistics. With `cfg.probe_data` (a
    train manifest) the localization probe is trained once per probe seed and scored like the
    zero-shot map. With `cfg.out`, the pictures and then `metrics.json` (the returned dict) are
    written there, a folder this process holds for the evaluation's length (`RunLock`: `RunFolderBusy`
    if another process writes there). The batches go to the model's device. An empty manifest is a
    ValueError."""
    cfg = cfg if cfg is not None else EvalConfig()
    rows = read_manifest(manifest)
    if not rows:
        raise ValueError(f"{manifest}: the manifest has no rows to evaluate")
    with RunLock(cfg.out) if cfg.out is not None else contextlib.nullcontext():
        return _evaluate(model, manifest, rows, cfg, data)


def _evaluate(model, manifest, rows: list[dict], cfg: EvalConfig, data: DataConfig | None) -> dict:
    model.eval()
    dcfg = data if data is not None else data_config(model.cfg)
    heads = _probe_heads(model, cfg, dcfg)
    loader = make_loader(manifest, batch_size=cfg.batch_size, train=False, data_config=dcfg, device=_device(model),
                         seed=cfg.seed)
    scan = _scan(model, loader, rows, heads, cfg, dcfg.eval_frame)
    missing = len(rows) - len(scan.feats_a)
    if missing:
        log.warning("%d of %d clips could not be read and are not evaluated", missing, len(rows))
    result = _result(model, manifest, scan, cfg, dcfg)
    if cfg.out is not None:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        if scan.keep:
            result["pictures"] = [str(p) for p in _draw(model, rows, scan.keep, out / "pictures", cfg.gt_mode,
                                                        dcfg.eval_frame, cfg.seed)]
        atomic_write(out / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _probe_heads(model, cfg: EvalConfig, dcfg: DataConfig) -> dict:
    """One trained localization probe per probe seed (none without `cfg.probe_data`)."""
    if cfg.probe_data is None:
        return {}
    probe = ProbeConfig(steps=cfg.probe_steps, seeds=cfg.probe_seeds)
    loader = make_loader(cfg.probe_data, batch_size=cfg.batch_size, train=False, data_config=dcfg,
                         device=_device(model), seed=cfg.seed)
    train_a, train_p = frozen_features(model, loader, probe.max_clips)
    heads = {s: fit_probe(train_a, train_p, probe, s) for s in probe.seeds}
    log.info("localization probe: %d heads trained on %d clips of %s", len(heads), len(train_a), cfg.probe_data)
    if cfg.save_probe:
        Path(cfg.save_probe).parent.mkdir(parents=True, exist_ok=True)
        save_probes(cfg.save_probe, heads, probe, {"checkpoint": cfg.checkpoint, "probe_data": str(cfg.probe_data),
                                                   "variant": model.cfg.variant, "clips": len(train_a)})
        log.info("localization probe heads saved to %s", cfg.save_probe)
    return heads


@dataclasses.dataclass
class _Scan:
    """What one pass over the manifest collects: features per row, map scores, the pictures' inputs."""

    feats_a: dict = dataclasses.field(default_factory=dict)
    feats_v: dict = dataclasses.field(default_factory=dict)
    zero_shot: MapScores = dataclasses.field(default_factory=MapScores)
    probed: dict = dataclasses.field(default_factory=dict)
    keep: dict = dataclasses.field(default_factory=dict)


def _scan(model, loader, rows: list[dict], heads: dict, cfg: EvalConfig, frame: int) -> _Scan:
    grid = model.cfg.image_grid
    scan = _Scan(probed={s: MapScores() for s in heads})
    want = _picture_rows(rows, cfg.pictures)
    for batch in loader:
        audio, image, index = batch["audio"], batch["image"], batch["index"].tolist()
        fresh = first_seen(index, scan.feats_a)
        if not fresh:
            continue
        sel = torch.tensor(fresh, device=audio.device)
        audio, image, index = audio[sel], image[sel], [index[i] for i in fresh]
        a, v, patches = model.eval_features(audio, image)
        for i, r in enumerate(index):
            scan.feats_a[r], scan.feats_v[r] = a[i].float().cpu(), v[i].float().cpu()
        boxed = [i for i, r in enumerate(index) if "bbox" in rows[r]]
        maps = {}
        if boxed:
            b = torch.tensor(boxed, device=audio.device)
            clips = [boxes_of(rows[index[i]], cfg.map_size, cfg.gt_mode, frame) for i in boxed]
            m = _score(scan.zero_shot, a[b], patches[b], clips, grid, cfg.map_size)
            for s, h in heads.items():
                _score(scan.probed[s], *h(a[b].float(), patches[b].float()), clips, grid, cfg.map_size)
            maps = {index[i]: m[k].cpu() for k, i in enumerate(boxed)}
        for i, r in enumerate(index):
            if r in want:
                scan.keep[r] = (audio[i].cpu(), image[i].cpu(), maps.get(r))
    return scan


def _result(model, manifest, scan: _Scan, cfg: EvalConfig, dcfg: DataConfig) -> dict:
    order = sorted(scan.feats_a)
    n = len(order)
    result = {
        "manifest": str(manifest), "clips": n, "variant": model.cfg.variant,
        "retrieval": retrieval_report(torch.stack([scan.feats_a[r] for r in order]),
                                      torch.stack([scan.feats_v[r] for r in order])),
        "retrieval_chance": {f"r{k}": min(k / n, 1.0) for k in RECALL_AT},
        "localization": None,
        "audio_norm": list(dcfg.audio_norm()) if dcfg.audio_mean is not None else None,
    }
    if cfg.checkpoint is not None:
        result["checkpoint"] = str(cfg.checkpoint)
    if scan.zero_shot.ciou:
        result["localization"] = {**scan.zero_shot.summary(), "gt_mode": cfg.gt_mode}
    if scan.probed and scan.zero_shot.ciou:
        per_seed = {str(s): p.summary() for s, p in scan.probed.items()}
        probe = ProbeConfig(steps=cfg.probe_steps, seeds=cfg.probe_seeds)
        result["probe"] = {"config": dataclasses.asdict(probe), "manifest": str(cfg.probe_data),
                           "seeds": per_seed, "mean": _mean_of(per_seed.values()), "std": _std_of(per_seed.values())}
    return result


def _score(scores: MapScores, audio: torch.Tensor, patches: torch.Tensor, clips: list, grid, size: int
           ) -> torch.Tensor:
    """Maps of a batch and their mismatched-audio twins (each clip paired with the next clip's audio)
    into `scores`; returns the maps."""
    maps = localization_map(audio, patches, grid, size)
    other = localization_map(audio.roll(1, 0), patches, grid, size) if len(clips) > 1 else None
    scores.add(maps, clips, other)
    return maps


def _mean_of(summaries) -> dict:
    summaries = list(summaries)
    return {k: sum(s[k] for s in summaries) / len(summaries) for k in summaries[0]
            if all(isinstance(s.get(k), float) for s in summaries)}


def _std_of(summaries) -> dict:
    """Sample standard deviation over the probe seeds of each figure (0 for one seed)."""
    summaries = list(summaries)
    return {k: statistics.stdev([s[k] for s in summaries]) if len(summaries) > 1 else 0.0 for k in summaries[0]
            if all(isinstance(s.get(k), float) for s in summaries)}


def _picture_rows(rows: list[dict], k: int) -> set[int]:
    """The first k rows, those with boxes first."""
    ranked = sorted(range(len(rows)), key=lambda i: ("bbox" not in rows[i], i))
    return set(ranked[:k])


def _draw(model, rows: list[dict], keep: dict, out: Path, gt_mode: str, frame: int, seed: int) -> list[Path]:
    cfg = model.cfg
    order = sorted(keep)
    dev = next(model.parameters()).device
    audio = torch.stack([keep[r][0] for r in order]).to(dev)
    image = torch.stack([keep[r][1] for r in order]).to(dev)
    g = torch.Generator().manual_seed(seed)
    noise_a = torch.rand(len(order), cfg.num_audio_patches, generator=g).to(dev)
    noise_v = torch.rand(len(order), cfg.num_image_patches, generator=g).to(dev)
    fwd = {k: v.cpu() if isinstance(v, torch.Tensor) else v
           for k, v in model(audio, image, noise_audio=noise_a, noise_image=noise_v).items()}
    queries = {k: v.cpu() for k, v in model.query_attention(audio, image).items()}
    paths = []
    for j, r in enumerate(order):
        a, img, heat = keep[r]
        vid = rows[r]["video_id"]
        if heat is not None:
            wh = frame_size(rows[r], frame)
            boxes = center_crop_boxes(rows[r]["bbox"], *wh) if wh else rows[r]["bbox"]
            paths.append(pictures.plot_localization(img, normalise_maps(heat[None])[0], boxes,
                                                    out / f"{vid}_localization.png", title=vid))
        if "audio_attentive" in fwd:
            paths.append(pictures.plot_attentive_tokens(
                img, fwd["image_attentive"][j], a, fwd["audio_attentive"][j],
                out / f"{vid}_attentive_tokens.png", cfg.image_patch, cfg.audio_patch, fwd["image_mask"][j],
                fwd["audio_mask"][j]))
        if "image_pred" in fwd:
            paths.append(pictures.plot_image_reconstruction(
                img, fwd["image_pred"][j], fwd["image_mask"][j], out / f"{vid}_reconstruction_image.png",
                cfg.image_patch, cfg.norm_pix_loss))
            paths.append(pictures.plot_audio_reconstruction(
                a, fwd["audio_pred"][j], fwd["audio_mask"][j], out / f"{vid}_reconstruction_audio.png",
                cfg.audio_patch, cfg.norm_pix_loss))
        for modality, bg in (("image", img), ("audio", a)) if queries else ():
            attn = queries[modality][j]
            shown = torch.linspace(0, attn.shape[0] - 1, min(6, attn.shape[0])).round().long().unique()
            paths.append(pictures.plot_query_attention(
                attn[shown], bg, out / f"{vid}_queries_{modality}.png", modality,
                labels=[f"query {q}" for q in shown.tolist()]))
    return paths
