"""`python -m crossmae_fast.evaluate`: retrieval and localization of a checkpoint.

    python -m crossmae_fast.evaluate --checkpoint PATH --data MANIFEST [--out DIR] [--pictures K]
        [--probe-data TRAIN_MANIFEST [--probe-steps N] [--probe-seeds S ...]]

`--checkpoint` is a checkpoint file or a run folder (its latest checkpoint). Prints the retrieval and
localization tables and writes `metrics.json` and pictures into `--out`, by default the `eval/`
folder of the run the checkpoint belongs to. The data settings (the fbank normalisation included)
are the run's, as its checkpoint records them; the data options given here override them.
`--probe-data` adds the localization probe (crossmae_fast/eval/probe.py), trained on that manifest,
one per `--probe-seeds`. The options are generated from `EvalConfig` (crossmae_fast/config.py); the
evaluation itself is `crossmae_fast.eval.evaluator`.

Exit status: 0 done, 2 bad input (checkpoint, manifest, options, an `--out` another process is writing
or that cannot be written).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from crossmae_fast import options
from crossmae_fast.config import EvalConfig, EvaluateConfig
from crossmae_fast.files import error_line

DATA_OPTIONS = ("loader", "workers", "video", "audio_mean", "audio_std")
"""The data settings an evaluation may change; the others are the run's (they shape the model's input)."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crossmae_fast.evaluate", argument_default=argparse.SUPPRESS,
                                 description="Retrieval and sound-source localization of a checkpoint.")
    ap.add_argument("--config", metavar="FILE", help="YAML or JSON file of options; the command line overrides it")
    options.add_options(ap.add_argument_group("evaluation options"), EvaluateConfig, sections=("eval",))
    skip = [f.name for f in dataclasses.fields(EvaluateConfig().data) if f.name not in DATA_OPTIONS]
    options.add_options(ap.add_argument_group("data options (default: the run's)"), EvaluateConfig,
                        sections=("data",), skip=skip)
    return ap


def parse_args(argv: list[str] | None) -> tuple[EvalConfig, dict]:
    """(the evaluation's config, the data options given): defaults <- config file <- command line."""
    ap = build_parser()
    ns = vars(ap.parse_args(argv))
    try:
        values = options.merge(options.read_file(ns["config"], EvaluateConfig) if "config" in ns else {},
                               options.from_namespace(ns, EvaluateConfig))
        unknown = sorted(set(values.get("data", {})) - set(DATA_OPTIONS))
        if unknown:
            raise ValueError(f"data option(s) {', '.join(unknown)} are the run's and cannot change here")
        cfg = EvalConfig(**values.get("eval", {}))
    except (ValueError, TypeError, OSError) as e:
        ap.error(str(e))
    for name in ("checkpoint", "data"):
        if getattr(cfg, name) is None:
            ap.error(f"--{name} is required")
    return cfg, values.get("data", {})


def default_out(checkpoint: str | Path) -> Path:
    """`eval/` inside the run: a run folder's own, or the folder holding a checkpoint file."""
    path = Path(checkpoint)
    return (path if path.is_dir() else path.parent) / "eval"


def main(argv: list[str] | None = None) -> int:
    cfg, data_overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from crossmae_fast.components.checkpoint import checkpoint_data_config, model_from_checkpoint
    from crossmae_fast.components.distributed import pick_device
    from crossmae_fast.components.run_lock import RunFolderBusy
    from crossmae_fast.data.manifest import read_manifest
    from crossmae_fast.eval.evaluator import evaluate
    from crossmae_fast.eval.report import format_tables

    try:  # bad inputs: one line naming the file, not a traceback
        model = model_from_checkpoint(cfg.checkpoint, device=pick_device(0, cfg.device))
        for manifest in (cfg.data, cfg.probe_data):
            if manifest and not read_manifest(manifest):
                raise ValueError(f"{manifest}: the manifest has no rows")
        data = dataclasses.replace(checkpoint_data_config(cfg.checkpoint), **data_overrides)
    except (ValueError, OSError) as e:
        print(f"evaluate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    cfg = dataclasses.replace(cfg, out=cfg.out or str(default_out(cfg.checkpoint)))
    try:
        result = evaluate(model, cfg.data, cfg, data)
    except RunFolderBusy as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out cannot be written
        print(f"evaluate: error: {error_line(e)}", file=sys.stderr)
        return 2
    print(format_tables(result))
    print(f"\nwrote {Path(cfg.out) / 'metrics.json'} and {len(result.get('pictures', []))} pictures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
