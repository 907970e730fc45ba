"""Localization probe: light heads trained on frozen encoders with EZ-VSL's objective.

The zero-shot map (audio CLS against visual patch features) asks the pre-trained features to be
aligned at the patch level, which nothing in CrossMAE's objective asks for. The probe measures what a
little supervision-free training on top of the frozen encoders recovers, the way the paper evaluates
localization: an audio head on the global audio feature and a visual head on the patch features, both
linear maps to `dim`, trained for a fixed number of steps on the train split with the
multiple-instance contrastive loss of EZ-VSL (a pair's score is the maximum over positions of the
cosine of the projected features; InfoNCE over the batch, both directions). Its map is the cosine of
the projected features. A probe learns something on random features too, so its figures mean
something only against the same probe on randomly initialised encoders (learning_check does that).
Everything is seeded: the same features and seed give the same heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from crossmae_fast.data.clips import first_seen
from crossmae_fast.files import atomic_write, read_weights


@dataclass
class ProbeConfig:
    """Probe training settings; `seeds` gives one probe (and one set of scores) per seed."""

    steps: int = 300
    dim: int = 64
    lr: float = 1e-3
    batch_size: int = 128
    temperature: float = 0.03
    max_clips: int = 2048
    seeds: tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        for name in ("steps", "dim", "batch_size", "max_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe {name}={getattr(self, name)} must be at least 1")
        if not (self.lr > 0 and self.temperature > 0):
            raise ValueError("probe lr and temperature must be positive")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise ValueError("probe seeds: give at least one")


class ProbeHeads(nn.Module):
    """Linear audio and visual heads into a shared `dim`-wide space; outputs are L2-normalised."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.audio = nn.Linear(width, dim)
        self.visual = nn.Linear(width, dim)

    def forward(self, audio: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [N, D], patches [N, L, D] -> ([N, dim], [N, L, dim])."""
        return F.normalize(self.audio(audio), dim=-1), F.normalize(self.visual(patches), dim=-1)


def mil_contrastive_loss(audio: torch.Tensor, patches: torch.Tensor, temperature: float) -> torch.Tensor:
    """EZ-VSL's multiple-instance InfoNCE: score(i, j) = max over positions of cos(audio_i, patch_j)."""
    scores = torch.einsum("nd,mld->nml", audio, patches).amax(-1) / temperature
    labels = torch.arange(audio.shape[0], device=audio.device)
    return F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)


def fit_probe(audio: torch.Tensor, patches: torch.Tensor, cfg: ProbeConfig, seed: int) -> ProbeHeads:
    """Heads trained on frozen features (audio [N, D] global, patches [N, L, D]) with `seed` fixing the
    initialisation and the batches."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = ProbeHeads(audio.shape[1], cfg.dim).to(audio.device)
    opt = torch.optim.Adam(heads.parameters(), lr=cfg.lr)
    batch = min(cfg.batch_size, audio.shape[0])
    with torch.enable_grad():
        for _ in range(cfg.steps):
            idx = torch.randperm(audio.shape[0], generator=gen)[:batch].to(audio.device)
            a, p = heads(audio[idx].float(), patches[idx].float())
            loss = mil_contrastive_loss(a, p, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return heads.eval()


@torch.no_grad()
def frozen_features(model: nn.Module, loader, max_clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(audio global [N, D], visual patches [N, L, D]) of the first `max_clips` clips `loader` yields,
    from the unmasked encoders; the audio feature is the L2-normalised CLS output retrieval uses."""
    audio, patches, seen = [], [], set()
    for batch in loader:
        index = batch["index"].tolist()
        fresh = first_seen(index, seen)  # bad clips come back as replacements
        seen.update(index[i] for i in fresh)
        if fresh:
            sel = torch.tensor(fresh, device=batch["audio"].device)
            a, _, p = model.eval_features(batch["audio"][sel], batch["image"][sel])
            audio.append(a.float())
            patches.append(p.float())
        if len(seen) >= max_clips:
            break
    if not audio:
        raise ValueError("probe: the probe manifest yielded no clips")
    return torch.cat(audio)[:max_clips], torch.cat(patches)[:max_clips]


PROBE_FORMAT = "crossmae_fast.probe/1"


def save_probes(path: str | Path, heads: dict[int, ProbeHeads], cfg: ProbeConfig, source: dict) -> Path:
    """Write trained heads (one per probe seed) with their settings and `source` (what they were
    trained on: checkpoint, manifest, encoder width) to `path`; loadable with `weights_only=True`."""
    path = Path(path)
    first = next(iter(heads.values()))
    state = {"format": PROBE_FORMAT, "config": {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in dataclasses.asdict(cfg).items()},
             "width": first.audio.in_features, "source": dict(source),
             "heads": {str(s): {k: v.detach().cpu() for k, v in h.state_dict().items()} for s, h in heads.items()}}
    return atomic_write(path, lambda f: torch.save(state, f))


def load_probes(path: str | Path) -> tuple[list[ProbeHeads], dict]:
    """(heads in eval mode, the file's fields but the weights) of a file `save_probes` wrote; ValueError
    naming the file for anything else."""
    state = read_weights(path, "probe file")
    if not isinstance(state, dict) or state.get("format") != PROBE_FORMAT:
        raise ValueError(f"{path}: not a probe file written by evaluate --save-probe")
    dim = int(state["config"]["dim"])
    heads = []
    for weights in state["heads"].values():
        h = ProbeHeads(int(state["width"]), dim)
        h.load_state_dict(weights)
        heads.append(h.eval())
    return heads, {k: v for k, v in state.items() if k != "heads"}
