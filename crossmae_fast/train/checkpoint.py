"""Training checkpoints: atomic writes, the newest K kept, a `latest` pointer, finding the one to
resume, and the rules for what a resumed run may change (`RESUME_FREE`, `RESUME_LENGTH`: the only
place they live).

A checkpoint is a dict of tensors and plain values only (loadable with `weights_only=True`):
`model`, `optimizer`, `step`, `epoch` and `batch` (data position: batches of `epoch` already used),
`rng` (one entry per rank: torch CPU / CUDA, numpy and Python states as tensors), `world_size`,
`config` (the whole `RunConfig` as a nested dict), `metrics` (the last logged values). Checkpoints of
earlier versions (`model_config` and `train_config` instead of `config`) load for evaluation only.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from crossmae_fast.config import ModelConfig, RunConfig
from crossmae_fast.model.crossmae import CrossMAE
from crossmae_fast.model.weights import encoder_state_dict

log = logging.getLogger("crossmae_fast.checkpoint")

PATTERN = re.compile(r"checkpoint-(\d+)\.pt")
LATEST = "latest"
EVERY = frozenset({"*"})
RESUME_FREE: dict[str, frozenset[str]] = {
    "model": frozenset({"ops"}),
    "data": frozenset({"loader", "workers", "video"}),
    "train": frozenset({"out", "resume", "init", "save_every", "keep", "log_every", "time_limit", "device",
                        "cuda_graph", "compile", "threads", "export_encoders"}),
    "eval": EVERY,
}
"""Fields, by config section, a resumed run may change: how the run executes, where it writes and
what it does after training, not which updates it makes (the loaders agree row for row and frame for
frame; `ops` and `device` change rounding only). Every other field, including ones added later,
must match the checkpoint's, and so must the world size."""
RESUME_LENGTH: dict[str, frozenset[str]] = {"train": frozenset({"epochs", "steps"})}
"""Fields a resumed run may change with a warning: the cosine schedule is recomputed for the new length."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def atomic_write(path: Path, write) -> None:
    """Call `write(file)` on a temporary file in `path`'s folder, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


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
    atomic_write(folder / LATEST, lambda f: f.write(path.name.encode() + b"\n"))
    for old in list_checkpoints(folder)[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint read with `weights_only=True` onto the CPU; clear errors for what is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    keys = set(state if isinstance(state, dict) else ())
    missing = {"model", "optimizer", "step", "epoch", "batch", "rng"} - keys
    if not keys & {"config", "model_config"}:
        missing.add("config")
    if missing:
        raise ValueError(f"{path}: not a crossmae_fast training checkpoint (missing {', '.join(sorted(missing))})")
    return state


def saved_config(state: Mapping) -> RunConfig:
    """The `RunConfig` a checkpoint was written with (ValueError for an earlier version's)."""
    if "config" not in state:
        raise ValueError("written by an earlier version (no 'config'): it can be evaluated, not resumed")
    return RunConfig.from_dict(state["config"])


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
        fixed, length = resume_differences(saved_config(state), cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {path}: {e}") from None
    if state.get("world_size", 1) != world_size:
        fixed.append(f"world_size: {state.get('world_size', 1)} -> {world_size}")
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
        return found, None
    if resume == "auto":
        return None, None
    if not target.is_file():
        return None, f"--resume {target}: no such checkpoint"
    return target, None


def model_from_checkpoint(path: str | Path, device="cpu", ops: str | None = None) -> CrossMAE:
    """The `CrossMAE` a checkpoint describes, with its weights, in eval mode (for evaluation)."""
    state = load_checkpoint(path)
    cfg = dict(state["config"]["model"] if "config" in state else state["model_config"])
    if ops is not None:
        cfg["ops"] = ops
    model = CrossMAE(ModelConfig(**cfg))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def export_encoders(model: CrossMAE, folder: str | Path) -> list[Path]:
    """`encoder_audio.pth` and `encoder_image.pth`: timm ViT state dicts for fine-tuning."""
    paths = []
    for modality in ("audio", "image"):
        path = Path(folder) / f"encoder_{modality}.pth"
        sd = {k: v.cpu() for k, v in encoder_state_dict(model, modality).items()}
        atomic_write(path, lambda f, sd=sd: torch.save(sd, f))
        paths.append(path)
    return paths
