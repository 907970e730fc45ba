"""Learning check: does what this toolkit trains learn, beyond its controls?

    python -m crossmae_fast.learning_check [--out DIR] [--steps N] [--seeds 0 1] [--random-inits 3]
        [--jobs 2] [--report PREFIX]

1. A synthetic set (cached; 2048 clips, 256 held out for evaluation), larger than the default run's
   so that 1000 steps do not over-fit it.
2. `python -m crossmae_fast.pretrain` trains `crossmae` and `cl-av` once per training seed, as
   subprocesses (`--jobs` at a time, one torch thread each), with the tiny preset's recipe but
   `--steps` (default 1000) instead of its 300.
3. Every trained model and `--random-inits` randomly initialised ones (the control) are evaluated
   the same way (`crossmae_fast.eval.evaluator.evaluate`): retrieval R@1/5/10 both ways, the
   zero-shot localization map, and the localization probe (one per probe seed), each map with its
   controls: uniform-map cIoU, selection accuracy and its chance level, cIoU against a non-sounding
   object's box, and the map from a mismatched clip's audio.

Targets (every training seed must pass): retrieval R@10 at least 3x chance in both directions, for
`crossmae` and for `cl-av`; `crossmae`'s probe selection accuracy (mean over probe seeds) at least 0.6
and at least the best random init's + 0.10, with the mismatched-audio selection within 0.1 of chance.
Writes `results.json` / `results.md` into `--out` (and `PREFIX.json` / `PREFIX.md` with `--report`):
the models side by side and PASS/FAIL per target. Exit status 0 whatever the verdict (it is data),
2 when a step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RETRIEVAL_FACTOR = 3.0
PROBE_MIN = 0.6
PROBE_MARGIN = 0.10
MISMATCH_TOLERANCE = 0.10
VARIANTS = ("crossmae", "cl-av")


def run_logged(cmd: list[str], log: Path) -> float:
    """Run `cmd`, its output to `log`; seconds taken. A failure raises with the log's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{shlex.join(cmd)} exited with {rc}; end of {log}:\n{tail}")
    return time.perf_counter() - t0


def probe_selection(metrics: dict) -> tuple[float, float, float] | None:
    """(selection accuracy, mismatched-audio selection accuracy, chance), means over probe seeds."""
    mean = (metrics.get("probe") or {}).get("mean") or {}
    if "selection_accuracy" not in mean:
        return None
    return mean["selection_accuracy"], mean.get("mismatched_selection_accuracy", float("nan")), mean["selection_chance"]


def targets(models: dict[str, dict]) -> list[dict]:
    """Each target's check per model it concerns: value, bar, pass."""
    out = []
    for variant in VARIANTS:
        for name, m in models.items():
            if m["variant"] != variant or m["random_init"]:
                continue
            met = m["metrics"]
            bar = RETRIEVAL_FACTOR * met["retrieval_chance"]["r10"]
            for d, label in (("a2v", "A->V"), ("v2a", "V->A")):
                value = met["retrieval"][d]["r10"]
                out.append({"target": f"{variant}: {label} R@10 >= {RETRIEVAL_FACTOR:g}x chance", "model": name,
                            "value": value, "bar": bar, "pass": value >= bar})
    random_sel = [s[0] for m in models.values() if m["random_init"] and (s := probe_selection(m["metrics"]))]
    best_random = max(random_sel) if random_sel else float("nan")
    for name, m in models.items():
        if m["variant"] != "crossmae" or m["random_init"]:
            continue
        sel = probe_selection(m["metrics"])
        if sel is None:
            continue
        acc, mismatched, chance = sel
        bar = max(PROBE_MIN, best_random + PROBE_MARGIN)
        out.append({"target": f"crossmae: probe selection >= {PROBE_MIN:g} and >= best random init "
                    f"+ {PROBE_MARGIN:g}", "model": name, "value": acc, "bar": bar, "pass": acc >= bar})
        out.append({"target": f"crossmae: mismatched-audio probe selection within {MISMATCH_TOLERANCE:g} of "
                    "chance", "model": name, "value": mismatched, "bar": chance,
                    "pass": abs(mismatched - chance) <= MISMATCH_TOLERANCE})
    return out


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    """The models side by side (metrics with their chance levels and controls), then the targets."""
    models = results["models"]
    names = list(models)
    first = models[names[0]]["metrics"]
    lines = [f"| metric | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]

    def row(label: str, get) -> None:
        cells = []
        for n in names:
            try:
                cells.append(get(models[n]))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for d, label in (("a2v", "A->V"), ("v2a", "V->A")):
        for k in ("r1", "r5", "r10"):
            row(f"{label} R@{k[1:]}", lambda m, d=d, k=k: _f(m["metrics"]["retrieval"][d][k]))
    chance = first["retrieval_chance"]
    lines.append(f"| chance R@1 / 5 / 10 ({first['clips']} clips) | "
                 + " | ".join([" / ".join(_f(v) for v in chance.values())] * len(names)) + " |")
    for kind, get in (("zero-shot map", lambda m: m["metrics"]["localization"]),
                      ("probe (mean of seeds)", lambda m: m["metrics"]["probe"]["mean"])):
        row(f"{kind}: cIoU / uniform cIoU", lambda m, g=get: _f(g(m)["ciou_x_uniform"], 2))
        row(f"{kind}: selection accuracy", lambda m, g=get: _f(g(m)["selection_accuracy"]))
        row(f"{kind}: non-sounding box cIoU / uniform", lambda m, g=get: _f(g(m)["nonsounding_ciou_x_uniform"], 2))
        row(f"{kind}: mismatched audio, selection", lambda m, g=get: _f(g(m)["mismatched_selection_accuracy"]))
        row(f"{kind}: mismatched audio, cIoU / uniform", lambda m, g=get: _f(g(m)["mismatched_ciou_x_uniform"], 2))
    row("probe selection per probe seed", lambda m: " / ".join(
        _f(s["selection_accuracy"]) for s in m["metrics"]["probe"]["seeds"].values()))
    loc = first["localization"] or {}
    lines.append("| selection chance (mean 1 / objects) | " + " | ".join([_f(loc.get("selection_chance"))] * len(names))
                 + " |")
    row("train steps / seconds",
        lambda m: f"{m['steps']} / {m['train_seconds']:.0f}" if m["steps"] else "0 (random init)")
    lines += ["", "| target | model | value | bar | verdict |", "|---|---|---:|---:|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['model']} | {_f(t['value'])} | {_f(t['bar'])} | "
                     f"{'PASS' if t['pass'] else 'FAIL'} |")
    lines += ["", "Commands:", "", "```", results["command"]]
    lines += [m["pretrain_command"] for m in models.values() if m.get("pretrain_command")]
    lines += ["```", "", f"Wall time {results['wall_seconds']:.0f} s (training {results['train_wall_seconds']:.0f} s, "
              f"evaluation {results['eval_wall_seconds']:.0f} s; {results['host']})."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crossmae_fast.learning_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/learning_check", help="output folder")
    ap.add_argument("--steps", type=int, default=1000, help="optimisation steps per training run (default 1000)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per training step (default 32)")
    ap.add_argument("--random-inits", type=int, default=3, help="randomly initialised control models (default 3)")
    ap.add_argument("--probe-seeds", type=int, nargs="+", default=[0, 1], help="probe seeds (default 0 1)")
    ap.add_argument("--probe-steps", type=int, default=300, help="probe training steps (default 300)")
    ap.add_argument("--clips", type=int, default=2048, help="synthetic clips (default 2048)")
    ap.add_argument("--eval-clips", type=int, default=256, help="of which held out for evaluation (default 256)")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (default 2)")
    ap.add_argument("--loader", choices=("torch", "dali"), default="dali")
    ap.add_argument("--workers", type=int, default=1, help="data loader workers per run (default 1)")
    ap.add_argument("--report", help="also write PREFIX.json and PREFIX.md (e.g. benchmarks/results/learning_check)")
    ap.add_argument("--extra", default="", help="more pretrain options for every training run, one string")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    import torch

    from crossmae_fast.config import data_config, model_config
    from crossmae_fast.data import normalisation
    from crossmae_fast.data.synthetic import cached_synthetic_set
    from crossmae_fast.eval.evaluator import checkpoint_data_config, evaluate, load_model
    from crossmae_fast.eval.probe import ProbeConfig
    from crossmae_fast.model import CrossMAE

    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not 0 < a.eval_clips < a.clips:
        print(f"learning_check: error: --eval-clips {a.eval_clips} must lie in (0, --clips {a.clips})", file=sys.stderr)
        return 2
    mcfg = model_config("tiny", "crossmae")
    paths = cached_synthetic_set(a.clips, seed=0, seconds=_recipe()["synth_seconds"], image_size=mcfg.image_size,
                                 eval_fraction=a.eval_clips / a.clips)
    py = sys.executable
    jobs = {}
    for variant in VARIANTS:
        for seed in a.seeds:
            name = f"{variant} s{seed}"
            run_dir = out / f"{variant}-s{seed}"
            cmd = [py, "-m", "crossmae_fast.pretrain", "--data", str(paths["train"]), "--preset", "tiny",
                   "--variant", variant, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                   "--seed", str(seed), "--loader", a.loader, "--workers", str(a.workers), "--threads", "1",
                   "--out", str(run_dir), "--resume", "auto", "--save-every", "0", "--keep", "1", "--log-every", "50",
                   "--no-export-encoders",
                   *shlex.split(a.extra)]
            jobs[name] = (variant, run_dir, cmd)
    try:
        with ThreadPoolExecutor(max(1, a.jobs)) as pool:
            futures = {}
            for name, (_, run_dir, cmd) in jobs.items():
                print(f"[{name}] {shlex.join(cmd)}", flush=True)
                futures[name] = pool.submit(run_logged, cmd, out / f"{run_dir.name}.pretrain.log")
            seconds = {name: f.result() for name, f in futures.items()}
    except (RuntimeError, OSError) as e:
        print(f"learning_check: error: {e}", file=sys.stderr)
        return 2
    t_train = time.perf_counter() - t0
    for name, s in seconds.items():
        print(f"[{name}] trained in {s:.0f} s", flush=True)

    probe = ProbeConfig(steps=a.probe_steps, seeds=tuple(a.probe_seeds))
    models = {}
    random_cfg = normalisation.resolve(data_config(mcfg), paths["train"])
    evals = {name: (variant, run_dir) for name, (variant, run_dir, _) in jobs.items()}
    evals.update({f"random {k}": ("crossmae", None) for k in range(a.random_inits)})
    t1 = time.perf_counter()
    for name, (variant, run_dir) in evals.items():
        if run_dir is not None:
            model, dcfg = load_model(run_dir), checkpoint_data_config(run_dir)
        else:
            torch.manual_seed(1000 + int(name.split()[1]))
            model, dcfg = CrossMAE(mcfg).eval(), random_cfg
        metrics = evaluate(model, paths["eval"], batch_size=64, backend=a.loader, num_workers=a.workers,
                           data=dcfg, probe=probe, probe_data=paths["train"])
        sel = probe_selection(metrics)
        print(f"[{name}] R@10 {metrics['retrieval']['a2v']['r10']:.3f} / {metrics['retrieval']['v2a']['r10']:.3f}; "
              f"probe selection {_f(sel and sel[0])}", flush=True)
        models[name] = {"variant": variant, "random_init": run_dir is None, "metrics": metrics,
                        "steps": 0 if run_dir is None else a.steps, "train_seconds": seconds.get(name, 0.0),
                        "pretrain_command": shlex.join(["python", *jobs[name][2][1:]]) if name in jobs else None}
    argv_shown = sys.argv[1:] if argv is None else argv
    results = {"command": shlex.join(["python", "-m", "crossmae_fast.learning_check", *argv_shown]),
               "args": vars(a), "synth": {k: str(v) for k, v in paths.items()},
               "thresholds": {"retrieval_r10_x_chance": RETRIEVAL_FACTOR, "probe_selection_min": PROBE_MIN,
                              "probe_margin_over_best_random": PROBE_MARGIN,
                              "mismatched_tolerance": MISMATCH_TOLERANCE},
               "models": models, "targets": targets(models), "wall_seconds": time.perf_counter() - t0,
               "train_wall_seconds": t_train, "eval_wall_seconds": time.perf_counter() - t1, "host": _host()}
    table = markdown(results)
    for prefix in [out / "results"] + ([Path(a.report)] if a.report else []):
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        prefix.with_suffix(".md").write_text("# Learning check: tiny preset on the synthetic set\n\n" + table)
    print(table)
    return 0


def _recipe() -> dict:
    """The default run's synthetic-set settings (the tiny recipe)."""
    from crossmae_fast.config import run_config

    t = run_config().train
    return {"synth_clips": t.synth_clips, "synth_seconds": t.synth_seconds}


def _host() -> str:
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{dev}, load average {os.getloadavg()[0]:.1f} at the end"


if __name__ == "__main__":
    sys.exit(main())
