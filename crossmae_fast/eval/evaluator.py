"""Evaluate a pre-trained CrossMAE: retrieval, sound-source localization and pictures (the protocols
of docs/design.md; the command line is `crossmae_fast.evaluate`).

Audio-to-visual and visual-to-audio retrieval over every clip of the manifest (cosine similarity of
the L2-normalised CLS features of the unmasked encoders); localization over the rows with `bbox`
(cosine map between the audio CLS feature and the unmasked visual patch features, upsampled to
`map_size`). `evaluate` writes `metrics.json` and, for the first K clips (those with boxes
first), PNG pictures under `pictures/`; `format_tables` prints both tables.

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

import dataclasses
import json
import logging
from pathlib import Path

import torch
from PIL import Image

from crossmae_fast.config import DataConfig, data_config
from crossmae_fast.data import make_loader
from crossmae_fast.data.box_annotations import center_crop_boxes
from crossmae_fast.data.manifest import frame_path, read_manifest
from crossmae_fast.eval import pictures
from crossmae_fast.eval.localization import ClipBoxes, MapScores, clip_boxes
from crossmae_fast.eval.metrics import RECALL_AT, localization_map, normalize_maps, retrieval_report
from crossmae_fast.eval.probe import ProbeConfig, fit_probe, frozen_features
from crossmae_fast.train.checkpoint import latest_checkpoint, load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)


def load_model(checkpoint: str | Path) -> torch.nn.Module:
    """The `CrossMAE` of a pre-training checkpoint (a file, or a run folder: its latest), in eval mode.
    A path that holds no such checkpoint raises FileNotFoundError or a one-line ValueError naming it."""
    path = Path(checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint-*.pt in this folder")
        path = found
    try:
        return model_from_checkpoint(path)
    except ValueError as e:
        if e.__cause__ is None:  # a checkpoint-shaped file that lacks fields: the message names them
            raise
        raise ValueError(f"{path}: not a checkpoint written by crossmae_fast.pretrain "
                         f"(torch.load: {type(e.__cause__).__name__})") from e


def checkpoint_data_config(checkpoint: str | Path) -> DataConfig | None:
    """The data config a run trained with (its fbank normalisation included), as its checkpoint records
    it; None for a checkpoint that records none."""
    path = Path(checkpoint)
    path = latest_checkpoint(path) if path.is_dir() else path
    state = load_checkpoint(path)
    saved = state.get("config", {}).get("data")
    if not saved:
        return None
    known = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})


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
def evaluate(model: torch.nn.Module, manifest: str | Path, out_dir: str | Path | None = None,
             pictures_k: int = 0, batch_size: int = 32, device: str = "cpu", backend: str = "dali",
             gt_mode: str = "vggss", map_size: int = 224, num_workers: int = 2, seed: int = 0,
             checkpoint: str | Path | None = None, data: DataConfig | None = None,
             probe: ProbeConfig | None = None, probe_data: str | Path | None = None) -> dict:
    """Retrieval and (where the manifest has boxes) localization metrics with their controls; pictures
    of `pictures_k` clips. `data`: the run's input settings (its fbank normalisation); by default the model's
    sizes with the manifest's statistics. With `probe` and `probe_data` (a train manifest) the
    localization probe is trained once per probe seed and scored like the zero-shot map. With
    `out_dir`, the pictures and then `metrics.json` (the returned dict) are written there."""
    model.eval()
    cfg = model.cfg
    dcfg = data if data is not None else data_config(cfg)
    rows = read_manifest(manifest)
    heads = {}
    if probe is not None and probe_data is not None:
        probe_loader = make_loader(probe_data, backend=backend, batch_size=batch_size, train=False,
                                   data_config=dcfg, device=device, num_workers=num_workers, seed=seed)
        train_a, train_p = frozen_features(model, probe_loader, probe.max_clips)
        heads = {s: fit_probe(train_a, train_p, probe, s) for s in probe.seeds}
        log.info("localization probe: %d heads trained on %d clips of %s", len(heads), len(train_a), probe_data)
    loader = make_loader(manifest, backend=backend, batch_size=batch_size, train=False, data_config=dcfg,
                         device=device, num_workers=num_workers, seed=seed)
    feats_a, feats_v, seen, keep = {}, {}, set(), {}
    zero_shot, probed = MapScores(), {s: MapScores() for s in heads}
    want = _picture_rows(rows, pictures_k)
    for batch in loader:
        audio, image, index = batch["audio"], batch["image"], batch["index"].tolist()
        # a bad clip is replaced by the next good one: count each row once so pairs stay unique
        fresh = [i for i, r in enumerate(index) if r not in seen]
        if not fresh:
            continue
        sel = torch.tensor(fresh, device=audio.device)
        audio, image, index = audio[sel], image[sel], [index[i] for i in fresh]
        seen.update(index)
        a, v, patches = model.eval_features(audio, image)
        for i, r in enumerate(index):
            feats_a[r], feats_v[r] = a[i].float().cpu(), v[i].float().cpu()
        boxed = [i for i, r in enumerate(index) if "bbox" in rows[r]]
        maps = {}
        if boxed:
            b = torch.tensor(boxed, device=audio.device)
            clips = [boxes_of(rows[index[i]], map_size, gt_mode, dcfg.eval_frame) for i in boxed]
            m = _score(zero_shot, a[b], patches[b], clips, cfg.image_grid, map_size)
            for s, h in heads.items():
                _score(probed[s], *h(a[b].float(), patches[b].float()), clips, cfg.image_grid, map_size)
            maps = {index[i]: m[k].cpu() for k, i in enumerate(boxed)}
        for i, r in enumerate(index):
            if r in want:
                keep[r] = (audio[i].cpu(), image[i].cpu(), maps.get(r))
    missing = len(rows) - len(seen)
    if missing:
        log.warning("%d of %d clips could not be read and are not evaluated", missing, len(rows))
    order = sorted(feats_a)
    n = len(order)
    result = {
        "manifest": str(manifest), "clips": n, "variant": cfg.variant,
        "retrieval": retrieval_report(torch.stack([feats_a[r] for r in order]),
                                      torch.stack([feats_v[r] for r in order])),
        "retrieval_chance": {f"r{k}": min(k / n, 1.0) for k in RECALL_AT},
        "localization": None,
        "audio_norm": list(dcfg.audio_norm()) if dcfg.audio_mean is not None else None,
    }
    if checkpoint is not None:
        result["checkpoint"] = str(checkpoint)
    if zero_shot.ciou:
        result["localization"] = {**zero_shot.summary(), "gt_mode": gt_mode}
    if probed and zero_shot.ciou:
        per_seed = {str(s): p.summary() for s, p in probed.items()}
        result["probe"] = {"config": dataclasses.asdict(probe), "manifest": str(probe_data),
                           "seeds": per_seed, "mean": _mean_of(per_seed.values())}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if keep:
            result["pictures"] = [str(p) for p in _draw(model, rows, keep, out_dir / "pictures", gt_mode,
                                                        dcfg.eval_frame, seed)]
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
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
            paths.append(pictures.plot_localization(img, normalize_maps(heat[None])[0], boxes,
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


def format_tables(result: dict) -> str:
    """Plain-text tables of the retrieval and localization results."""
    lines = [f"retrieval over {result['clips']} clips (chance R@1/5/10: "
             + " / ".join(f"{v:.4f}" for v in result["retrieval_chance"].values()) + ")",
             f"{'direction':<10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>8}{'MeanR':>9}"]
    for d, m in result["retrieval"].items():
        lines.append(f"{d:<10}{m['r1']:>8.4f}{m['r5']:>8.4f}{m['r10']:>8.4f}{m['median_rank']:>8.1f}"
                     f"{m['mean_rank']:>9.1f}")
    chance, n = result["retrieval_chance"], result["clips"]
    lines.append(f"{'chance':<10}{chance['r1']:>8.4f}{chance['r5']:>8.4f}{chance['r10']:>8.4f}{(n + 1) / 2:>8.1f}"
                 f"{(n + 1) / 2:>9.1f}")
    loc = result["localization"]
    if loc:
        kinds = {"zero-shot": loc}
        kinds.update({f"probe {s}": v for s, v in (result.get("probe") or {}).get("seeds", {}).items()})
        sel = "selection_accuracy" in loc
        chance = f", selection chance {loc['selection_chance']:.3f}" if sel else ""
        lines += ["", f"localization over {loc['clips']} clips ({loc['gt_mode']} ground truth; uniform-map cIoU "
                  f"{loc['uniform_map_ciou']:.4f}{chance}; mismatched: the next clip's audio)",
                  f"{'map':<12}{'AP50':>7}{'cIoU':>8}{'AUC':>7}{'x unif':>8}{'mism x':>8}"
                  + (f"{'select':>8}{'mism sel':>9}{'other x':>9}" if sel else "")]
        for name, k in kinds.items():
            line = (f"{name:<12}{k['ap50']:>7.3f}{k['ciou']:>8.4f}{k['auc']:>7.3f}{k['ciou_x_uniform']:>8.2f}"
                    f"{k.get('mismatched_ciou_x_uniform', float('nan')):>8.2f}")
            if sel:
                line += (f"{k['selection_accuracy']:>8.3f}{k.get('mismatched_selection_accuracy', float('nan')):>9.3f}"
                         f"{k['nonsounding_ciou_x_uniform']:>9.2f}")
            lines.append(line)
        if sel:
            lines.append("x unif: cIoU / uniform-map cIoU; mism: from mismatched audio; select: the sounding object's "
                         "box holds the highest mean map value; other x: cIoU against a non-sounding object's box / "
                         "its uniform cIoU")
    else:
        lines += ["", "localization: the manifest has no boxes"]
    return "\n".join(lines)
