"""When a run stops early: SIGINT / SIGTERM, a time limit, and, under DDP, the ranks agreeing to stop
at the same step (a checkpoint needs every rank at the same place); and how a run's end becomes its tool's
exit status."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from crossmae_fast.components import distributed
from crossmae_fast.components.metrics_log import NonFiniteLoss
from crossmae_fast.files import error_line

log = logging.getLogger(__name__)


class Stopper:
    """A context that catches SIGINT / SIGTERM (a second Ctrl-C raises KeyboardInterrupt at once) and
    answers, between steps, whether the run stops now and why."""

    def __init__(self, time_limit_min: float | None = None, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.deadline = time.perf_counter() + time_limit_min * 60 if time_limit_min else None
        self.world_size, self.device = world_size, torch.device(device)
        self.signal: str | None = None
        self._old: dict = {}

    def __enter__(self) -> Stopper:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signal.Signals(signum).name

    def local_reason(self) -> str | None:
        """Why this process wants to stop (a signal, the time limit), or None."""
        if self.signal:
            return self.signal
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return "time limit"
        return None

    def check(self, at_log: bool) -> str | None:
        """The reason to stop after this step, or None. Under DDP the ranks decide together, at log
        steps only (one tiny all-reduce each): all stop there if any rank wants to."""
        reason = self.local_reason()
        if self.world_size == 1:
            return reason
        if not at_log or not distributed.any_true(reason is not None, self.device):
            return None
        return reason or "stop on another rank"


STOPPED_EARLY = 3
"""Exit status of a run stopped by its time limit (or by another rank): resume it."""


def exit_status(stopped: str | None) -> int:
    """0 for a finished run, 128 + n for a stop by signal n (the shells' convention), else 3."""
    if stopped is None:
        return 0
    try:
        return 128 + signal.Signals[stopped].value
    except KeyError:
        return STOPPED_EARLY


def continue_command(module: str, argv: list[str]) -> str:
    """The command line that continues a run of the tool `module`: the same options with `--resume auto`."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    head = ["torchrun", "...", "-m"] if world > 1 else ["python", "-m"]
    return shlex.join([*head, module, *args, "--resume", "auto"])


def run_exit_status(tool: str, module: str, argv: list[str], fit: Callable[[], dict | None]) -> int:
    """Run `fit` (a training or fine-tuning run) and return its tool's exit status: 0 done, 1 a non-finite
    loss, 2 bad input or an output that cannot be written (one line), 3 / 128 + n stopped early, the last
    line then saying how to continue."""
    try:
        summary = fit()
    except NonFiniteLoss as e:
        log.error("%s", e)
        return 1
    except (ValueError, FileNotFoundError) as e:  # bad configuration, data, labels, checkpoint, a busy folder
        log.error("%s: error: %s", tool, str(e).replace(str(Path.cwd()) + os.sep, ""))
        log.debug("traceback", exc_info=True)
        return 2
    except OSError as e:  # an output that cannot be written (permissions, read-only, a full disk)
        log.error("%s: error: %s", tool, error_line(e))
        log.debug("traceback", exc_info=True)
        return 2
    finally:
        distributed.cleanup()
    if not summary:
        return 1
    status = exit_status(summary.get("stopped"))
    if status:
        where = f", checkpoint {summary['checkpoint']}" if summary.get("checkpoint") else ""
        log.info("stopped (%s) at step %d%s; continue with: %s", summary["stopped"], summary["steps"], where,
                 continue_command(module, argv))
    return status
