"""Learning check: does what this toolkit trains learn, beyond its controls?

    python -m crossmae_fast.learning_check [--out DIR] [--steps N] [--seeds 0 1] [--random-inits 3]
        [--jobs 2] [--report PREFIX]

Trains `crossmae` and `cl-av` once per training seed (`python -m crossmae_fast.pretrain` subprocesses,
`--jobs` at a time, the tiny recipe but `--steps` 1000) on a cached 2048-clip synthetic set, evaluates
them and `--random-inits` randomly initialised controls alike (retrieval, zero-shot map and probe, each
with its controls), and writes `results.json` / `results.md` (and `PREFIX.*` with `--report`). The
targets are retrieval only (R@10 >= 3x chance both ways, both variants, every seed); localization is
reported, not judged: the zero-shot map and the probe over `--probe-seeds` (mean, standard deviation,
each seed) with the random inits beside each trained model (docs/design.md says why). The training runs:
crossmae_fast/eval/learning_runs.py; the targets, the evaluation of the models and the table:
crossmae_fast/eval/report.py. Exit status 0 whatever the verdict (it is data), 2 when a step fails.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from crossmae_fast.config import LOADERS, EvalConfig, run_config
from crossmae_fast.files import atomic_write, error_line


def build_parser() -> argparse.ArgumentParser:
    defaults = run_config()
    ap = argparse.ArgumentParser(prog="python -m crossmae_fast.learning_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/learning_check", help="output folder")
    ap.add_argument("--steps", type=int, default=1000, help="optimisation steps per training run (default 1000)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    ap.add_argument("--batch-size", type=int, default=defaults.train.batch_size, help="samples per training step")
    ap.add_argument("--random-inits", type=int, default=3, help="randomly initialised control models (default 3)")
    ap.add_argument("--probe-seeds", type=int, nargs="+", default=list(EvalConfig().probe_seeds),
                    help="probe seeds: localization is reported as their mean, standard deviation and each (default "
                    "0 1 2 3 4)")
    ap.add_argument("--probe-steps", type=int, default=300, help="probe training steps (default 300)")
    ap.add_argument("--clips", type=int, default=2048, help="synthetic clips (default 2048)")
    ap.add_argument("--eval-clips", type=int, default=256, help="of which held out for evaluation (default 256)")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (default 2)")
    ap.add_argument("--loader", choices=LOADERS, default=defaults.data.loader, help="data loader")
    ap.add_argument("--workers", type=int, default=defaults.data.workers, help="data loader workers per run")
    ap.add_argument("--report", help="also write PREFIX.json and PREFIX.md (e.g. benchmarks/results/learning_check)")
    ap.add_argument("--extra", default="", help="more pretrain options for every training run, one string")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return run(a, argv)
    except OSError as e:  # an output that cannot be written (permissions, read-only, a full disk)
        print(f"learning_check: error: {error_line(e)}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace, argv: list[str] | None) -> int:
    """The learning check of the parsed options `a` (`argv`: as given, for the report's command line)."""
    import torch

    from crossmae_fast.data.synthetic import cached_synthetic_set
    from crossmae_fast.eval import learning_runs
    from crossmae_fast.eval.report import THRESHOLDS, evaluate_models, learning_check_markdown, learning_check_targets

    if not 0 < a.eval_clips < a.clips:
        print(f"learning_check: error: --eval-clips {a.eval_clips} must lie in (0, --clips {a.clips})", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    out, t0 = Path(a.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tiny = run_config()  # the default run's synthetic-set settings
    paths = cached_synthetic_set(a.clips, seed=0, seconds=tiny.train.synth_seconds, image_size=tiny.model.image_size,
                                 eval_fraction=a.eval_clips / a.clips)
    try:
        jobs, seconds = learning_runs.train_all(a, paths["train"], out)
    except (RuntimeError, OSError) as e:
        print(f"learning_check: error: {e}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    cfg = EvalConfig(batch_size=64, probe_data=str(paths["train"]), probe_steps=a.probe_steps,
                     probe_seeds=tuple(a.probe_seeds), pictures=0)
    runs = {name: (variant, run_dir) for name, (variant, run_dir, _) in jobs.items()}
    runs.update({f"random {k}": ("crossmae", None) for k in range(a.random_inits)})
    models = evaluate_models(runs, paths, cfg, loader=a.loader, workers=a.workers)
    for name, m in models.items():
        m.update(steps=0 if m["random_init"] else a.steps, train_seconds=seconds.get(name, 0.0),
                 pretrain_command=shlex.join(["python", *jobs[name][2][1:]]) if name in jobs else None)
    argv_shown = sys.argv[1:] if argv is None else argv
    results = {"command": shlex.join(["python", "-m", "crossmae_fast.learning_check", *argv_shown]), "args": vars(a),
               "synth": {k: str(v) for k, v in paths.items()}, "thresholds": THRESHOLDS, "models": models,
               "targets": learning_check_targets(models), "wall_seconds": time.perf_counter() - t0,
               "train_wall_seconds": t1 - t0, "eval_wall_seconds": time.perf_counter() - t1,
               "host": learning_runs.host_line()}
    table = learning_check_markdown(results)
    for prefix in [out / "results"] + ([Path(a.report)] if a.report else []):
        prefix.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(prefix.with_suffix(".json"), json.dumps(results, indent=1, default=str) + "\n")
        atomic_write(prefix.with_suffix(".md"), "# Learning check: tiny preset on the synthetic set\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
