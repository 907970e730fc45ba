"""Pre-train CrossMAE: `python -m crossmae_fast.pretrain [options]` (one process) or
`torchrun --nproc_per_node N -m crossmae_fast.pretrain [options]` (DDP).

With no options it generates (once; cached under ~/.cache/crossmae_fast or $CROSSMAE_CACHE) a small
synthetic audio-visual set, trains the `tiny` preset on the best device there is, writes
checkpoints, `metrics.jsonl` and timm encoder weights to `runs/pretrain`, and ends with the
retrieval / localization summary on the set's eval split. `--resume auto` continues a run exactly.

Every field of the run's config (`crossmae_fast.config.RunConfig`: model, data, train, eval) is an
option; `--config FILE` reads the same names from YAML or JSON, flat or nested by section.

Exit status: 0 finished (or already complete), 1 a loss became NaN/Inf, 2 bad input (options, data, a
checkpoint, a run folder another process holds, an output that cannot be written), 3 stopped early by
`--time-limit` (or another DDP rank's stop), 128+n stopped by signal n (SIGINT 130, SIGTERM 143) once
its checkpoint is written; after a stop the last line is the command that continues the run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from crossmae_fast import options
from crossmae_fast.components import distributed
from crossmae_fast.components.stopping import run_exit_status
from crossmae_fast.config import EvalConfig, RunConfig, run_config
from crossmae_fast.train.trainer import Trainer, Validator

log = logging.getLogger("crossmae_fast.pretrain")


def build_parser() -> argparse.ArgumentParser:
    """One option per `RunConfig` field, plus `--config`. Options not given keep the config file's
    value, else the preset's or the dataclass default (argument_default=SUPPRESS tells them apart)."""
    ap = argparse.ArgumentParser(
        prog="python -m crossmae_fast.pretrain", argument_default=argparse.SUPPRESS,
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        epilog="Multi-GPU / multi-node: torchrun --nproc_per_node N -m crossmae_fast.pretrain ...; "
               "--batch-size is per process. Defaults shown are the tiny preset's.",
    )
    ap.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flat, or nested by section: "
                    "model, data, train, eval); options given on the command line override it")
    defaults = run_config().to_dict()
    for section in ("model", "data", "train", "eval"):
        group = ap.add_argument_group(f"{section} options")
        options.add_options(group, RunConfig, sections=(section,), defaults=defaults)
    return ap


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """RunConfig from defaults <- preset <- config file <- command line; a bad value exits with an
    argparse error naming it."""
    ap = build_parser()
    ns = vars(ap.parse_args(argv))
    try:
        given = options.from_namespace(ns, RunConfig)
        from_file = options.read_file(ns["config"], RunConfig) if "config" in ns else {}
        if "epochs" in given.get("train", {}) and "steps" not in given.get("train", {}):
            from_file.get("train", {}).pop("steps", None)  # --epochs on the command line beats the file's steps
        return run_config(options.merge(from_file, given))
    except (ValueError, TypeError, OSError) as e:
        ap.error(str(e))


def make_validator(cfg: RunConfig) -> Validator:
    """The evaluation that ends a complete run: `evaluate()` with the run's data settings, batch size and
    seed, its pictures and metrics.json in OUT/eval, its tables logged."""
    from crossmae_fast.eval import evaluator, report

    eval_cfg = EvalConfig(out=str(Path(cfg.train.out) / "eval"), pictures=cfg.eval.eval_pictures,
                          batch_size=cfg.train.batch_size, seed=cfg.train.seed)

    def validate(model, manifest) -> dict:
        result = evaluator.evaluate(model, manifest, eval_cfg, cfg.data)
        log.info("evaluation on %s:\n%s", manifest, report.format_tables(result))
        return result

    return validate


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    distributed.log_to_stdout()
    return run_exit_status("pretrain", "crossmae_fast.pretrain", argv,
                           lambda: Trainer(cfg, make_validator(cfg)).fit())


if __name__ == "__main__":
    sys.exit(main())
