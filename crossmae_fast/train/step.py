"""Pre-training recipe (docs/design.md section 4): `TrainConfig`, AdamW parameter groups, the learning-rate
schedule and `TrainStep`, one optimisation step that runs as a single CUDA graph on GPUs.

`TrainStep` never reads a value back to the host: the learning rate is a device tensor written
between steps and the loss terms accumulate in a device tensor that `read()` fetches (one sync) every
few steps, which is also where a NaN or Inf shows up.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from crossmae_fast.config import ATTENTIVE_TOKENS, OPS, PRESETS, QUERIES, VARIANTS

log = logging.getLogger("crossmae_fast.train")

LOADERS = ("dali", "torch")
PRECISIONS = ("auto", "bf16", "fp32")
PAPER_BLR, TINY_BLR = 1.5e-4, 1.5e-3
NO_DECAY = ("cls_token", "mask_token", "queries", "pos_embed")
"""Parameter names (last component) kept out of weight decay besides biases and 1-D weights (MAE)."""


def _opt(help: str, default, choices: tuple[str, ...] | None = None):
    """A config field with its `--help` text (and allowed values), from which the CLI is generated."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Everything a pre-training run depends on. The CLI flags are generated from these fields
    (`--batch-size` for `batch_size`), and a YAML/JSON file may set any of them."""

    data: str | None = _opt("train manifest (CAV-MAE JSON); default: a cached synthetic set", default=None)
    eval_data: str | None = _opt("evaluation manifest for the final summary; default: the synthetic "
                                 "set's eval.json (none with --data unless given)", default=None)
    preset: str = _opt("model size", default="tiny", choices=tuple(PRESETS))
    variant: str = _opt("loss terms (paper Table 2)", default="crossmae", choices=tuple(VARIANTS))
    attentive_tokens: str = _opt("Attentive Tokens ablation (Table 6)", default="topk", choices=ATTENTIVE_TOKENS)
    queries: str = _opt("Learnable Queries ablation (Table 7)", default="learnable", choices=QUERIES)
    batch_size: int = _opt("samples per process and step", default=32)
    epochs: float = _opt("training length in epochs of the train manifest", default=24.0)
    steps: int | None = _opt("training length in optimisation steps; overrides --epochs", default=None)
    blr: float | None = _opt("base learning rate; lr = blr * global batch / 256 (default: 1.5e-4, the paper's; "
                             "1.5e-3 for the tiny preset, whose short CPU runs learn little at 1.5e-4)", default=None)
    lr: float | None = _opt("absolute learning rate; overrides --blr", default=None)
    min_lr: float = _opt("learning rate at the end of the cosine", default=0.0)
    warmup: str = _opt("linear warm-up: N steps ('500'), epochs ('2ep') or a share of the run ('5%')",
                       default="5%")
    weight_decay: float = _opt("AdamW weight decay (not on biases, norms, tokens, queries)", default=0.05)
    out: str = _opt("output folder: checkpoints, metrics.jsonl, encoders, evaluation", default="runs/pretrain")
    resume: str | None = _opt("'auto' (latest checkpoint in --out, else start fresh) or a checkpoint path",
                              default=None)
    loader: str = _opt("data loader: DALI (GPU or CPU; the torch loader where DALI is missing) or the torch "
                       "DataLoader", default="dali", choices=LOADERS)
    ops: str = _opt("token ops: fused Triton kernels or pure-torch references", default="auto", choices=OPS)
    cuda_graph: bool = _opt("capture the train step in one CUDA graph (CUDA only)", default=True)
    compile: bool = _opt("torch.compile the model", default=False)
    precision: str = _opt("autocast dtype; auto = bf16 on CUDA, fp32 on the CPU", default="auto",
                          choices=PRECISIONS)
    init: str | None = _opt("ImageNet MAE / timm ViT checkpoint for both encoders", default=None)
    seed: int = _opt("random seed (model init, masking, data order)", default=0)
    log_every: int = _opt("steps between progress lines / metrics records (one host sync each)", default=10)
    save_every: int = _opt("steps between checkpoints (0: only at the end)", default=50)
    keep: int = _opt("checkpoints kept (the newest)", default=2)
    video: bool = _opt("decode the frame from each row's \"video\" file where it has one (else its JPEGs)",
                       default=False)
    workers: int = _opt("data loader workers (DALI threads)", default=2)
    threads: int = _opt("torch CPU threads; 0 = torch's default, or 1 on a busy machine", default=0)
    device: str = _opt("'auto' (CUDA if available), 'cpu', 'cuda'", default="auto")
    time_limit: float | None = _opt("minutes after which the run saves a checkpoint and stops (resume "
                                    "continues it)", default=None)
    export_encoders: bool = _opt("write timm state dicts encoder_audio.pth / encoder_image.pth at the end",
                                 default=True)
    eval_pictures: int = _opt("pictures drawn by the final evaluation (each takes seconds on a CPU)", default=2)
    synth_clips: int = _opt("clips of the default synthetic set (a quarter go to eval.json)", default=256)
    synth_seconds: float = _opt("audio seconds per synthetic clip", default=3.0)

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every", "keep", "synth_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must be at least 1")
        for name in ("save_every", "workers", "threads", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must not be negative")
        for name in ("epochs", "synth_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must be positive")
        for name in ("steps", "blr", "lr", "time_limit"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must be positive")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"--weight-decay={self.weight_decay} must lie in [0, 1)")
        if not re.fullmatch(r"\d+|\d+(\.\d*)?(ep|%)", str(self.warmup)):
            raise ValueError(f"--warmup={self.warmup!r}: expected steps ('500'), epochs ('2ep') or a share ('5%')")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device={self.device!r} is not 'auto', 'cpu' or 'cuda[:N]'")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{_flag(f.name)}={getattr(self, f.name)!r} is not one of {', '.join(choices)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.steps if self.steps is not None else max(1, round(self.epochs * steps_per_epoch))

    def warmup_steps(self, total: int, steps_per_epoch: int) -> int:
        w = str(self.warmup)
        if w.endswith("%"):
            n = float(w[:-1]) / 100 * total
        elif w.endswith("ep"):
            n = float(w[:-2]) * steps_per_epoch
        else:
            n = int(w)
        return min(total, round(n))

    def base_lr(self, global_batch: int) -> float:
        if self.lr is not None:
            return self.lr
        blr = self.blr if self.blr is not None else TINY_BLR if self.preset == "tiny" else PAPER_BLR
        return blr * global_batch / 256


RESUME_FREE = frozenset({
    "eval_data", "out", "resume", "loader", "ops", "cuda_graph", "compile", "init", "log_every", "save_every",
    "keep", "video", "workers", "threads", "device", "time_limit", "export_encoders", "eval_pictures",
})
"""TrainConfig fields a resumed run may change: they do not alter the sequence of updates."""
RESUME_LENGTH = frozenset({"epochs", "steps"})
"""Fields a resumed run may change with a warning: the cosine is recomputed for the new length."""


def _flag(name: str) -> str:
    return name.replace("_", "-")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """MAE's two AdamW groups: no decay on biases, 1-D weights (norms), CLS / mask tokens, queries."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in NO_DECAY
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); `capturable` on CUDA so its step can live inside a CUDA graph."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.95),
                             capturable=device.type == "cuda")


def lr_at(step: int, base_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Per-iteration linear warm-up from 0, then a half-cycle cosine to `min_lr` (MAE's schedule)."""
    if step < warmup:
        return base_lr * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


class TrainStep:
    """Forward, backward and AdamW update of `model` (plain, DDP-wrapped or compiled) on one batch.

    With `cuda_graph` on a CUDA device the first `warmup` calls run eagerly on a side stream (they
    are real steps; autotuning and optimizer-state allocation happen there), the next one captures
    the whole step into a CUDA graph, and every later call copies its inputs into the static buffers
    and replays. Gradients stay allocated (zeroed in place), so their addresses never change. Masking
    noise is drawn inside the step (graph-safe Philox) unless the caller passes it explicitly.
    Where capture fails, the step runs eagerly and says so once.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, terms, device: torch.device,
                 precision: str = "fp32", cuda_graph: bool = True, warmup: int = 3):
        self.model, self.opt, self.device = model, optimizer, torch.device(device)
        self.keys = ("loss", *sorted(terms))
        self.amp_dtype = torch.bfloat16 if precision == "bf16" else None
        self.sums = torch.zeros(len(self.keys), device=self.device, dtype=torch.float32)
        self.count = 0
        self.lr = None
        if self.device.type == "cuda":  # capturable AdamW reads the lr from this tensor every step
            self.lr = torch.zeros((), device=self.device, dtype=torch.float32)
            self.bind_lr()
        self.want_graph = cuda_graph and self.device.type == "cuda"
        self.warmup, self.calls = warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor | None, ...] | None = None
        self.mode = "eager"
        if not self.want_graph:
            log.info("train step: eager (%s)", "CUDA graph disabled" if self.device.type == "cuda"
                     else f"no CUDA graphs on {self.device.type}")

    def bind_lr(self) -> None:
        """Point every parameter group at the lr tensor (again after `optimizer.load_state_dict`)."""
        if self.lr is not None:
            for g in self.opt.param_groups:
                g["lr"] = self.lr

    def set_lr(self, value: float) -> None:
        if self.lr is not None:
            self.lr.fill_(value)  # a host-to-device write, no sync
        else:
            for g in self.opt.param_groups:
                g["lr"] = value

    def _step(self, audio, image, noise_audio=None, noise_image=None) -> None:
        # no autocast weight cache: cached casts would outlive a captured graph's memory pool
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            out = self.model(audio, image, noise_audio=noise_audio, noise_image=noise_image)
        out["loss"].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        self.sums += torch.stack([out[k].detach().float() for k in self.keys])

    def __call__(self, audio: torch.Tensor, image: torch.Tensor, noise_audio: torch.Tensor | None = None,
                 noise_image: torch.Tensor | None = None) -> None:
        inputs = (audio, image, noise_audio, noise_image)
        self.count += 1
        self.calls += 1
        if self.graph is not None:
            if any((a is None) != (s is None) or (a is not None and a.shape != s.shape)
                   for a, s in zip(inputs, self.static)):
                raise ValueError("train step: a CUDA-graph step needs inputs of the captured shapes "
                                 "(use drop_last batches)")
            for s, a in zip(self.static, inputs):
                if s is not None:
                    s.copy_(a, non_blocking=True)
            self.graph.replay()
            return
        if not self.want_graph:
            self._step(*inputs)
            return
        if self.calls <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step(*inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        self._capture(inputs)

    def _capture(self, inputs) -> None:
        self.static = tuple(None if a is None else a.clone() for a in inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(self.device)
            # thread_local: loader threads (DALI, pinning) may keep using CUDA during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._step(*self.static)
        except Exception as e:  # an op that cannot be captured: fall back for the rest of the run
            self.want_graph, self.static = False, None
            log.warning("train step: CUDA graph capture failed (%s: %s); running eagerly", type(e).__name__, e)
            torch.cuda.synchronize(self.device)
            self._step(*inputs)
            return
        self.graph, self.mode = graph, "cuda-graph"
        log.info("train step: captured in one CUDA graph after %d warm-up steps", self.warmup)
        self.graph.replay()

    def read(self) -> dict[str, float]:
        """Mean of each loss term since the last read (over steps, and over ranks under DDP); one sync."""
        sums = self.sums.clone()
        n = torch.tensor([float(self.count)], device=self.device)
        if dist.is_available() and dist.is_initialized():
            both = torch.cat([sums, n])
            dist.all_reduce(both)
            sums, n = both[:-1], both[-1:]
        self.sums.zero_()
        self.count = 0
        values = (sums / n.clamp(min=1)).tolist()
        return dict(zip(self.keys, values))
