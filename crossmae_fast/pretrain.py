"""Pre-train CrossMAE: `python -m crossmae_fast.pretrain [options]` (one process) or
`torchrun --nproc_per_node N -m crossmae_fast.pretrain [options]` (DDP).

With no options it generates (once; cached under ~/.cache/crossmae_fast or $CROSSMAE_CACHE) a small
synthetic audio-visual set, trains the `tiny` preset on the best device there is, writes
checkpoints, `metrics.jsonl` and timm encoder weights to `runs/pretrain`, and ends with the
retrieval / localization summary on the set's eval split. `--resume auto` continues a run exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
import types
import typing
from pathlib import Path

import numpy as np
import torch

from crossmae_fast.config import data_config, model_config
from crossmae_fast.model.crossmae import CrossMAE
from crossmae_fast.train import checkpoint as ckpt
from crossmae_fast.train import distributed
from crossmae_fast.train.step import RESUME_FREE, RESUME_LENGTH, TrainConfig, TrainStep, lr_at, make_optimizer

log = logging.getLogger("crossmae_fast.pretrain")


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or Inf; the run stops without saving."""


# --- command line ---------------------------------------------------------------------------------

def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if isinstance(hint, types.UnionType) else hint


def build_parser() -> argparse.ArgumentParser:
    """One option per `TrainConfig` field, plus `--config`. Options not given keep the config
    file's value, else the dataclass default (argument_default=SUPPRESS tells them apart)."""
    ap = argparse.ArgumentParser(
        prog="python -m crossmae_fast.pretrain", argument_default=argparse.SUPPRESS,
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        epilog="Multi-GPU / multi-node: torchrun --nproc_per_node N -m crossmae_fast.pretrain ...; "
               "--batch-size is per process.",
    )
    ap.add_argument("--config", metavar="FILE", help="YAML or JSON file of TrainConfig fields; options given "
                    "on the command line override it")
    for f in dataclasses.fields(TrainConfig):
        flag, meta, kind = "--" + f.name.replace("_", "-"), f.metadata, _field_type(f)
        default = "" if f.default is None else f" (default: {f.default})"
        help_text = (meta["help"] + default).replace("%", "%%")
        if kind is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "resume":
            ap.add_argument(flag, nargs="?", const="auto", metavar="auto|PATH", help=help_text)
        else:
            ap.add_argument(flag, type=kind, choices=meta.get("choices"), help=help_text,
                            metavar=None if meta.get("choices") else f.name.upper())
    return ap


def read_config_file(path: str) -> dict:
    """Fields from a YAML or JSON mapping (keys with '-' or '_')."""
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return data


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from defaults <- config file <- command line; a bad value exits with an argparse error."""
    ap = build_parser()
    ns = vars(ap.parse_args(argv))
    try:
        values = read_config_file(ns.pop("config")) if "config" in ns else {}
        if "steps" in values and "epochs" in ns and "steps" not in ns:
            values.pop("steps")  # --epochs on the command line beats the file's steps
        values.update(ns)
        model_config(values.get("preset", "tiny"), values.get("variant", "crossmae"),
                     **{k: values[k] for k in ("attentive_tokens", "queries", "ops") if k in values})
        return TrainConfig(**values)
    except (ValueError, TypeError, OSError) as e:
        ap.error(str(e))


# --- data -----------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("CROSSMAE_CACHE", Path.home() / ".cache" / "crossmae_fast")).expanduser()


def synthetic_set(cfg: TrainConfig, image_size: int) -> dict[str, Path]:
    """Manifests of the default synthetic set, generated once into a folder named for its parameters
    (and the generator's source), built in a temporary folder and renamed into place."""
    from crossmae_fast.data import synthetic as synth

    params = dict(clips=cfg.synth_clips, seed=0, seconds=cfg.synth_seconds, image_size=image_size)
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode() + Path(synth.__file__).read_bytes())
    folder = cache_root() / f"synth-{digest.hexdigest()[:12]}"
    paths = {"train": folder / "train.json", "eval": folder / "eval.json"}
    if not all(p.is_file() for p in paths.values()):
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        log.info("synthetic set: writing %d clips (%s s audio, %d px) to %s", cfg.synth_clips,
                 cfg.synth_seconds, image_size, folder)
        synth.make_synthetic_set(tmp, **params)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("synthetic set: done in %.1f s", time.perf_counter() - t0)
    else:
        log.info("synthetic set: reusing %s", folder)
    return paths


def fetch(iterator):
    """Next batch (None at the end) without touching the default CPU RNG (a DataLoader draws its base
    seed from it), so the masking noise depends only on the step count and resume is exact."""
    with torch.random.fork_rng(devices=[]):
        return next(iterator, None)


def epoch_iterator(loader, start: int = 0):
    """The current epoch's batches from batch `start` on (mid-epoch resume). The loaders read their
    epoch plan from `batches()` when iteration begins; a plan cut at `start` skips the batches
    without decoding them. Loaders without `batches()` have theirs fetched and dropped."""
    cut = start > 0 and callable(getattr(loader, "batches", None))
    if cut:
        full = loader.batches
        loader.batches = lambda: full()[start:]
    it = iter(loader)
    try:
        batch = fetch(it)
    finally:
        if cut:
            del loader.batches
    for _ in range(0 if cut else start):
        batch = fetch(it)
    while batch is not None:
        yield batch
        batch = fetch(it)


# --- the run --------------------------------------------------------------------------------------

def set_threads(cfg: TrainConfig, device: torch.device) -> None:
    """`--threads 0`: torch's default, except 1 thread on a CPU whose load already fills its cores
    (OpenMP threads spinning against other processes make a step several times slower)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if torch.get_num_threads() > 1 and load > cores - 0.5:
            torch.set_num_threads(1)
            log.info("CPU busy (load %.1f on %d cores): 1 torch thread (--threads N to choose)", load, cores)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopFlag:
    """Set by SIGINT / SIGTERM; the loop checks it between steps, saves and exits."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run(cfg: TrainConfig) -> dict:
    """Train according to `cfg`; returns a summary (steps, last metrics, checkpoint, evaluation)."""
    if cfg.cuda_graph:  # NCCL's watchdog must not abort collectives that live inside a CUDA graph
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    dist_info = distributed.init_distributed(cfg.device)
    dev, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    main_proc = dist_info.is_main
    set_threads(cfg, dev)
    out = Path(cfg.out)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    mcfg = model_config(cfg.preset, cfg.variant, attentive_tokens=cfg.attentive_tokens, queries=cfg.queries,
                        ops=cfg.ops)
    dcfg = data_config(mcfg)

    for name in ("data", "eval_data", "init"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: no such file")
    # rank 0 decides (all ranks must agree); every rank then reads the file (a shared filesystem)
    resume_path, error = distributed.broadcast_object(resolve_resume(cfg) if main_proc else None)
    if error:
        raise ValueError(error)
    state = ckpt.load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        ckpt.check_compatible(state, cfg.to_dict(), mcfg.to_dict(), world, resume_path, RESUME_FREE | RESUME_LENGTH)
        longer = ckpt.config_differences({k: state["train_config"].get(k) for k in RESUME_LENGTH},
                                         {k: getattr(cfg, k) for k in RESUME_LENGTH})
        if longer and main_proc:
            log.warning("resume: run length changed (%s); the schedule is recomputed from step %d, so this is "
                        "not the run a fresh start with this length would give", "; ".join(longer), state["step"])

    train_manifest, eval_manifest = cfg.data, cfg.eval_data
    if train_manifest is None:
        paths = synthetic_set(cfg, mcfg.image_size) if main_proc else None
        distributed.barrier()
        paths = paths or synthetic_set(cfg, mcfg.image_size)  # other ranks: now a cache hit
        train_manifest, eval_manifest = paths["train"], eval_manifest or paths["eval"]

    seed_all(cfg.seed)  # identical initial weights on every rank
    model = CrossMAE(mcfg).to(dev)
    if cfg.init and state is None:
        from crossmae_fast.model.weights import load_mae_checkpoint

        load_mae_checkpoint(model, cfg.init)
    loader = make_train_loader(train_manifest, cfg.loader, cfg, dcfg, dev, rank, world)
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError(f"--data {train_manifest}: too few clips for one batch of {cfg.batch_size} x {world} "
                         "processes; lower --batch-size")
    total = cfg.total_steps(per_epoch)
    warmup = cfg.warmup_steps(total, per_epoch)
    base_lr = cfg.base_lr(cfg.batch_size * world)
    opt = make_optimizer(model, cfg, base_lr, dev)

    step_idx, epoch, batch_in_epoch, last_metrics = 0, 0, 0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step_idx, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch"]
        last_metrics = state.get("metrics", {})
        ckpt.set_rng_state(state["rng"][rank])
        if main_proc:
            log.info("resumed %s: step %d, epoch %d, batch %d", resume_path, step_idx, epoch, batch_in_epoch)
    else:
        seed_all(cfg.seed + rank)  # per-rank masking noise
    net = model
    if world > 1:  # built on a side stream, as CUDA-graph capture of DDP's backward requires
        with torch.cuda.stream(torch.cuda.Stream(dev)) if dev.type == "cuda" else contextlib.nullcontext():
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
    if cfg.compile:
        net = torch.compile(net)
    # DDP rebuilds its buckets during the first iterations: 11 eager ones before capture (torch docs)
    train_step = TrainStep(net, opt, mcfg.terms, dev, precision, cfg.cuda_graph, warmup=11 if world > 1 else 3)

    metrics_path = out / "metrics.jsonl"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(metrics_path, step_idx)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("run: %s/%s (%.1f M parameters) on %s x%d, %s, loader %s, ops %s; %d steps (%d per epoch), "
                 "global batch %d, lr %.3g, warm-up %d steps; out %s", cfg.preset, cfg.variant, n_params / 1e6,
                 dev, world, precision, cfg.loader, cfg.ops, total, per_epoch, cfg.batch_size * world, base_lr,
                 warmup, out)
        (out / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "model": mcfg.to_dict(),
                                                     "world_size": world}, indent=1) + "\n")

    def save(reason: str) -> Path | None:
        path = None
        if main_proc:
            path = ckpt.save_checkpoint(out, checkpoint_state(), cfg.keep)
            log.info("checkpoint (%s): %s", reason, path)
        distributed.barrier()
        return path

    def checkpoint_state() -> dict:
        return {
            "model": model.state_dict(), "optimizer": ckpt.optimizer_state(opt), "step": step_idx,
            "epoch": epoch + batch_in_epoch // per_epoch, "batch": batch_in_epoch % per_epoch,
            "rng": rng_states, "world_size": world, "train_config": cfg.to_dict(),
            "model_config": mcfg.to_dict(), "metrics": last_metrics,
        }

    def flush(now: float) -> None:
        """Read the accumulated losses (one sync), stop on NaN/Inf, log and record them."""
        nonlocal last_metrics, t_log, steps_at_log
        if train_step.count == 0:
            return
        values = train_step.read()
        bad = {k: v for k, v in values.items() if not np.isfinite(v)}
        if bad:
            good = ckpt.latest_checkpoint(out)
            raise NonFiniteLoss(
                f"non-finite loss at steps {steps_at_log + 1}-{step_idx}: "
                + ", ".join(f"{k}={v}" for k, v in bad.items())
                + f". Stopped without saving; last good checkpoint: {good or 'none'}. Lower --lr/--blr, "
                  "lengthen --warmup or use --precision fp32, then --resume auto.")
        n = step_idx - steps_at_log
        dt = max(now - t_log, 1e-9)
        rate = n / dt
        record = {"step": step_idx, "epoch": round(step_idx / per_epoch, 3), "lr": current_lr,
                  **{k: round(v, 6) for k, v in values.items()},
                  "samples_per_s": round(rate * cfg.batch_size * world, 2), "steps_per_s": round(rate, 4),
                  "time_s": round(now - t_start + time_before, 2)}
        last_metrics = record
        if main_proc:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            terms = " ".join(f"{k} {v:.4f}" for k, v in values.items())
            log.info("step %d/%d ep %.2f | %s | lr %.3g | %.1f samples/s %.2f steps/s | ETA %s", step_idx, total,
                     step_idx / per_epoch, terms, current_lr, record["samples_per_s"], rate,
                     format_eta((total - step_idx) / rate))
        t_log, steps_at_log = now, step_idx

    rng_states: list[dict] = []
    t_start = t_log = time.perf_counter()
    time_before = float(last_metrics.get("time_s", 0.0))
    steps_at_log, current_lr, stopped = step_idx, lr_at(step_idx, base_lr, cfg.min_lr, warmup, total), None
    deadline = t_start + cfg.time_limit * 60 if cfg.time_limit else None
    ckpt_path = None

    def checkpoint_now(reason: str) -> Path | None:
        nonlocal rng_states
        flush(time.perf_counter())  # never save past a NaN
        rng_states = gather_rng()
        return save(reason)

    if step_idx >= total and main_proc:
        log.info("run already complete at step %d (raise --steps / --epochs to train longer)", step_idx)
    with StopFlag() as stop:
        while step_idx < total and stopped is None:
            epoch += batch_in_epoch // per_epoch
            batch_in_epoch %= per_epoch
            loader.set_epoch(epoch)
            it = epoch_iterator(loader, batch_in_epoch)
            while step_idx < total and batch_in_epoch < per_epoch:
                try:
                    batch = next(it, None)
                except Exception:  # e.g. a DataLoader worker killed by the same Ctrl-C
                    if not stop.signal or world > 1:  # DDP saves only at steps all ranks agreed on
                        raise
                    batch = None
                if batch is None:
                    if not stop.signal:
                        raise RuntimeError(f"data loader ended after {batch_in_epoch} of {per_epoch} batches")
                    stopped = stop.signal
                    ckpt_path = checkpoint_now("stop: " + stopped)
                    break
                current_lr = lr_at(step_idx, base_lr, cfg.min_lr, warmup, total)
                train_step.set_lr(current_lr)
                train_step(batch["audio"], batch["image"])
                step_idx, batch_in_epoch = step_idx + 1, batch_in_epoch + 1
                at_log = step_idx % cfg.log_every == 0 or step_idx == total
                want_stop = stop.signal or ("time limit" if deadline and time.perf_counter() > deadline else None)
                if world > 1:  # every rank stops at the same step: decide together, at log steps only
                    agreed = at_log and distributed.any_true(want_stop is not None, dev)
                    want_stop = (want_stop or "stop on another rank") if agreed else None
                if want_stop or step_idx == total or (cfg.save_every and step_idx % cfg.save_every == 0):
                    ckpt_path = checkpoint_now(f"stop: {want_stop}" if want_stop else
                                               "end" if step_idx == total else "periodic")
                elif at_log:
                    flush(time.perf_counter())
                if want_stop:
                    stopped = want_stop
                    break
    elapsed = time.perf_counter() - t_start
    summary = {"steps": step_idx, "total_steps": total, "metrics": last_metrics, "checkpoint": ckpt_path,
               "stopped": stopped, "seconds": elapsed, "step_mode": train_step.mode}
    if main_proc:
        log.info("%s after %d steps in %s (%s step)", f"stopped ({stopped})" if stopped else "finished",
                 step_idx, format_eta(elapsed), train_step.mode)
    if stopped is None and main_proc:
        if cfg.export_encoders:
            paths = ckpt.export_encoders(model, out)
            log.info("encoders (timm state dicts): %s", ", ".join(map(str, paths)))
        if eval_manifest:  # the other ranks are done (no barrier: a long evaluation must not time them out)
            summary["eval"] = final_evaluation(model, eval_manifest, cfg, dev, metrics_path, step_idx)
    return summary


def resolve_resume(cfg: TrainConfig) -> tuple[Path | None, str | None]:
    """(checkpoint to resume or None, error): `--resume auto` takes the latest in --out, a folder its
    latest, a file itself; a fresh start refuses an --out that already holds checkpoints."""
    out = Path(cfg.out)
    if cfg.resume is None:
        found = ckpt.latest_checkpoint(out)
        if found:
            return None, (f"--out {out} already holds a run ({found.name}); continue it with --resume auto or "
                          "choose another --out")
        return None, None
    target = out if cfg.resume == "auto" else Path(cfg.resume)
    if target.is_dir():
        found = ckpt.latest_checkpoint(target)
        if found is None and cfg.resume != "auto":
            return None, f"--resume {target}: no checkpoint in that folder"
        if found is None:
            log.info("resume auto: no checkpoint in %s, starting fresh", out)
        return found, None
    if cfg.resume == "auto":
        return None, None
    if not target.is_file():
        return None, f"--resume {target}: no such checkpoint"
    return target, None


def make_train_loader(manifest, backend, cfg, dcfg, dev, rank, world):
    from crossmae_fast.data import make_loader

    return make_loader(manifest, backend=backend, batch_size=cfg.batch_size, train=True, data_config=dcfg,
                       device=dev, rank=rank, world_size=world, num_workers=cfg.workers, seed=cfg.seed,
                       video=cfg.video)


def gather_rng() -> list[dict]:
    """Every rank's RNG state (on rank 0; an empty-ish list elsewhere is fine, only rank 0 writes)."""
    mine = ckpt.rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


def trim_metrics(path: Path, step: int) -> None:
    """Drop records past `step` (left by a run that died after its last checkpoint) before resuming."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if _record_step(ln) <= step]
    if len(keep) != len(lines):
        ckpt.atomic_write(path, lambda f: f.write("".join(ln + "\n" for ln in keep).encode()))


def _record_step(line: str) -> float:
    """A metrics line's step; infinity for a torn or foreign line (a crash mid-write), so it is dropped."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def final_evaluation(model, manifest, cfg: TrainConfig, dev, metrics_path: Path, step: int) -> dict | None:
    """Retrieval / localization summary from `crossmae_fast.evaluate`, when that module provides it."""
    try:
        from crossmae_fast.eval import evaluator as evaluate
    except ImportError as e:
        log.info("evaluation: skipped (crossmae_fast.evaluate not importable: %s)", e)
        return None
    if not hasattr(evaluate, "evaluate"):
        log.info("evaluation: skipped (crossmae_fast.evaluate has no evaluate())")
        return None
    try:
        result = evaluate.evaluate(model, manifest, out_dir=Path(cfg.out) / "eval", pictures_k=cfg.eval_pictures,
                                   batch_size=cfg.batch_size, device=dev, backend=cfg.loader,
                                   num_workers=cfg.workers, seed=cfg.seed)
    except Exception as e:  # training results are saved already; report and carry on
        log.warning("evaluation failed (%s: %s); the checkpoint is saved", type(e).__name__, e)
        return None
    finally:
        model.train()
    table = evaluate.format_tables(result) if hasattr(evaluate, "format_tables") else json.dumps(result, indent=1)
    log.info("evaluation on %s:\n%s", manifest, table)
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"step": step, "eval": result}, default=str) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    try:
        summary = run(cfg)
    except NonFiniteLoss as e:
        log.error("%s", e)
        return 1
    except (ValueError, FileNotFoundError) as e:  # bad configuration, data or checkpoint
        log.error("pretrain: error: %s", e)
        log.debug("traceback", exc_info=True)
        return 2
    finally:
        distributed.cleanup()
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
