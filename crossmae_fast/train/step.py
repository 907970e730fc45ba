"""Pre-training recipe (docs/design.md section 4): AdamW parameter groups and `TrainStep`, one
optimisation step that runs as a single CUDA graph on GPUs (the schedule: components/lr_schedule.py).

`TrainStep` never reads a value back to the host: the learning rate is a device tensor written
between steps and the loss terms accumulate in a device tensor that `read()` fetches (one sync) every
few steps, which is also where a NaN or Inf shows up.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from crossmae_fast.config import TrainConfig

log = logging.getLogger("crossmae_fast.train")

NO_DECAY = ("cls_token", "mask_token", "queries", "pos_embed")
"""Parameter names (last component) kept out of weight decay besides biases and 1-D weights (MAE)."""


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


class TrainStep:
    """Forward, backward and AdamW update of `model` (plain, DDP-wrapped or compiled) on one batch.

    With `cuda_graph` on a CUDA device the first `warmup` calls run eagerly on a side stream (they
    are real steps; autotuning and optimizer-state allocation happen there), the next one captures
    the whole step into a CUDA graph, and every later call copies its inputs into the static buffers
    and replays. Gradients stay allocated (zeroed in place), so their addresses never change. Masking
    noise is drawn inside the step (graph-safe Philox) unless the caller passes it explicitly.

    Where capture fails, the parameters, gradients, optimizer state, loss sums and RNG states are put
    back as they were before the attempt, the step runs eagerly, and says so once. `capture(fn)`
    replaces the CUDA-graph capture (it returns an object with `replay()`): with it, the same warm-up,
    capture and fallback logic runs on any device, which is how the CPU tests exercise it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, terms, device: torch.device,
                 precision: str = "fp32", cuda_graph: bool = True, warmup: int = 3,
                 capture: Callable[[Callable[[], None]], object] | None = None):
        self.model, self.opt, self.device = model, optimizer, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.keys = ("loss", *sorted(terms))
        self.amp_dtype = torch.bfloat16 if precision == "bf16" else None
        self.sums = torch.zeros(len(self.keys), device=self.device, dtype=torch.float32)
        self.count = 0
        self.lr = None
        if self.cuda:  # capturable AdamW reads the lr from this tensor every step
            self.lr = torch.zeros((), device=self.device, dtype=torch.float32)
            self.bind_lr()
        self.capture = capture or (self._cuda_graph if self.cuda else None)
        self.want_graph = cuda_graph and self.capture is not None
        self.warmup, self.calls = warmup, 0
        self.graph = None
        self.static: tuple[torch.Tensor | None, ...] | None = None
        self.side_stream: torch.cuda.Stream | None = None  # one for the step's life, made at the first warm-up
        self.mode = "eager"
        if not self.want_graph:
            log.info("train step: eager (%s)", "CUDA graph disabled" if self.cuda
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
            with self._on_side_stream():
                self._step(*inputs)
            return
        self._capture(inputs)

    @contextlib.contextmanager
    def _on_side_stream(self):
        """Warm-up steps run on a side stream (as capture needs), ordered after and before the main one."""
        if not self.cuda:
            yield
            return
        main = torch.cuda.current_stream(self.device)
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(self.device)
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            yield
        main.wait_stream(self.side_stream)

    def _cuda_graph(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        # thread_local: loader threads (DALI, pinning) may keep using CUDA during the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
        return graph

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _capture(self, inputs) -> None:
        self.static = tuple(None if a is None else a.clone() for a in inputs)
        self._sync()
        saved = self._snapshot()
        try:
            graph = self.capture(lambda: self._step(*self.static))
        except Exception as e:  # an op that cannot be captured: fall back for the rest of the run
            self.want_graph, self.static = False, None
            log.warning("train step: CUDA graph capture failed (%s: %s); running eagerly", type(e).__name__, e)
            self._sync()
            self._restore(saved)
            self._step(*inputs)
            return
        self.graph, self.mode = graph, "cuda-graph"
        log.info("train step: captured in one CUDA graph after %d warm-up steps", self.warmup)
        self.graph.replay()

    def _snapshot(self) -> dict:
        """Host copies of everything a step changes (a capture attempt may have changed part of it)."""
        def host(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True)

        params = [p for g in self.opt.param_groups for p in g["params"]]
        return {
            "tensors": [(t, host(t)) for t in [*self.model.parameters(), *self.model.buffers(), self.sums]],
            "grads": [(p, None if p.grad is None else host(p.grad)) for p in self.model.parameters()],
            "opt": {p: {k: host(v) if torch.is_tensor(v) else v for k, v in self.opt.state[p].items()}
                    for p in params if p in self.opt.state},
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.cuda else None,
        }

    @torch.no_grad()
    def _restore(self, saved: dict) -> None:
        """Undo a failed capture in place (tensors keep their addresses): state as before the attempt."""
        for t, v in saved["tensors"]:
            t.copy_(v)
        for p, g in saved["grads"]:
            if g is None:
                p.grad = None
            elif p.grad is None:
                p.grad = g.to(p.device)
            else:
                p.grad.copy_(g)
        for p in [p for p in self.opt.state if p not in saved["opt"]]:
            del self.opt.state[p]
        for p, state in saved["opt"].items():
            for k, v in state.items():
                if torch.is_tensor(v) and torch.is_tensor(self.opt.state[p].get(k)):
                    self.opt.state[p][k].copy_(v)
                else:
                    self.opt.state[p][k] = v
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)

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
