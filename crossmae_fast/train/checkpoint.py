"""Training checkpoints: atomic writes, the newest K kept, a `latest` pointer, exact resume.

A checkpoint is a dict of tensors and plain values only (loadable with `weights_only=True`):
`model`, `optimizer`, `step`, `epoch` and `batch` (data position: batches of `epoch` already used),
`rng` (one entry per rank: torch CPU / CUDA, numpy and Python states as tensors), `world_size`,
`train_config` and `model_config` (plain dicts), `metrics` (the last logged values).
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from crossmae_fast.config import ModelConfig
from crossmae_fast.model.crossmae import CrossMAE
from crossmae_fast.model.weights import encoder_state_dict

log = logging.getLogger("crossmae_fast.checkpoint")

PATTERN = re.compile(r"checkpoint-(\d+)\.pt")
LATEST = "latest"
MODEL_FREE = frozenset({"ops"})
"""ModelConfig fields a resumed run may change (implementation only)."""


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


def rng_state() -> dict:
    """This process's RNG states as tensors and numbers (weights_only-safe)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))


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
    required = {"model", "optimizer", "step", "epoch", "batch", "rng", "model_config", "train_config"}
    missing = required - set(state if isinstance(state, dict) else ())
    if missing:
        raise ValueError(f"{path}: not a crossmae_fast training checkpoint (missing {', '.join(sorted(missing))})")
    return state


def config_differences(saved: dict, current: dict, free: frozenset[str] = frozenset()) -> list[str]:
    """'field: saved -> current' for every field that differs, ignoring `free` ones."""
    keys = sorted((set(saved) | set(current)) - free)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def check_compatible(state: dict, train_cfg: dict, model_cfg: dict, world_size: int, path, train_free) -> None:
    """Raise ValueError naming each field where the checkpoint's run differs from this one."""
    diffs = [f"model.{d}" for d in config_differences(state["model_config"], model_cfg, MODEL_FREE)]
    diffs += config_differences(state["train_config"], train_cfg, train_free)
    if state.get("world_size", 1) != world_size:
        diffs.append(f"world_size: {state.get('world_size', 1)} -> {world_size}")
    if diffs:
        raise ValueError(f"checkpoint {path} comes from a different configuration; resuming it would not "
                         "continue that run. Differing fields:\n  " + "\n  ".join(diffs))


def model_from_checkpoint(path: str | Path, device="cpu", ops: str | None = None) -> CrossMAE:
    """The `CrossMAE` a checkpoint describes, with its weights, in eval mode (for evaluation)."""
    state = load_checkpoint(path)
    cfg = dict(state["model_config"])
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
