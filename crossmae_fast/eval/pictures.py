"""PNG pictures for evaluation (issue 6; paper Figs. 1 and 3), drawn from plain tensors or arrays.

Conventions: a frame given as `[3, H, W]` is an ImageNet-normalised model input and is denormalised
for display; `[H, W, 3]` is display-ready (uint8, or float in [0, 1]). Spectrograms are `[T, F]`
(time, mel bins) and are drawn with time on the x axis. Patch tokens are numbered row-major over the
image grid and time-major over the audio grid `[T/p, F/p]` (MAE / AudioMAE patchify). Masks use MAE's
convention: 1 = removed. Every function writes one PNG and returns its path. Figures are built with
`matplotlib.figure.Figure` on the Agg canvas, so no pyplot state or display is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from crossmae_fast.config import IMAGENET_MEAN, IMAGENET_STD
from crossmae_fast.model.losses import NORM_PIX_EPS, patchify_audio, patchify_image

Array = torch.Tensor | np.ndarray


# ------------------------------------------------------------------ patch layout

def unpatchify_image(x: torch.Tensor, p: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, L, p*p*3] -> [B, 3, H, W]; the grid defaults to square."""
    b, length, dim = x.shape
    h, w = grid or (math.isqrt(length),) * 2
    if h * w != length or dim != p * p * 3:
        raise ValueError(f"cannot unpatchify [{b}, {length}, {dim}] with patch {p} on grid {(h, w)}")
    x = x.reshape(b, h, w, p, p, 3)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, h * p, w * p)


def unpatchify_audio(x: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, L, p*p] -> [B, T, F] for a (time, frequency) patch grid."""
    b, length, dim = x.shape
    t, f = grid
    if t * f != length or dim != p * p:
        raise ValueError(f"cannot unpatchify [{b}, {length}, {dim}] with patch {p} on grid {grid}")
    x = x.reshape(b, t, f, p, p)
    return torch.einsum("nhwpq->nhpwq", x).reshape(b, t * p, f * p)


def denormalise_image(image: Array, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """ImageNet-normalised [3, H, W] -> [H, W, 3] float in [0, 1]."""
    x = _np(image)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] image, got shape {x.shape}")
    x = x * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
    return np.clip(x.transpose(1, 2, 0), 0, 1)


def to_display(image: Array) -> np.ndarray:
    """[3, H, W] normalised, or [H, W, 3] uint8 / [0, 1] float -> [H, W, 3] float in [0, 1]."""
    raw = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if raw.ndim == 3 and raw.shape[0] == 3 and raw.shape[-1] != 3:
        return denormalise_image(raw)
    if raw.ndim != 3 or raw.shape[-1] != 3:
        raise ValueError(f"expected a [3, H, W] or [H, W, 3] image, got shape {raw.shape}")
    return raw / 255.0 if raw.dtype == np.uint8 else np.clip(raw.astype(np.float64), 0, 1)


# ------------------------------------------------------------------ pictures

def plot_localization(image: Array, heatmap: Array, boxes: Sequence[Sequence[float]], path: str | Path,
                      title: str | None = None) -> Path:
    """The frame with its ground-truth boxes (normalised `[x0, y0, x1, y1]`), and the localization
    heatmap (any size, stretched over the frame) overlaid on it."""
    frame, heat = to_display(image), _np(heatmap)
    hh, ww = frame.shape[:2]
    fig = Figure(figsize=(8, 4.3), layout="constrained")
    for k, ax in enumerate(fig.subplots(1, 2)):
        ax.imshow(frame, extent=(0, ww, hh, 0))
        if k:
            ax.imshow(heat, extent=(0, ww, hh, 0), cmap="jet", alpha=0.5, interpolation="bilinear")
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(Rectangle((x0 * ww, y0 * hh), (x1 - x0) * ww, (y1 - y0) * hh, fill=False,
                                   edgecolor="lime", linewidth=2))
        ax.set_title(("frame and ground truth", "localization map")[k])
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_attentive_tokens(image: Array, image_tokens: Sequence[int], spec: Array, audio_tokens: Sequence[int],
                          path: str | Path, image_patch: int = 16, audio_patch: int = 16,
                          image_mask: Array | None = None, audio_mask: Array | None = None) -> Path:
    """Attentive Tokens (indices into the full patch grids, i.e. `ids_keep[topk]`) in red on the frame
    and on the spectrogram; removed patches (mask 1) dimmed. Paper Fig. 3a."""
    frame, s = to_display(image), _np(spec)
    hh, ww = frame.shape[:2]
    t, f = s.shape
    igrid, agrid = (hh // image_patch, ww // image_patch), (t // audio_patch, f // audio_patch)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_i, ax_a = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.2]})
    ax_i.imshow(frame, extent=(0, ww, hh, 0))
    _dim(ax_i, image_mask, igrid, image_patch, transpose=False)
    _mark(ax_i, image_tokens, igrid, image_patch, transpose=False)
    for k in range(1, igrid[0]):
        ax_i.axhline(k * image_patch, color="white", linewidth=0.3, alpha=0.5)
    for k in range(1, igrid[1]):
        ax_i.axvline(k * image_patch, color="white", linewidth=0.3, alpha=0.5)
    ax_i.set_title(f"visual Attentive Tokens ({len(image_tokens)})")
    ax_i.axis("off")
    _spectrogram(ax_a, s, cmap="gray")
    _dim(ax_a, audio_mask, agrid, audio_patch, transpose=True)
    _mark(ax_a, audio_tokens, agrid, audio_patch, transpose=True)
    ax_a.set_title(f"audio Attentive Tokens ({len(audio_tokens)})")
    return _save(fig, path)


def plot_query_attention(attn: Array, background: Array, path: str | Path, modality: str = "image",
                         labels: Sequence[str] | None = None) -> Path:
    """Attention maps `[Q, grid_h, grid_w]` of a few Learnable Queries over one modality's tokens, as small
    multiples over that modality's frame (`image`) or spectrogram (`audio`, grid `[T/p, F/p]`).
    Paper Figs. 3b, 3c."""
    if modality not in ("image", "audio"):
        raise ValueError(f"modality={modality!r} is not one of 'image', 'audio'")
    a = _np(attn)
    if a.ndim != 3:
        raise ValueError(f"attention must be [num_queries, grid_h, grid_w], got shape {a.shape}")
    q = a.shape[0]
    labels = list(labels) if labels is not None else [f"query {i}" for i in range(q)]
    if len(labels) != q:
        raise ValueError(f"{len(labels)} labels for {q} queries")
    cols = min(q, 4 if modality == "image" else 2)
    rows = math.ceil(q / cols)
    size = (3.2 * cols, 3.2 * rows) if modality == "image" else (6 * cols, 2.2 * rows)
    fig = Figure(figsize=size, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i >= q:
            ax.axis("off")
            continue
        if modality == "image":
            frame = to_display(background)
            hh, ww = frame.shape[:2]
            ax.imshow(frame, extent=(0, ww, hh, 0))
            ax.imshow(a[i], extent=(0, ww, hh, 0), cmap="jet", alpha=0.55, interpolation="nearest")
            ax.axis("off")
        else:
            s = _np(background)
            _spectrogram(ax, s, cmap="gray")
            ax.imshow(a[i].T, extent=(0, s.shape[0], 0, s.shape[1]), origin="lower", aspect="auto",
                      cmap="jet", alpha=0.55, interpolation="nearest")
        ax.set_title(labels[i], fontsize=9)
    return _save(fig, path)


def plot_image_reconstruction(image: Array, pred: Array, mask: Array, path: str | Path, patch: int = 16,
                              norm_pix: bool = True) -> Path:
    """Masked input, prediction, prediction with the visible patches pasted back, and target, for a
    frame `[3, H, W]` (normalised), its predicted patches `[L, p*p*3]` and mask `[L]`. With `norm_pix`
    the prediction is per-patch normalised (norm-pix loss) and is mapped back with the target's
    patch mean and variance."""
    target = patchify_image(torch.as_tensor(_np(image)).unsqueeze(0), patch)[0]
    p, m = _reconstruct(target, pred, mask, norm_pix)
    hh, ww = _np(image).shape[1:]
    grid = (hh // patch, ww // patch)
    panels = [target, p, p * m + target * (1 - m), target]
    titles = ["masked input", "prediction", "prediction + visible", "target"]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    for ax, x, title in zip(fig.subplots(1, 4), panels, titles):
        img = denormalise_image(unpatchify_image(x[None], patch, grid)[0])
        if title == "masked input":
            img = np.where(_upsample(_np(mask), grid, patch)[..., None] > 0, 0.5, img)
        ax.imshow(img)
        ax.set_title(title)
        ax.axis("off")
    return _save(fig, path)


def plot_audio_reconstruction(spec: Array, pred: Array, mask: Array, path: str | Path, patch: int = 16,
                              norm_pix: bool = True) -> Path:
    """The audio counterpart of `plot_image_reconstruction`: spectrogram `[T, F]`, predicted patches
    `[L, p*p]` (time-major) and mask `[L]`; one row per panel, time on the x axis."""
    s = torch.as_tensor(_np(spec))
    grid = (s.shape[0] // patch, s.shape[1] // patch)
    target = patchify_audio(s.unsqueeze(0), patch)[0]
    p, m = _reconstruct(target, pred, mask, norm_pix)
    panels = [p, p * m + target * (1 - m), target]
    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(4, 1)
    lo, hi = float(target.min()), float(target.max())
    removed = _upsample(_np(mask), grid, patch) > 0
    _spectrogram(axes[0], np.ma.masked_array(_np(s), removed), vmin=lo, vmax=hi)
    axes[0].set_title("masked input")
    for ax, x, title in zip(axes[1:], panels, ["prediction", "prediction + visible", "target"]):
        _spectrogram(ax, unpatchify_audio(x[None], patch, grid)[0].numpy(), vmin=lo, vmax=hi)
        ax.set_title(title)
    return _save(fig, path)


# ------------------------------------------------------------------ helpers

def _np(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _reconstruct(target: torch.Tensor, pred: Array, mask: Array, norm_pix: bool):
    pred_t = torch.as_tensor(_np(pred))
    if pred_t.ndim == 3 and pred_t.shape[0] == 1:
        pred_t = pred_t[0]
    m = torch.as_tensor(_np(mask)).reshape(-1, 1)
    if pred_t.shape != target.shape or m.shape[0] != target.shape[0]:
        raise ValueError(f"prediction {tuple(pred_t.shape)} and mask {tuple(m.shape)} do not match "
                         f"the target patches {tuple(target.shape)}")
    if norm_pix:
        pred_t = pred_t * (target.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt() + target.mean(-1, keepdim=True)
    return pred_t, m


def _upsample(values: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """Per-patch values [L] -> a pixel map [grid_h*p, grid_w*p]."""
    return np.kron(values.reshape(grid), np.ones((patch, patch)))


def _spectrogram(ax, s: np.ndarray, cmap: str = "magma", **kw) -> None:
    ax.imshow(s.T, extent=(0, s.shape[0], 0, s.shape[1]), origin="lower", aspect="auto", cmap=cmap, **kw)
    ax.set_xlabel("time frame")
    ax.set_ylabel("mel bin")


def _cell(index: int, grid: tuple[int, int], patch: int, transpose: bool) -> tuple[float, float]:
    """Lower-left data coordinates of a token's patch; audio (transpose) puts time on x."""
    r, c = divmod(int(index), grid[1])
    return (r * patch, c * patch) if transpose else (c * patch, r * patch)


def _mark(ax, tokens: Sequence[int], grid: tuple[int, int], patch: int, transpose: bool) -> None:
    n = grid[0] * grid[1]
    for idx in np.asarray(_np(tokens), dtype=np.int64).ravel():
        if not 0 <= idx < n:
            raise ValueError(f"token index {idx} outside the {grid[0]}x{grid[1]} patch grid")
        ax.add_patch(Rectangle(_cell(idx, grid, patch, transpose), patch, patch, facecolor="red", alpha=0.45,
                               edgecolor="red", linewidth=1.2))


def _dim(ax, mask: Array | None, grid: tuple[int, int], patch: int, transpose: bool) -> None:
    if mask is None:
        return
    m = _np(mask).ravel()
    if m.size != grid[0] * grid[1]:
        raise ValueError(f"mask has {m.size} entries for a {grid[0]}x{grid[1]} patch grid")
    for idx in np.flatnonzero(m > 0):
        ax.add_patch(Rectangle(_cell(idx, grid, patch, transpose), patch, patch, facecolor="black",
                               alpha=0.55, linewidth=0))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=80, bbox_inches="tight")
    return path
