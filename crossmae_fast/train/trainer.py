"""`Trainer`: a pre-training run from a `RunConfig` to checkpoints, metrics, encoders and a summary.

The run's position lives in one `TrainState` (step, epoch, batch in the epoch, RNG states, last
metrics), which a checkpoint stores and a resume restores; the parts each do one job: `TrainStep`
(train/step.py) the optimisation step, and from components/: `MetricsLog` the records, progress line
and NaN stop, `Stopper` signals, time limit and DDP agreement, `Schedule` the learning rate,
checkpoint.py the file format and the resume rules. The evaluation after a complete run is a
plugged-in `Validator` (the CLI builds it). Resume is exact: 5 steps, a stop and 5 resumed steps give
the weights and losses of 10 straight steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from crossmae_fast import options
from crossmae_fast.components import checkpoint as ckpt
from crossmae_fast.components import distributed
from crossmae_fast.components.checkpoint import TrainState
from crossmae_fast.components.lr_schedule import Schedule, schedule_for
from crossmae_fast.components.metrics_log import MetricsLog, format_eta
from crossmae_fast.components.rng import gather_rng, seed_all, set_rng_state
from crossmae_fast.components.run_lock import hold_run_folder
from crossmae_fast.components.stopping import Stopper
from crossmae_fast.config import RunConfig
from crossmae_fast.data import normalisation
from crossmae_fast.files import WRITE_ERRNOS, WriteError, atomic_write
from crossmae_fast.model.crossmae import CrossMAE
from crossmae_fast.train.step import TrainStep, make_optimizer

if TYPE_CHECKING:
    from crossmae_fast.data.clips import ClipLoader

log = logging.getLogger("crossmae_fast.pretrain")


Validator = Callable[[torch.nn.Module, "str | Path"], dict]
"""`validator(model, manifest)`: the evaluation that ends a complete run (main process only); its result
is returned in the summary and appended to the metrics log."""


def next_batch_keep_rng(iterator):
    """Next batch (None at the end) without touching the default CPU RNG (a DataLoader draws its base
    seed from it), so the masking noise depends only on the step count and resume is exact."""
    with torch.random.fork_rng(devices=[]):
        return next(iterator, None)


def set_threads(threads: int, device: torch.device) -> None:
    """`threads=0`: torch's default, except 1 thread on a CPU whose load already fills its cores
    (OpenMP threads spinning against other processes make a step several times slower)."""
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if torch.get_num_threads() > 1 and load > cores - 0.5:
            torch.set_num_threads(1)
            log.info("CPU busy (load %.1f on %d cores): 1 torch thread (--threads N to choose)", load, cores)


class Trainer:
    """Pre-trains `CrossMAE` as `cfg` says: `Trainer(cfg, validator).fit()` returns a summary (steps,
    last metrics, checkpoint, why it stopped, and the validator's result after a complete run on the
    eval manifest; no evaluation without a validator). One per process under torchrun (DDP)."""

    # set up by `fit`: this process's place, then the parts of the run
    device: torch.device
    rank: int
    world: int
    is_main: bool
    precision: str
    model: CrossMAE
    loader: ClipLoader
    per_epoch: int
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    train_step: TrainStep
    metrics: MetricsLog
    stopper: Stopper

    def __init__(self, cfg: RunConfig, validator: Validator | None = None):
        self.cfg, self.validator = cfg, validator
        self.state = TrainState()
        self.stopped: str | None = None
        self.checkpoint: Path | None = None
        self.lr = 0.0
        self.start_step = 0  # where this process began (a resume's step)
        self.skips_logged = 0  # clips replaced (all ranks) up to the last metrics record

    # --- set-up -----------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Hold the run folder (`RunFolderBusy` if another process does), set up (resuming when
        `train.resume` says so), train until the end, a stop or a NaN, then export the encoders and
        evaluate (after a complete run)."""
        self._start_process()
        with hold_run_folder(self.cfg.train.out, self.is_main):
            return self._fit()

    def _fit(self) -> dict:
        path = self._resume_path()
        manifests = self._manifests()
        # settings derived from the data belong here, before the config is compared with a checkpoint's:
        # the train split's fbank statistics (else AudioSet's) unless given; the checkpoint records them
        self.cfg.data = normalisation.resolve(self.cfg.data, manifests["train"])
        resume = self._load_resume(path) if path else None
        self._build(resume, manifests["train"])
        self._announce()
        with self.stopper:
            try:
                self._run()
            except OSError as e:
                raise self._write_failed(e) from None
        return self._finish(manifests.get("eval"))

    def _start_process(self) -> None:
        """Join the process group, pick the device and threads, check the given paths."""
        t = self.cfg.train
        if t.cuda_graph:  # NCCL's watchdog must not abort collectives that live inside a CUDA graph
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        where = distributed.init_distributed(t.device)
        self.device, self.rank, self.world, self.is_main = where.device, where.rank, where.world_size, where.is_main
        set_threads(t.threads, self.device)
        self.precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        for flag, value in (("data", t.data), ("eval-data", self.cfg.eval.eval_data), ("init", t.init)):
            if value and not Path(value).is_file():
                raise FileNotFoundError(f"--{flag} {value}: no such file")

    def _resume_path(self) -> Path | None:
        """The checkpoint `--resume` names (None: a fresh start); rank 0 decides, all ranks agree."""
        t = self.cfg.train
        path, error = distributed.broadcast_object(ckpt.resolve_resume(t.out, t.resume) if self.is_main else None)
        if error:
            raise ValueError(error)
        return path

    def _load_resume(self, path: Path) -> dict:
        """The checkpoint's state (every rank reads the file: a shared filesystem), once it is checked
        to continue under this config."""
        state = ckpt.load_checkpoint(path)
        longer = ckpt.check_resume(state, self.cfg, self.world, path)
        if longer and self.is_main:
            log.warning("resume: run length changed (%s); the schedule is recomputed from step %d, so this is "
                        "not the run a fresh start with this length would give", "; ".join(longer), state["step"])
        if self.is_main:
            log.info("resuming %s: step %d, epoch %d, batch %d", path, state["step"], state["epoch"], state["batch"])
        return state

    def _manifests(self) -> dict[str, str | Path | None]:
        """Train and eval manifests: the given ones, else the cached synthetic set (rank 0 writes it)."""
        t, ev = self.cfg.train, self.cfg.eval
        if t.data is not None:
            return {"train": t.data, "eval": ev.eval_data}
        from crossmae_fast.data.synthetic import cached_synthetic_set

        def make():
            return cached_synthetic_set(t.synth_clips, seed=0, seconds=t.synth_seconds,
                                        image_size=self.cfg.model.image_size)

        if self.is_main:
            log.info("data: the synthetic set (%d clips, %s s audio; written once, then cached)", t.synth_clips,
                     t.synth_seconds)
        paths = make() if self.is_main else None
        distributed.barrier()
        paths = paths or make()  # other ranks: now a cache hit
        return {"train": paths["train"], "eval": ev.eval_data or paths["eval"]}

    def _build(self, resume: dict | None, train_manifest) -> None:
        """Model, loader, schedule, optimizer and train step; the state of `resume` restored."""
        t = self.cfg.train
        seed_all(t.seed)  # identical initial weights on every rank
        self.model = CrossMAE(self.cfg.model).to(self.device)
        if t.init and resume is None:
            from crossmae_fast.model.weights import load_mae_checkpoint

            load_mae_checkpoint(self.model, t.init)
        self.loader = self._loader(train_manifest)
        self.per_epoch = len(self.loader)
        self.schedule = schedule_for(t, self.per_epoch, t.batch_size * self.world)
        self.optimizer = make_optimizer(self.model, t, self.schedule.base_lr, self.device)
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(resume["optimizer"])
            self.state.load_state_dict(resume)
            set_rng_state(self.state.rng[self.rank])
            self.start_step = self.state.step
        else:
            seed_all(t.seed + self.rank)  # per-rank masking noise
        self.train_step = self._train_step()
        self.metrics = MetricsLog(Path(t.out), total=self.schedule.total, per_epoch=self.per_epoch,
                                  is_main=self.is_main, global_batch=t.batch_size * self.world,
                                  step=self.state.step, seconds=float(self.state.metrics.get("time_s", 0.0)),
                                  tensorboard=t.tensorboard)
        self.stopper = Stopper(t.time_limit, self.world, self.device)

    def _loader(self, manifest):
        from crossmae_fast.data import make_loader

        loader = make_loader(manifest, batch_size=self.cfg.train.batch_size, train=True, data_config=self.cfg.data,
                             device=self.device, rank=self.rank, world_size=self.world, seed=self.cfg.train.seed)
        if len(loader) == 0:
            raise ValueError(f"--data {manifest}: too few clips for one batch of {self.cfg.train.batch_size} x "
                             f"{self.world} processes; lower --batch-size")
        return loader

    def _train_step(self) -> TrainStep:
        net = self.model
        if self.world > 1:  # built on a side stream, as CUDA-graph capture of DDP's backward requires
            cuda = self.device.type == "cuda"
            with torch.cuda.stream(torch.cuda.Stream(self.device)) if cuda else contextlib.nullcontext():
                net = torch.nn.parallel.DistributedDataParallel(
                    self.model, device_ids=[self.device.index] if cuda else None, broadcast_buffers=False)
        if self.cfg.train.compile:
            net = torch.compile(net)
        # DDP rebuilds its buckets during the first iterations: 11 eager ones before capture (torch docs)
        return TrainStep(net, self.optimizer, self.cfg.model.terms, self.device, self.precision,
                         self.cfg.train.cuda_graph, warmup=11 if self.world > 1 else 3)

    def _announce(self) -> None:
        if not self.is_main:
            return
        m, t, sched = self.cfg.model, self.cfg.train, self.schedule
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("run: %s/%s (%.1f M parameters) on %s x%d, %s, loader %s, ops %s; %d steps (%d per epoch), "
                 "global batch %d, lr %.3g, warm-up %d steps; out %s", m.preset, m.variant, n_params / 1e6,
                 self.device, self.world, self.precision, self.cfg.data.loader, m.ops, sched.total, self.per_epoch,
                 t.batch_size * self.world, sched.base_lr, sched.warmup, t.out)
        # the same keys as a --config file: `--config OUT/config.json` repeats the run
        settable = options.settable(RunConfig, self.cfg.to_dict())
        atomic_write(Path(t.out, "config.json"), json.dumps(settable, indent=1) + "\n")
        if self.state.step >= sched.total:
            log.info("run already complete at step %d (raise --steps / --epochs to train longer)", self.state.step)

    # --- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        state = self.state
        while state.step < self.schedule.total and self.stopped is None:
            state.carry_epochs(self.per_epoch)
            self.loader.set_epoch(state.epoch, start_batch=state.batch)
            self._epoch(iter(self.loader))

    def _epoch(self, batches) -> None:
        state = self.state
        while state.step < self.schedule.total and state.batch < self.per_epoch:
            batch = self._next(batches)
            if batch is None:  # a signal arrived while the loader was fetching
                self.stopped = self.stopper.signal
                self.save("stop: " + self.stopped)
                return
            self.lr = self.schedule(state.step)
            self.train_step.set_lr(self.lr)
            self.train_step(batch["audio"], batch["image"])
            state.step, state.batch = state.step + 1, state.batch + 1
            if self._after_step():
                return

    def _next(self, batches):
        try:
            batch = next_batch_keep_rng(batches)
        except Exception:  # e.g. a DataLoader worker killed by the same Ctrl-C
            if not self.stopper.signal or self.world > 1:  # DDP saves only at steps all ranks agreed on
                raise
            return None
        if batch is None and not self.stopper.signal:
            raise RuntimeError(f"data loader ended after {self.state.batch} of {self.per_epoch} batches")
        return batch

    def _after_step(self) -> bool:
        """Log, save and decide whether to stop; True when the run stops here."""
        step, total, every = self.state.step, self.schedule.total, self.cfg.train.save_every
        at_log = step % self.cfg.train.log_every == 0 or step == total
        reason = self.stopper.check(at_log)
        if reason or step == total or (every and step % every == 0):
            self.save(f"stop: {reason}" if reason else "end" if step == total else "periodic")
        elif at_log:
            self._flush()
        self.stopped = reason
        return reason is not None

    def _flush(self) -> None:
        """Write a metrics record (with the clips the loader skipped since the last one), then stop the
        run if too many clips were skipped. Every rank calls it at the same steps."""
        replaced = distributed.all_sum([self.loader.stats.replaced], self.device)[0]
        record = self.metrics.flush(self.train_step, self.state.step, self.lr,
                                    {"skipped": replaced - self.skips_logged})
        if record is not None:
            self.state.metrics = record
            self.skips_logged = replaced
        self._check_skips(replaced)

    def _check_skips(self, replaced: int) -> None:
        """ValueError when more than `max_skip_fraction` of the clips this process has fed were replaced."""
        seen = (self.state.step - self.start_step) * self.cfg.train.batch_size * self.world
        limit = self.cfg.train.max_skip_fraction
        if seen and replaced > limit * seen:
            last = ckpt.latest_checkpoint(self.cfg.train.out) if self.is_main else None
            raise ValueError(
                f"{replaced} of the {seen} clips seen were unreadable and replaced ({replaced / seen:.1%}, over "
                f"--max-skip-fraction {limit:g}); the warnings above name the rows. Fix or drop them, or raise "
                f"--max-skip-fraction, then --resume auto (last checkpoint: {last or 'none'})")

    def save(self, reason: str) -> None:
        """Flush the metrics (never save past a NaN), gather every rank's RNG state, write (rank 0)."""
        self._flush()
        self.state.rng = gather_rng()
        if self.is_main:
            state = dataclasses.replace(self.state)
            state.carry_epochs(self.per_epoch)
            self.checkpoint = ckpt.save_checkpoint(
                self.cfg.train.out, ckpt.checkpoint_state(self.model, self.optimizer, self.cfg, self.world, state),
                self.cfg.train.keep)
            log.info("checkpoint (%s): %s", reason, self.checkpoint)
        distributed.barrier()

    def _write_failed(self, e: OSError) -> OSError:
        """A write that failed mid-run (a full disk: a checkpoint, the metrics log) as a `WriteError` that
        also names the last good checkpoint, which atomic writes leave intact; other errors unchanged."""
        if not isinstance(e, WriteError) and e.errno not in WRITE_ERRNOS:
            return e
        kept = ckpt.latest_checkpoint(self.cfg.train.out)
        return WriteError(e.errno, f"{e.strerror}; stopped at step {self.state.step}, the last good checkpoint "
                                   f"{kept or '(none)'} is kept: free space, then --resume auto", e.filename)

    # --- the end ----------------------------------------------------------------------------------

    def _finish(self, eval_manifest) -> dict:
        elapsed = self.metrics.elapsed()
        summary = {"steps": self.state.step, "total_steps": self.schedule.total, "metrics": self.state.metrics,
                   "checkpoint": self.checkpoint, "stopped": self.stopped, "seconds": elapsed,
                   "step_mode": self.train_step.mode}
        if not self.is_main:
            return summary
        log.info("%s after %d steps in %s (%s step)", f"stopped ({self.stopped})" if self.stopped else "finished",
                 self.state.step, format_eta(elapsed), self.train_step.mode)
        if self.stopped is None:
            if self.cfg.train.export_encoders:
                paths = ckpt.export_encoders(self.model, self.cfg.train.out)
                log.info("encoders (timm state dicts): %s", ", ".join(map(str, paths)))
            # the other ranks are done (no barrier: a long evaluation must not time them out)
            if eval_manifest and self.validator is not None:
                summary["eval"] = self._evaluate(eval_manifest)
        self.metrics.close()
        return summary

    def _evaluate(self, manifest) -> dict | None:
        """The validator's result on `manifest`, appended to metrics.jsonl."""
        self.model.eval()
        try:
            result = self.validator(self.model, manifest)
        except Exception as e:  # training results are saved already; report and carry on
            log.warning("evaluation failed (%s: %s); the checkpoint is saved", type(e).__name__, e)
            return None
        finally:
            self.model.train()
        self.metrics.append({"step": self.state.step, "eval": result})
        return result
