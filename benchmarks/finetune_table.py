"""The fine-tuning table on the synthetic set: `python benchmarks/finetune_table.py [--init runs/pretrain]
[--seeds 0 1] [--out runs/finetune_table] [--report benchmarks/results/finetune]`.

Runs `python -m crossmae_fast.finetune` (in this process, one run after another: no start-up per run)
for modes av / audio / visual, fine-tune and linear probe, from the pre-training run and from
`--init none`, with all train labels and with 16 per class, for each seed, with the tiny preset's
recipe; then writes every run (command, steps, seconds, accuracy, mAP, seed) and the targets' verdicts
to REPORT.json / REPORT.md. `--lr-sweep X Y Z` adds the few-label av linear probes at those base lrs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

HEADER = """# Fine-tuning and linear probing on the synthetic set

What pre-training buys, measured as the paper's Table 1 does (the sounding object's class, 16 classes, chance
0.0625; 768 train and 256 eval clips of the default synthetic set; tiny preset, CPU). Reproduce with:

    python -m crossmae_fast.pretrain                 # the default pre-training run -> runs/pretrain
    python benchmarks/finetune_table.py              # every run below, then this file

Recipe (the tiny preset's): 4 epochs, batch 32, blr 4e-3 (lr 5e-4), 1 warm-up epoch, cosine, head lr x10,
SpecAugment 12 / 48, no mixup, label smoothing or drop path; the linear probe uses the same settings with
frozen encoders. `random` = `--init none` (the control). Few labels = `--train-per-class 16` (256 clips, chosen
by the seed). Accuracy is top-1 on the 256 eval clips (frame 5), after the last epoch.

Time: {minutes:.1f} minutes for the whole table on the 2-core CPU (the sum of the runs' wall times, one run at a
time, each with its evaluation), load average {load} (1, 5, 15 min) when the table was written; the machine
was shared with other jobs, so the load counts them too.

"""
READING = """Reading: the sounding class is in the audio (timbre), so audio and av reach it; a picture shows 2-3
objects and does not say which one sounds, so a visual-only classifier can at best pick one of them
(ceiling 0.43 on the eval clips, the mean of 1 / objects), and the visual rows stay far below the others for pre-trained
and random encoders alike. What pre-training buys shows where labels are few or the encoders are frozen (the
linear-probe and 16-per-class rows); fine-tuned on all 768 labels, random encoders come close.
"""
FT_TARGET = 0.9
LP_MARGIN = 0.05


def runs(init: str, seeds: list[int], sweep: list[float]) -> list[dict]:
    out = []
    for per_class in (None, 16):
        for probe in (False, True):
            for mode in ("av", "audio", "visual"):
                for name, source in (("pretrained", init), ("random", "none")):
                    for seed in seeds:
                        out.append(dict(mode=mode, probe=probe, init=name, source=source, seed=seed,
                                        per_class=per_class, blr=None))
    for blr in sweep:
        for name, source in (("pretrained", init), ("random", "none")):
            for seed in seeds:
                out.append(dict(mode="av", probe=True, init=name, source=source, seed=seed, per_class=16, blr=blr))
    return out


def command(r: dict, folder: Path) -> list[str]:
    name = (f"{r['mode']}-{'lp' if r['probe'] else 'ft'}-{r['init']}-{r['per_class'] or 'all'}-s{r['seed']}"
            + (f"-blr{r['blr']:g}" if r["blr"] else ""))
    args = ["--init", r["source"], "--mode", r["mode"], "--seed", str(r["seed"]), "--out", str(folder / name),
            "--resume", "auto", "--eval-every", "0"]
    args += ["--linear-probe"] if r["probe"] else []
    args += ["--train-per-class", str(r["per_class"])] if r["per_class"] else []
    args += ["--blr", str(r["blr"])] if r["blr"] else []
    return args


def run_one(r: dict, folder: Path) -> dict:
    from crossmae_fast import finetune

    args = command(r, folder)
    out = Path(args[args.index("--out") + 1])
    if (out / "eval" / "metrics.json").is_file():  # done by an earlier call of this script
        result = json.loads((out / "eval" / "metrics.json").read_text())
        return {**r, "command": "python -m crossmae_fast.finetune " + shlex.join(args), **result["cached"],
                "cached": True}
    t0 = time.perf_counter()
    code = finetune.main(args)
    seconds = time.perf_counter() - t0
    if code != 0:  # an error, or stopped by a signal (it saved a checkpoint): the table stops too
        raise SystemExit(f"finetune_table: {out} stopped; rerun this script to continue")
    result = json.loads((out / "eval" / "metrics.json").read_text()) if code == 0 else {}
    row = {"steps": result.get("step"), "seconds": round(seconds, 1), "acc": result.get("final", {}).get("acc"),
           "mAP": result.get("final", {}).get("mAP"), "exit": code}
    if code == 0:
        result["cached"] = row
        (out / "eval" / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    return {**r, "command": "python -m crossmae_fast.finetune " + shlex.join(args), **row}


def mean(rows: list[dict], **match) -> float | None:
    vals = [r["acc"] for r in rows if all(r[k] == v for k, v in match.items()) and r["acc"] is not None]
    return sum(vals) / len(vals) if vals else None


def verdicts(rows: list[dict], seeds: list[int]) -> list[str]:
    lines = []
    for mode in ("audio", "av"):
        accs = [r["acc"] for r in rows if r["mode"] == mode and not r["probe"] and r["init"] == "pretrained"
                and r["per_class"] is None and r["blr"] is None]
        ok = accs and min(accs) >= FT_TARGET
        lines.append(f"- `--mode {mode}` fine-tuned from the pre-trained run, all labels: accuracy "
                     f"{', '.join(f'{a:.4f}' for a in accs)} (seeds {seeds}); target >= {FT_TARGET}: "
                     f"{'PASS' if ok else 'FAIL'}")
    pre = mean(rows, mode="av", probe=True, init="pretrained", per_class=16, blr=None)
    rnd = mean(rows, mode="av", probe=True, init="random", per_class=16, blr=None)
    if pre is not None and rnd is not None:
        lines.append(f"- av linear probe, 16 labels per class, mean of {len(seeds)} seeds: pre-trained {pre:.4f}, "
                     f"random init {rnd:.4f}, difference {pre - rnd:+.4f}; target >= +{LP_MARGIN}: "
                     f"{'PASS' if pre - rnd >= LP_MARGIN else 'MISS'}")
    return lines


def report(rows: list[dict], seeds: list[int], prefix: Path, total: float, load: str) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"runs": rows, "seconds": total, "load": load}, indent=1) + "\n")
    head = ("| mode | protocol | init | train labels | seed | base lr | steps | seconds | accuracy | mAP | command |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['mode']} | {'linear probe' if r['probe'] else 'fine-tune'} | {r['init']} | "
        f"{'16 per class' if r['per_class'] else 'all (768)'} | {r['seed']} | {r['blr'] or 'preset'} | {r['steps']} | "
        f"{r['seconds']} | {_f(r['acc'])} | {_f(r['mAP'])} | `{r['command']}` |\n" for r in rows)
    summary = "".join(
        f"| {mode} | {'linear probe' if probe else 'fine-tune'} | {'16 per class' if pc else 'all'} | "
        f"{_f(mean(rows, mode=mode, probe=probe, init='pretrained', per_class=pc, blr=None))} | "
        f"{_f(mean(rows, mode=mode, probe=probe, init='random', per_class=pc, blr=None))} |\n"
        for pc in (None, 16) for probe in (False, True) for mode in ("av", "audio", "visual"))
    minutes = sum(r["seconds"] or 0 for r in rows) / 60
    text = (HEADER.format(minutes=minutes, load=load)
            + "\n".join(verdicts(rows, seeds)) + "\n\n" + READING + "\nMean accuracy over seeds:\n\n"
            "| mode | protocol | train labels | pre-trained | random init |\n|---|---|---|---|---|\n"
            + summary + "\nEvery run:\n\n" + head + body)
    prefix.with_suffix(".md").write_text(text)


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", default="runs/pretrain", help="the pre-training run (default: pretrain's default out)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="runs/finetune_table")
    ap.add_argument("--report", default="benchmarks/results/finetune")
    ap.add_argument("--lr-sweep", type=float, nargs="*", default=[])
    args = ap.parse_args(argv)
    if not Path(args.init).exists():
        print(f"finetune_table: error: --init {args.init}: run `python -m crossmae_fast.pretrain` first",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = [run_one(r, Path(args.out)) for r in runs(args.init, args.seeds, args.lr_sweep)]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    report(rows, args.seeds, Path(args.report), time.perf_counter() - t0, load)
    print("\n".join(verdicts(rows, args.seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
