"""`Finetuner`: a fine-tuning (or linear-probing) run from a `FinetuneConfig` to checkpoints, per-epoch
scores in `metrics.jsonl` and the final `eval/` (metrics.json, per_class.csv, predictions.pt).

The run's position (step, epoch, batch in the epoch, every rank's RNG states) is checkpointed at every
epoch's end, every `--save-every` steps and on SIGINT / SIGTERM / `--time-limit`; `--resume auto`
continues it exactly, as pre-training does. The epoch's weights are also kept for `--average-last K`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import torch

from crossmae_fast import options
from crossmae_fast.classify import predict as P
from crossmae_fast.classify.step import ClassifyStep
from crossmae_fast.classify.task import Task, build_task, few_label_subset
from crossmae_fast.components import checkpoint as ckpt
from crossmae_fast.components import distributed
from crossmae_fast.components.checkpoint import TrainState
from crossmae_fast.components.distributed import set_threads
from crossmae_fast.components.lr_schedule import schedule_for
from crossmae_fast.components.metrics_log import MetricsLog, format_eta
from crossmae_fast.components.rng import gather_rng, next_batch_keep_rng, seed_all, set_rng_state
from crossmae_fast.components.run_lock import hold_run_folder
from crossmae_fast.components.stopping import Stopper
from crossmae_fast.config import FinetuneConfig
from crossmae_fast.data import normalisation
from crossmae_fast.data.augment import batch_rng, mixup
from crossmae_fast.files import atomic_write
from crossmae_fast.model.classifier import Classifier, num_parameters, param_groups

log = logging.getLogger("crossmae_fast.finetune")

RESUME_FREE = {"train": ckpt.RESUME_FREE["train"], "data": ckpt.RESUME_FREE["data"], "model": frozenset({"ops"}),
               "classify": frozenset({"eval_data", "average_last", "eval_frames", "eval_every", "eval_missing",
                                     "eval_only"})}
"""Fields a resumed fine-tuning run may change (how it runs and what it reports, not its updates)."""


class Finetuner:
    """`Finetuner(cfg, scorer).fit()` -> summary (steps, final scores, why it stopped). One per process
    (DDP). `scorer(scores, targets)` computes the eval set's metrics (`eval.classification_stats`)."""

    def __init__(self, cfg: FinetuneConfig, scorer: P.Scorer):
        self.cfg, self.scorer = cfg, scorer
        self.state = TrainState()
        self.stopped: str | None = None
        self.lr = 0.0
        self.out = Path(cfg.train.out)

    # --- set-up -----------------------------------------------------------------------------------

    def fit(self) -> dict:
        t = self.cfg.train
        self.where = where = distributed.init_distributed(t.device)
        self.device, self.rank, self.world, self.main = where.device, where.rank, where.world_size, where.is_main
        set_threads(t.threads, self.device)
        self.precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if not self.cfg.classify.eval_only:
            self.task = self._task()  # labels checked before anything is written (the lock included)
        with hold_run_folder(self.out, self.main):
            return self._fit()

    def _fit(self) -> dict:
        resume = self._resume()
        if self.cfg.classify.eval_only:  # the checkpoint's run, scored as the command line asks
            self.cfg = evaluation_config(FinetuneConfig.from_dict(resume["config"]), self.cfg)
            self.task = self._task()
        self.task = self._few_labels(self.task)
        self._build(resume)
        if self.cfg.classify.eval_only:
            return self._finish(evaluate_only=True)
        self._announce()
        with self.stopper:
            self._run()
        return self._finish()

    def _task(self) -> Task:
        t, c = self.cfg.train, self.cfg.classify
        for flag, value in (("data", t.data), ("eval-data", c.eval_data), ("label-csv", c.label_csv)):
            if value and not Path(value).is_file():
                raise FileNotFoundError(f"--{flag} {value}: no such file")
        train, eval_ = t.data, c.eval_data
        if train is None:
            from crossmae_fast.data.synthetic import cached_synthetic_set

            paths = cached_synthetic_set(t.synth_clips, seed=0, seconds=t.synth_seconds,
                                         image_size=self.cfg.model.image_size) if self.main else None
            distributed.barrier()
            paths = paths or cached_synthetic_set(t.synth_clips, seed=0, seconds=t.synth_seconds,
                                                  image_size=self.cfg.model.image_size)
            train, eval_ = paths["train"], eval_ or paths["eval"]
            if c.label_csv is None:  # the set's own label CSV
                csv = str(Path(train).parent / "class_labels_indices.csv")
                self.cfg.classify = c = dataclasses.replace(c, label_csv=csv)
        task = build_task(self.cfg, train, eval_)
        self.cfg.data = normalisation.resolve(self.cfg.data, train)
        return task

    def _few_labels(self, task: Task) -> Task:
        """The task on `--train-per-class` clips per class (its manifest written into the run folder)."""
        t, c = self.cfg.train, self.cfg.classify
        if c.train_per_class:
            if self.main:
                task = few_label_subset(task, c.train_per_class, t.seed, self.out, c.balanced == "auto")
            distributed.barrier()
            if not self.main:
                task = few_label_subset(task, c.train_per_class, t.seed, self.out / f".rank{self.rank}",
                                        c.balanced == "auto")
        return task

    def _resume(self) -> dict | None:
        t = self.cfg.train
        resume = t.resume or ("auto" if self.cfg.classify.eval_only else None)
        path, error = distributed.broadcast_object(ckpt.resolve_resume(t.out, resume) if self.main else None)
        if error:
            raise ValueError(error)
        if path is None:
            if self.cfg.classify.eval_only:
                raise ValueError(f"--eval-only: no fine-tuning checkpoint in {t.out} (give --resume PATH)")
            return None
        state = ckpt.load_checkpoint(path)
        if "classify" not in state.get("config", {}):
            raise ValueError(f"{path}: not a fine-tuning checkpoint (a pre-training one? pass it as --init)")
        if not self.cfg.classify.eval_only:
            self._check_resume(state, path)
        log.info("resuming %s: step %d, epoch %d, batch %d", path, state["step"], state["epoch"], state["batch"])
        return state

    def _check_resume(self, state: dict, path) -> None:
        saved = FinetuneConfig.from_dict(state["config"]).to_dict()
        now = self.cfg.to_dict()
        fixed = [f"{s}.{k}: {saved[s].get(k)!r} -> {now[s].get(k)!r}" for s in now for k in now[s]
                 if saved[s].get(k) != now[s].get(k) and k not in RESUME_FREE.get(s, ())
                 and k not in ckpt.RESUME_LENGTH.get(s, ())]
        if state.get("world_size", 1) != self.world:
            fixed.append(f"world_size: {state.get('world_size', 1)} -> {self.world}")
        if fixed:
            raise ValueError(f"checkpoint {path} comes from a different configuration:\n  " + "\n  ".join(fixed))

    def _build(self, resume: dict | None) -> None:
        t, c = self.cfg.train, self.cfg.classify
        seed_all(t.seed)
        self.model = Classifier(self.cfg.model, len(self.task.labels), c.mode, c.pool, c.linear_probe, c.drop_path)
        if resume is None and t.init not in (None, "none"):
            from crossmae_fast.model.classifier_init import init_classifier

            init_classifier(self.model, init_files(t.init))
        self.model.to(self.device)
        self.loader = self._loader()
        self.per_epoch = len(self.loader)
        self.schedule = schedule_for(t, self.per_epoch, t.batch_size * self.world)
        total = self.schedule.total
        groups = param_groups(self.model, t.weight_decay, c.layer_decay, c.head_lr_scale)
        self.optimizer = torch.optim.AdamW(groups, lr=self.schedule.base_lr, betas=(0.9, 0.999),
                                           capturable=self.device.type == "cuda")
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(resume["optimizer"])
            self.state.load_state_dict(resume)
            set_rng_state(self.state.rng[self.rank])
        else:
            seed_all(t.seed + self.rank)
        self.targets = self.task.train_targets.to(self.device)
        n = self.targets.shape[1]
        s = c.label_smoothing
        self.targets = self.targets * (1 - s) + s / n
        self.step = self._step()
        self.metrics = MetricsLog(self.out, total=total, per_epoch=self.per_epoch, is_main=self.main,
                                  global_batch=t.batch_size * self.world, step=self.state.step,
                                  seconds=float(self.state.metrics.get("time_s", 0.0)), tensorboard=t.tensorboard)
        self.stopper = Stopper(t.time_limit, self.world, self.device)

    def _loader(self):
        from crossmae_fast.data import make_loader

        t = self.cfg.train
        loader = make_loader(self.task.train, batch_size=t.batch_size, train=True, data_config=self.cfg.data,
                             device=self.device, rank=self.rank, world_size=self.world, seed=t.seed)
        if self.task.weights is not None:
            loader.set_weights(self.task.weights)
        if len(loader) == 0:
            raise ValueError(f"train set {self.task.train}: too few clips for one batch of {t.batch_size} x "
                             f"{self.world} processes; lower --batch-size")
        return loader

    def _step(self) -> ClassifyStep:
        net = self.model
        if self.world > 1:
            cuda = self.device.type == "cuda"
            with torch.cuda.stream(torch.cuda.Stream(self.device)) if cuda else contextlib.nullcontext():
                net = torch.nn.parallel.DistributedDataParallel(
                    self.model, device_ids=[self.device.index] if cuda else None, broadcast_buffers=False)
        if self.cfg.train.compile:
            net = torch.compile(net)
        return ClassifyStep(net, self.optimizer, self.task.loss, self.device, self.precision,
                            self.cfg.train.cuda_graph, warmup=11 if self.world > 1 else 3)

    def _announce(self) -> None:
        if not self.main:
            return
        c, t, s = self.cfg.classify, self.cfg.train, self.schedule
        log.info("finetune: %s %s%s, pool %s, %d classes (%s), init %s; %.2f M trainable parameters on %s x%d, %s; "
                 "%d steps (%d per epoch), global batch %d, lr %.3g (head x%g), warm-up %d steps; out %s",
                 self.cfg.model.preset, c.mode, " linear probe" if c.linear_probe else "", c.pool,
                 len(self.task.labels), self.task.loss, t.init, num_parameters(self.model) / 1e6, self.device,
                 self.world, self.precision, s.total, self.per_epoch, t.batch_size * self.world, s.base_lr,
                 c.head_lr_scale, s.warmup, self.out)
        settable = options.settable(FinetuneConfig, self.cfg.to_dict())
        atomic_write(self.out / "config.json", json.dumps(settable, indent=1) + "\n")

    # --- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        s = self.state
        while s.step < self.schedule.total and self.stopped is None:
            s.carry_epochs(self.per_epoch)
            self.loader.set_epoch(s.epoch, start_batch=s.batch)
            self._epoch(iter(self.loader))

    def _epoch(self, batches) -> None:
        s, c = self.state, self.cfg.classify
        while s.step < self.schedule.total and s.batch < self.per_epoch:
            batch = next_batch_keep_rng(batches)
            if batch is None:
                if not self.stopper.signal:
                    raise RuntimeError(f"data loader ended after {s.batch} of {self.per_epoch} batches")
                self.stopped = self.stopper.signal
                self.save("stop: " + self.stopped)
                return
            target = self.targets[batch["index"]]
            audio, image = batch["audio"], batch["image"]
            if c.mixup:
                g = batch_rng(self.cfg.train.seed, s.epoch, s.batch, self.rank, 2)
                audio, image, target = mixup(audio, image, target, c.mixup, g)
            self.lr = self.schedule(s.step)
            self.step.set_lr(self.lr)
            self.step(audio, image, target)
            s.step, s.batch = s.step + 1, s.batch + 1
            if self._after_step():
                return

    def _after_step(self) -> bool:
        s, t = self.state, self.cfg.train
        reason = self.stopper.check(s.step % t.log_every == 0 or s.batch == self.per_epoch)
        epoch_end = s.batch == self.per_epoch or s.step == self.schedule.total
        if epoch_end:  # a stop here still keeps the epoch's weights; only its score is skipped
            self._flush()
            self._end_of_epoch(score=reason is None)
        if reason or epoch_end or (t.save_every and s.step % t.save_every == 0):
            self.save(f"stop: {reason}" if reason else "epoch end" if epoch_end else "periodic")
        elif s.step % t.log_every == 0:
            self._flush()
        self.stopped = reason
        return reason is not None

    def _flush(self) -> None:
        record = self.metrics.flush(self.step, self.state.step, self.lr)
        if record is not None:
            self.state.metrics = record

    def _end_of_epoch(self, score: bool) -> None:
        """Score the eval set (appended to metrics.jsonl) and keep this epoch's weights for averaging."""
        epoch = self.state.step / self.per_epoch
        every = self.cfg.classify.eval_every
        if score and self.task.eval is not None and every and round(epoch) % every == 0:
            stats = self._score(frames=1)
            if self.main:
                record = {"step": self.state.step, "epoch": round(epoch, 3), "eval": _headline(stats)}
                self.metrics.append(record)
                log.info("epoch %.2f: eval %s", epoch, _format(stats))
        k = self.cfg.classify.average_last
        if self.main and k > 1:
            path = self.out / f"weights-epoch-{round(epoch * 1000):07d}.pt"
            atomic_write(path, lambda f: torch.save(self.model.state_dict(), f))
            for old in sorted(self.out.glob("weights-epoch-*.pt"))[:-k]:
                old.unlink(missing_ok=True)

    def _score(self, frames: int, missing: str | None = None, keep: bool = False) -> dict:
        index, scores = P.predict(self.model, self.task.eval, self.cfg.data, self.where,
                                  batch_size=self.cfg.train.batch_size, frames=frames, missing=missing,
                                  multi_label=self.task.multi_label, precision=self.precision)
        stats = P.score(index, scores, self.task.eval_targets, self.scorer)
        if keep:
            self.predictions = (index, scores)
        return stats

    def save(self, reason: str) -> None:
        """Flush the metrics (never save past a NaN), gather every rank's RNG state, write (rank 0)."""
        self._flush()
        self.state.rng = gather_rng()
        if self.main:
            s = dataclasses.replace(self.state)
            s.carry_epochs(self.per_epoch)
            state = {**ckpt.checkpoint_state(self.model, self.optimizer, self.cfg, self.world, s),
                     "labels": list(self.task.labels.mids)}
            path = ckpt.save_checkpoint(self.out, state, self.cfg.train.keep)
            log.info("checkpoint (%s): %s", reason, path)
        distributed.barrier()

    # --- the end ----------------------------------------------------------------------------------

    def _finish(self, evaluate_only: bool = False) -> dict:
        try:
            return self._final_scores(evaluate_only)
        finally:
            if hasattr(self, "metrics"):
                self.metrics.close()

    def _final_scores(self, evaluate_only: bool) -> dict:
        summary = {"steps": self.state.step, "stopped": self.stopped, "seconds": getattr(self, "metrics", None)
                   and self.metrics.elapsed()}
        if self.stopped is not None or self.task.eval is None:
            return summary
        k = self.cfg.classify.average_last
        if k > 1 and not evaluate_only:
            averaged = average_weights(sorted(self.out.glob("weights-epoch-*.pt"))[-k:]) if self.main else None
            self.model.load_state_dict(distributed.broadcast_object(averaged))
        c = self.cfg.classify
        result = {"final": self._score(c.eval_frames, keep=True)}
        if c.eval_missing:
            for missing in ("audio", "visual"):
                result[f"missing_{missing}"] = self._score(c.eval_frames, missing=missing)
        summary["eval"] = {k: _headline(v) for k, v in result.items()}
        if self.main:
            self._write_eval(result, k if not evaluate_only else 1)
            log.info("finished after %d steps in %s: %s", self.state.step,
                     format_eta(summary["seconds"] or 0), " | ".join(f"{k} {_format(v)}" for k, v in result.items()))
        return summary

    def _write_eval(self, result: dict, averaged: int) -> None:
        folder = self.out / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        c = self.cfg.classify
        meta = {"step": self.state.step, "mode": c.mode, "linear_probe": c.linear_probe, "init": self.cfg.train.init,
                "eval_frames": c.eval_frames, "averaged_epochs": averaged, "loss": self.task.loss,
                "seed": self.cfg.train.seed, "train_clips": len(self.task.train_targets),
                "eval_clips": len(self.task.eval_targets)}
        body = {**meta, **{k: _headline(v) for k, v in result.items()}}
        atomic_write(folder / "metrics.json", json.dumps(body, indent=1) + "\n")
        final, labels = result["final"], self.task.labels
        rows = zip(labels.mids, labels.names, final["per_class_ap"], final["per_class_auc"])
        lines = ["index,mid,display_name,ap,auc"] + [
            f"{i},{m},\"{n}\",{ap:.6f},{auc:.6f}" for i, (m, n, ap, auc) in enumerate(rows)]
        atomic_write(folder / "per_class.csv", "\n".join(lines) + "\n")
        P.save_predictions(folder, self.task.eval_ids, *self.predictions, self.task.eval_targets)
        self.metrics.append({"step": self.state.step, "final": body})


def evaluation_config(saved: FinetuneConfig, given: FinetuneConfig) -> FinetuneConfig:
    """A fine-tuned run's config with what `--eval-only` may choose taken from `given`: the eval set,
    frames, missing modalities, and where and how it runs."""
    c, t, d = given.classify, given.train, given.data
    return dataclasses.replace(
        saved,
        classify=dataclasses.replace(saved.classify, eval_data=c.eval_data or saved.classify.eval_data,
                                     eval_frames=c.eval_frames, eval_missing=c.eval_missing, eval_only=True),
        train=dataclasses.replace(saved.train, out=t.out, resume=t.resume, device=t.device, precision=t.precision,
                                  threads=t.threads, batch_size=t.batch_size),
        data=dataclasses.replace(saved.data, loader=d.loader, workers=d.workers))


def init_files(init: str) -> list[Path]:
    """The files an `--init` names: a run folder's latest checkpoint (else its exported encoders), a file,
    or files joined by ','."""
    paths = [Path(p) for p in init.split(",")]
    if len(paths) == 1 and paths[0].is_dir():
        found = ckpt.latest_checkpoint(paths[0])
        if found:
            return [found]
        exported = [paths[0] / f"encoder_{m}.pth" for m in ("audio", "image")]
        if any(p.is_file() for p in exported):
            return [p for p in exported if p.is_file()]
        raise FileNotFoundError(f"--init {init}: no checkpoint or encoder_*.pth in that folder")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"--init {p}: no such file or folder")
    return paths


def average_weights(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts (CAV-MAE's weight averaging); integer buffers from the last."""
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    out = {}
    for k, v in states[-1].items():
        out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
    return out


def _headline(stats: dict) -> dict:
    return {k: stats[k] for k in ("mAP", "mAUC", "d_prime", "acc", "samples", "classes_without_positives")}


def _format(stats: dict) -> str:
    return f"acc {stats['acc']:.4f} mAP {stats['mAP']:.4f} mAUC {stats['mAUC']:.4f} d' {stats['d_prime']:.3f}"
