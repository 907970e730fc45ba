"""`Trainer`: a pre-training run from a `RunConfig` to checkpoints, metrics, encoders and a summary.

The run's position lives in one `TrainState` (step, epoch, batch in the epoch, RNG states, last
metrics), which a checkpoint stores and a resume restores; the parts each do one job: `TrainStep`
(train/step.py) the optimisation step, `MetricsLog` (train/metrics.py) the losses' accumulation,
records and NaN stop, `Stopper` (train/stopping.py) signals, time limit and DDP agreement,
train/checkpoint.py saving, finding and the resume rules. Resume is exact: 5 steps, a stop and 5
resumed steps give the weights and losses of 10 straight steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from crossmae_fast import options
from crossmae_fast.config import RunConfig
from crossmae_fast.data import normalisation
from crossmae_fast.model.crossmae import CrossMAE
from crossmae_fast.train import checkpoint as ckpt
from crossmae_fast.train import distributed
from crossmae_fast.train.metrics import MetricsLog, format_eta
from crossmae_fast.train.rng import gather_rng, seed_all, set_rng_state
from crossmae_fast.train.step import TrainStep, lr_at, make_optimizer
from crossmae_fast.train.stopping import Stopper

if TYPE_CHECKING:
    from crossmae_fast.data.clips import ClipLoader

log = logging.getLogger("crossmae_fast.pretrain")


@dataclass
class TrainState:
    """Where a run stands. `batch` counts the batches of `epoch` already used; `rng` holds every
    rank's generator states as of the last checkpoint; `metrics` is the last record written (its
    `time_s` carries the training time across resumes). The loss sums since the last record live
    on the device, in the `TrainStep` (it is flushed before every save, so a checkpoint needs none)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    rng: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, state: dict) -> TrainState:
        return cls(state["step"], state["epoch"], state["batch"], state["rng"], state.get("metrics", {}))

    def normalise(self, per_epoch: int) -> None:
        """Carry whole epochs from `batch` into `epoch`."""
        self.epoch += self.batch // per_epoch
        self.batch %= per_epoch


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up, then a half-cycle cosine to `min_lr` over `total` steps."""

    base_lr: float
    min_lr: float
    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.min_lr, self.warmup, self.total)


def fetch(iterator):
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
    """Pre-trains `CrossMAE` as `cfg` says: `Trainer(cfg).fit()` returns a summary (steps, last
    metrics, checkpoint, why it stopped, evaluation). One per process under torchrun (DDP)."""

    # set up by `fit`: this process's place, then the parts of the run
    device: torch.device
    rank: int
    world: int
    main: bool
    precision: str
    model: CrossMAE
    loader: ClipLoader
    per_epoch: int
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    train_step: TrainStep
    metrics: MetricsLog
    stopper: Stopper

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.state = TrainState()
        self.stopped: str | None = None
        self.checkpoint: Path | None = None
        self.lr = 0.0

    # --- set-up -----------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Set up (resuming when `train.resume` says so), train until the end, a stop or a NaN, then
        export the encoders and evaluate (after a complete run)."""
        self._start_process()
        path = self._resume_path()
        manifests = self._manifests()
        # settings derived from the data belong here, before the config is compared with a checkpoint's:
        # the train split's fbank statistics (else AudioSet's) unless given; the checkpoint records them
        self.cfg.data = normalisation.resolve(self.cfg.data, manifests["train"])
        resume = self._load_resume(path) if path else None
        self._build(resume, manifests["train"])
        self._announce()
        with self.stopper:
            self._run()
        return self._finish(manifests.get("eval"))

    def _start_process(self) -> None:
        """Join the process group, pick the device and threads, check the given paths."""
        t = self.cfg.train
        if t.cuda_graph:  # NCCL's watchdog must not abort collectives that live inside a CUDA graph
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        where = distributed.init_distributed(t.device)
        self.device, self.rank, self.world, self.main = where.device, where.rank, where.world_size, where.is_main
        set_threads(t.threads, self.device)
        self.precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        for flag, value in (("data", t.data), ("eval-data", self.cfg.eval.eval_data), ("init", t.init)):
            if value and not Path(value).is_file():
                raise FileNotFoundError(f"--{flag} {value}: no such file")

    def _resume_path(self) -> Path | None:
        """The checkpoint `--resume` names (None: a fresh start); rank 0 decides, all ranks agree."""
        t = self.cfg.train
        path, error = distributed.broadcast_object(ckpt.resolve_resume(t.out, t.resume) if self.main else None)
        if error:
            raise ValueError(error)
        return path

    def _load_resume(self, path: Path) -> dict:
        """The checkpoint's state (every rank reads the file: a shared filesystem), once it is checked
        to continue under this config."""
        state = ckpt.load_checkpoint(path)
        longer = ckpt.check_resume(state, self.cfg, self.world, path)
        if longer and self.main:
            log.warning("resume: run length changed (%s); the schedule is recomputed from step %d, so this is "
                        "not the run a fresh start with this length would give", "; ".join(longer), state["step"])
        if self.main:
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

        if self.main:
            log.info("data: the synthetic set (%d clips, %s s audio; written once, then cached)", t.synth_clips,
                     t.synth_seconds)
        paths = make() if self.main else None
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
        total = t.total_steps(self.per_epoch)
        self.schedule = Schedule(t.base_lr(t.batch_size * self.world), t.min_lr,
                                 t.warmup_steps(total, self.per_epoch), total)
        self.optimizer = make_optimizer(self.model, t, self.schedule.base_lr, self.device)
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(resume["optimizer"])
            self.state = TrainState.from_checkpoint(resume)
            set_rng_state(self.state.rng[self.rank])
        else:
            seed_all(t.seed + self.rank)  # per-rank masking noise
        self.train_step = self._train_step()
        self.metrics = MetricsLog(Path(t.out), total=total, per_epoch=self.per_epoch, main=self.main,
                                  global_batch=t.batch_size * self.world, step=self.state.step,
                                  seconds=float(self.state.metrics.get("time_s", 0.0)))
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
        if not self.main:
            return
        m, t, s = self.cfg.model, self.cfg.train, self.schedule
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("run: %s/%s (%.1f M parameters) on %s x%d, %s, loader %s, ops %s; %d steps (%d per epoch), "
                 "global batch %d, lr %.3g, warm-up %d steps; out %s", m.preset, m.variant, n_params / 1e6,
                 self.device, self.world, self.precision, self.cfg.data.loader, m.ops, s.total, self.per_epoch,
                 t.batch_size * self.world, s.base_lr, s.warmup, t.out)
        # the same keys as a --config file: `--config OUT/config.json` repeats the run
        settable = options.settable(RunConfig, self.cfg.to_dict())
        Path(t.out, "config.json").write_text(json.dumps(settable, indent=1) + "\n")
        if self.state.step >= s.total:
            log.info("run already complete at step %d (raise --steps / --epochs to train longer)", self.state.step)

    # --- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        s = self.state
        while s.step < self.schedule.total and self.stopped is None:
            s.normalise(self.per_epoch)
            self.loader.set_epoch(s.epoch, start_batch=s.batch)
            self._epoch(iter(self.loader))

    def _epoch(self, batches) -> None:
        s = self.state
        while s.step < self.schedule.total and s.batch < self.per_epoch:
            batch = self._next(batches)
            if batch is None:  # a signal arrived while the loader was fetching
                self.stopped = self.stopper.signal
                self.save("stop: " + self.stopped)
                return
            self.lr = self.schedule(s.step)
            self.train_step.set_lr(self.lr)
            self.train_step(batch["audio"], batch["image"])
            s.step, s.batch = s.step + 1, s.batch + 1
            if self._after_step():
                return

    def _next(self, batches):
        try:
            batch = fetch(batches)
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
        record = self.metrics.flush(self.train_step, self.state.step, self.lr)
        if record is not None:
            self.state.metrics = record

    def save(self, reason: str) -> None:
        """Flush the metrics (never save past a NaN), gather every rank's RNG state, write (rank 0)."""
        self._flush()
        self.state.rng = gather_rng()
        if self.main:
            self.checkpoint = ckpt.save_checkpoint(self.cfg.train.out, self._checkpoint_state(), self.cfg.train.keep)
            log.info("checkpoint (%s): %s", reason, self.checkpoint)
        distributed.barrier()

    def _checkpoint_state(self) -> dict:
        s = dataclasses.replace(self.state)
        s.normalise(self.per_epoch)
        return {"model": self.model.state_dict(), "optimizer": ckpt.optimizer_state(self.optimizer),
                "step": s.step, "epoch": s.epoch, "batch": s.batch, "rng": s.rng, "world_size": self.world,
                "config": self.cfg.to_dict(), "metrics": s.metrics}

    # --- the end ----------------------------------------------------------------------------------

    def _finish(self, eval_manifest) -> dict:
        elapsed = self.metrics.elapsed()
        summary = {"steps": self.state.step, "total_steps": self.schedule.total, "metrics": self.state.metrics,
                   "checkpoint": self.checkpoint, "stopped": self.stopped, "seconds": elapsed,
                   "step_mode": self.train_step.mode}
        if not self.main:
            return summary
        log.info("%s after %d steps in %s (%s step)", f"stopped ({self.stopped})" if self.stopped else "finished",
                 self.state.step, format_eta(elapsed), self.train_step.mode)
        if self.stopped is None:
            if self.cfg.train.export_encoders:
                paths = ckpt.export_encoders(self.model, self.cfg.train.out)
                log.info("encoders (timm state dicts): %s", ", ".join(map(str, paths)))
            if eval_manifest:  # the other ranks are done (no barrier: a long evaluation must not time them out)
                summary["eval"] = self._evaluate(eval_manifest)
        return summary

    def _evaluate(self, manifest) -> dict | None:
        """Retrieval / localization summary on `manifest`, appended to metrics.jsonl."""
        from crossmae_fast.eval import evaluator

        t = self.cfg.train
        try:
            result = evaluator.evaluate(self.model, manifest, out_dir=Path(t.out) / "eval",
                                        pictures_k=self.cfg.eval.eval_pictures, batch_size=t.batch_size,
                                        device=self.device, backend=self.cfg.data.loader,
                                        num_workers=self.cfg.data.workers, seed=t.seed, data=self.cfg.data)
        except Exception as e:  # training results are saved already; report and carry on
            log.warning("evaluation failed (%s: %s); the checkpoint is saved", type(e).__name__, e)
            return None
        finally:
            self.model.train()
        log.info("evaluation on %s:\n%s", manifest, evaluator.format_tables(result))
        self.metrics.append({"step": self.state.step, "eval": result})
        return result
