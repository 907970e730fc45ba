"""Learning check (issue 6): does the `tiny` preset learn the synthetic set on a CPU in minutes?

    python -m crossmae_fast.learning_check [--out DIR] [--variants crossmae cl-av] [--steps N]
        [--batch-size B] [--lr LR] [--clips N] [--seconds S] [--report PREFIX]

Writes a synthetic set (`crossmae_fast.synth`; its last quarter is the held-out eval split), then for
each variant runs `python -m crossmae_fast.pretrain` on the train split and
`python -m crossmae_fast.evaluate` on the eval split, as subprocesses, recording the exact commands.
Thresholds: retrieval R@10 in both directions at least 3x chance (10 / eval clips), and mean cIoU at
least 1.5x that of a uniform map (which selects every pixel, so its cIoU is the box-area fraction).
Writes `results.json` and `results.md` (a table of the variants side by side, PASS/FAIL per threshold)
into `--out`, and with `--report PREFIX` also `PREFIX.json` / `PREFIX.md`. Exit status 0 whatever the
verdict (it is data), 2 when a step fails.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from crossmae_fast.data.synthetic import cached_synthetic_set

RETRIEVAL_FACTOR = 3.0
LOCALIZATION_FACTOR = 1.5


def run_logged(cmd: list[str], log: Path) -> float:
    """Run `cmd`, its output to `log`; seconds taken. A failure raises with the log's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{shlex.join(cmd)} exited with {rc}; end of {log}:\n{tail}")
    return time.perf_counter() - t0


def verdict(metrics: dict) -> dict[str, dict]:
    """Each threshold's value, bar and pass/fail from an `evaluate` metrics.json."""
    chance = metrics["retrieval_chance"]["r10"]
    out = {f"{d}_r10": {"value": metrics["retrieval"][d]["r10"], "bar": RETRIEVAL_FACTOR * chance}
           for d in ("a2v", "v2a")}
    loc = metrics["localization"]
    if loc:
        out["ciou"] = {"value": loc["ciou"], "bar": LOCALIZATION_FACTOR * loc["uniform_map_ciou"]}
    for v in out.values():
        v["pass"] = v["value"] >= v["bar"]
    return out


def markdown(results: dict) -> str:
    """The variants side by side, then PASS/FAIL per threshold, then the commands."""
    runs = results["variants"]
    names = list(runs)
    rows = [("A->V R@1", "a2v", "r1"), ("A->V R@5", "a2v", "r5"), ("A->V R@10", "a2v", "r10"),
            ("V->A R@1", "v2a", "r1"), ("V->A R@5", "v2a", "r5"), ("V->A R@10", "v2a", "r10")]
    lines = [f"| metric | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]
    for label, d, k in rows:
        lines.append(f"| {label} | " + " | ".join(f"{runs[n]['metrics']['retrieval'][d][k]:.4f}" for n in names) + " |")
    first = runs[names[0]]["metrics"]
    lines.append(f"| chance R@1/5/10 ({first['clips']} clips) | "
                 + " | ".join(" / ".join(f"{v:.4f}" for v in runs[n]["metrics"]["retrieval_chance"].values())
                              for n in names) + " |")
    for label, key in (("mean cIoU", "ciou"), ("uniform-map cIoU", "uniform_map_ciou"), ("AP50", "ap50"),
                       ("AUC", "auc")):
        vals = [runs[n]["metrics"]["localization"] for n in names]
        lines.append(f"| {label} | " + " | ".join(f"{v[key]:.4f}" if v else "-" for v in vals) + " |")
    lines.append("| train steps / seconds | " + " | ".join(
        f"{runs[n]['steps']} / {runs[n]['train_seconds']:.0f}" for n in names) + " |")
    lines += ["", "| threshold | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    labels = {"a2v_r10": f"A->V R@10 >= {RETRIEVAL_FACTOR:g}x chance",
              "v2a_r10": f"V->A R@10 >= {RETRIEVAL_FACTOR:g}x chance",
              "ciou": f"mean cIoU >= {LOCALIZATION_FACTOR:g}x uniform map"}
    for key, label in labels.items():
        cells = []
        for n in names:
            v = runs[n]["verdict"].get(key)
            cells.append(f"{'PASS' if v['pass'] else 'FAIL'} ({v['value']:.4f} vs {v['bar']:.4f})" if v else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Commands:", "", "```", results["command"]]
    for n in names:
        lines += [runs[n]["pretrain_command"], runs[n]["evaluate_command"]]
    lines += ["```", "", f"Wall time {results['wall_seconds']:.0f} s ({results['host']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crossmae_fast.learning_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/learning_check", help="output folder")
    ap.add_argument("--variants", nargs="+", default=["crossmae", "cl-av"])
    ap.add_argument("--steps", type=int, default=200, help="optimisation steps per variant")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4, help="absolute peak learning rate")
    ap.add_argument("--warmup", default="5%")
    ap.add_argument("--clips", type=int, default=512, help="synthetic clips; a quarter are held out")
    ap.add_argument("--seconds", type=float, default=3.0, help="audio seconds per clip")
    ap.add_argument("--seed", type=int, default=0, help="seed of the set and of training")
    ap.add_argument("--loader", choices=("torch", "dali"), default="torch")
    ap.add_argument("--ops", choices=("auto", "triton", "reference"), default="reference")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: pretrain's choice)")
    ap.add_argument("--report", help="also write PREFIX.json and PREFIX.md (e.g. benchmarks/results/learning_check)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    py = sys.executable
    try:
        paths = cached_synthetic_set(a.clips, a.seed, seconds=a.seconds, image_size=64, root=out)
        runs = {}
        for v in a.variants:
            run_dir = out / v
            train = [py, "-m", "crossmae_fast.pretrain", "--data", str(paths["train"]), "--preset", "tiny",
                     "--variant", v, "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
                     "--warmup", a.warmup, "--seed", str(a.seed), "--loader", a.loader, "--ops", a.ops,
                     "--workers", str(a.workers), "--threads", str(a.threads), "--out", str(run_dir),
                     "--save-every", "0", "--keep", "1", "--log-every", "25", "--no-export-encoders"]
            evaluate = [py, "-m", "crossmae_fast.evaluate", "--checkpoint", str(run_dir), "--data",
                        str(paths["eval"]), "--out", str(run_dir / "eval"), "--loader", a.loader,
                        "--pictures", "0", "--workers", str(a.workers)]
            print(f"[{v}] {shlex.join(train)}", flush=True)
            train_s = run_logged(train, run_dir.with_name(f"{v}.pretrain.log"))
            print(f"[{v}] trained in {train_s:.0f} s; {shlex.join(evaluate)}", flush=True)
            eval_s = run_logged(evaluate, run_dir.with_name(f"{v}.evaluate.log"))
            metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
            runs[v] = {"steps": a.steps, "train_seconds": train_s, "eval_seconds": eval_s, "metrics": metrics,
                       "verdict": verdict(metrics), "pretrain_command": shlex.join(["python", *train[1:]]),
                       "evaluate_command": shlex.join(["python", *evaluate[1:]])}
    except (RuntimeError, OSError, ValueError) as e:
        print(f"learning_check: error: {e}", file=sys.stderr)
        return 2
    results = {"command": shlex.join(["python", "-m", "crossmae_fast.learning_check", *sys.argv[1:]])
               if argv is None else shlex.join(["python", "-m", "crossmae_fast.learning_check", *argv]),
               "args": vars(a), "synth": json.loads((paths["train"].parent / "synth.json").read_text())["chance"],
               "thresholds": {"retrieval_r10_x_chance": RETRIEVAL_FACTOR, "ciou_x_uniform": LOCALIZATION_FACTOR},
               "wall_seconds": time.perf_counter() - t0, "host": _host(), "variants": runs}
    table = markdown(results)
    targets = [out / "results"] + ([Path(a.report)] if a.report else [])
    for prefix in targets:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        prefix.with_suffix(".md").write_text("# Learning check: tiny preset on the synthetic set\n\n" + table)
    print(table)
    return 0


def _host() -> str:
    import os

    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{dev}, load average {os.getloadavg()[0]:.1f} at the end"


if __name__ == "__main__":
    sys.exit(main())
