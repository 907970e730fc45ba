"""The checkpoint file format and the rules around it, for every loop that writes checkpoints and every
tool that reads them: writing (atomic, the newest K kept, a `latest` pointer), finding the one to
resume, reading (`weights_only=True`), the model and data settings a checkpoint describes, and what a
resumed run may change (`RESUME_FREE`, `RESUME_LENGTH`: the only place they live).

A checkpoint is a dict of tensors and plain values only: `model`, `optimizer`, `world_size`, `config`
(the whole `RunConfig` as a nested dict) and the fields of `TrainState` (`TrainState.state_dict`: the
run's position, RNG states and last metrics). `checkpoint_state` builds it, `load_checkpoint` checks it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crossmae_fast.config import DataConfig, ModelConfig, RunConfig
from crossmae_fast.files import atomic_write, read_weights
from crossmae_fast.model.crossmae import CrossMAE
from crossmae_fast.model.weights import encoder_state_dict

log = logging.getLogger("crossmae_fast.checkpoint")

PATTERN = re.compile(r"checkpoint-(\d+)\.pt")
LATEST = "latest"
EVERY = frozenset({"*"})
RESUME_FREE: dict[str, frozenset[str]] = {
    "model": frozenset({"ops"}),
    "data": frozenset({"loader", "workers", "video"}),
    "train": frozenset({"out", "resume", "init", "save_every", "keep", "log_every", "tensorboard", "time_limit",
                        "max_skip_fraction", "device", "cuda_graph", "compile", "threads", "export_encoders"}),
    "eval": EVERY,
}
"""Fields, by config section, a resumed run may change: how the run executes, where it writes and
what it does after training, not which updates it makes (the loaders agree row for row and frame for
frame; `ops` and `device` change rounding only). Every other field, including ones added later,
must match the checkpoint's, and so must the world size."""
RESUME_LENGTH: dict[str, frozenset[str]] = {"train": frozenset({"epochs", "steps"})}
"""Fields a resumed run may change with a warning: the cosine schedule is recomputed for the new length."""


@dataclass
class TrainState:
    """Where a run stands, as a checkpoint stores it. `batch` counts the batches of `epoch` already used;
    `rng` holds every rank's generator states (components/rng.py); `metrics` is the last record written
    (its `time_s` carries the training time across resumes)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    rng: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])

    def carry_epochs(self, per_epoch: int) -> None:
        """Carry whole epochs from `batch` into `epoch`."""
        self.epoch += self.batch // per_epoch
        self.batch %= per_epoch


REQUIRED = ("model", "optimizer", "world_size", "config", *(f.name for f in dataclasses.fields(TrainState)))
"""The keys of a checkpoint (`checkpoint_state`)."""


def checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, world_size: int,
                     state: TrainState) -> dict:
    """The dict a checkpoint file holds."""
    return {"model": model.state_dict(), "optimizer": optimizer_state(optimizer), "world_size": world_size,
            "config": cfg.to_dict(), **state.state_dict()}


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()` with a tensor learning rate (capturable AdamW) stored as a float."""
    state = opt.state_dict()
    for g in state["param_groups"]:
        if isinstance(g.get("lr"), torch.Tensor):
            g["lr"] = float(g["lr"])
    return state


def list_checkpoints(folder: str | Path) -> list[Path]:
    """This run's checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint the `latest` pointer names, else the highest step; None when there is none."""
    folder = Path(folder)
    pointer = folder / LATEST
    if pointer.is_file():
        target = folder / pointer.read_text().strip()
        if PATTERN.fullmatch(target.name) and target.is_file():
            return target
        log.warning("%s names %s, which is missing; taking the highest step", pointer, target.name)
    found = list_checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(folder: str | Path, state: dict, keep: int) -> Path:
    """Write `state` as `checkpoint-<step>.pt` atomically, point `latest` at it, keep the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(state["step"])
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write(folder / LATEST, path.name + "\n")
    for old in list_checkpoints(folder)[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint read with `weights_only=True` onto the CPU; clear errors for what is not one."""
    state = read_weights(path, "checkpoint")
    missing = sorted(set(REQUIRED) - set(state if isinstance(state, dict) else ()))
    if missing:
        raise ValueError(f"{path}: not a crossmae_fast training checkpoint (missing {', '.join(missing)})")
    return state


def resume_differences(saved: RunConfig, current: RunConfig) -> tuple[list[str], list[str]]:
    """('section.field: saved -> current' for fields that must match but differ, the same for
    run-length fields that differ)."""
    fixed, length = [], []
    a, b = saved.to_dict(), current.to_dict()
    for section in a:
        for name in sorted(set(a[section]) | set(b[section])):
            old, new = a[section].get(name), b[section].get(name)
            free = RESUME_FREE.get(section, frozenset())
            if old == new or free is EVERY or name in free:
                continue
            bucket = length if name in RESUME_LENGTH.get(section, ()) else fixed
            bucket.append(f"{section}.{name}: {old!r} -> {new!r}")
    return fixed, length


def check_resume(state: Mapping, cfg: RunConfig, world_size: int, path) -> list[str]:
    """Raise ValueError naming each field where the checkpoint's run differs from `cfg` in a way a
    resume may not; return the run-length changes (the caller warns about them)."""
    try:
        fixed, length = resume_differences(RunConfig.from_dict(state["config"]), cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {path}: {e}") from None
    if state["world_size"] != world_size:
        fixed.append(f"world_size: {state['world_size']} -> {world_size}")
    if fixed:
        raise ValueError(f"checkpoint {path} comes from a different configuration; resuming it would not "
                         "continue that run. Differing fields:\n  " + "\n  ".join(fixed))
    return length


def resolve_resume(out: str | Path, resume: str | None) -> tuple[Path | None, str | None]:
    """(checkpoint to resume or None, error): `resume="auto"` takes the latest in `out`, a folder its
    latest, a file itself; a fresh start (`resume=None`) refuses an `out` that already holds checkpoints."""
    out = Path(out)
    if resume is None:
        found = latest_checkpoint(out)
        if found:
            return None, (f"--out {out} already holds a run ({found.name}); continue it with --resume auto or "
                          "choose another --out")
        return None, None
    target = out if resume == "auto" else Path(resume)
    if target.is_dir():
        found = latest_checkpoint(target)
        if found is None and resume != "auto":
            return None, f"--resume {target}: no checkpoint in that folder"
        if found is None:
            log.info("resume auto: no checkpoint in %s, starting fresh", out)
            return None, None
        return newest_loadable(target)
    if resume == "auto":
        return None, None
    if not target.is_file():
        return None, f"--resume {target}: no such checkpoint"
    return target, None


def newest_loadable(folder: Path) -> tuple[Path | None, str | None]:
    """(the newest checkpoint of `folder` that loads, None) — the `latest` pointer's first, then by step,
    newest first; each newer one that does not load is reported and left on disk. (None, error) when
    none loads."""
    first = latest_checkpoint(folder)
    candidates = [first] + [p for p in reversed(list_checkpoints(folder)) if p != first]
    for path in candidates:
        try:
            load_checkpoint(path)
        except (ValueError, OSError) as e:
            log.warning("resume: skipping %s, it does not load (%s); the file is left on disk",
                        path, str(e).splitlines()[0])
            continue
        return path, None
    return None, (f"--resume: no checkpoint in {folder} loads ({len(candidates)} tried, all left on disk); "
                  "resume from a copy of the run or choose another --out")


def checkpoint_path(checkpoint: str | Path) -> Path:
    """A checkpoint file as given, or a run folder's latest (FileNotFoundError when it holds none)."""
    path = Path(checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint-*.pt in this folder")
        return found
    return path


def model_from_checkpoint(checkpoint: str | Path, device="cpu", ops: str | None = None) -> CrossMAE:
    """The `CrossMAE` of a checkpoint (a file, or a run folder: its latest) with its weights, in eval mode.
    A path that holds no such checkpoint raises FileNotFoundError or a one-line ValueError naming it."""
    path = checkpoint_path(checkpoint)
    try:
        state = load_checkpoint(path)
    except ValueError as e:
        if e.__cause__ is None:  # a checkpoint-shaped file that lacks fields: the message names them
            raise
        raise ValueError(f"{path}: not a checkpoint written by crossmae_fast.pretrain "
                         f"(torch.load: {type(e.__cause__).__name__})") from e
    cfg = dict(state["config"]["model"])
    if ops is not None:
        cfg["ops"] = ops
    model = CrossMAE(ModelConfig(**cfg))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def checkpoint_data_config(checkpoint: str | Path) -> DataConfig:
    """The data config a run trained with (its fbank normalisation included), as its checkpoint records it."""
    return RunConfig.from_dict(load_checkpoint(checkpoint_path(checkpoint))["config"]).data


def export_encoders(model: CrossMAE, folder: str | Path) -> list[Path]:
    """`encoder_audio.pth` and `encoder_image.pth`: timm ViT state dicts for fine-tuning."""
    paths = []
    for modality in ("audio", "image"):
        path = Path(folder) / f"encoder_{modality}.pth"
        sd = {k: v.cpu() for k, v in encoder_state_dict(model, modality).items()}
        atomic_write(path, lambda f, sd=sd: torch.save(sd, f))
        paths.append(path)
    return paths
