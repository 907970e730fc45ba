"""Reports of evaluation results: the plain-text tables of one evaluation (`format_tables`), and the
learning check's verdict (its targets, the probe selection it reads, and its markdown table of models
side by side); `crossmae_fast.learning_check` is the command line around them."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import torch

from crossmae_fast.components.checkpoint import checkpoint_data_config, model_from_checkpoint
from crossmae_fast.config import EvalConfig, data_config, model_config
from crossmae_fast.data import normalisation
from crossmae_fast.eval.evaluator import evaluate
from crossmae_fast.model import CrossMAE


def format_tables(result: dict) -> str:
    """Plain-text tables of the retrieval and localization results."""
    lines = [f"retrieval over {result['clips']} clips (chance R@1/5/10: "
             + " / ".join(f"{v:.4f}" for v in result["retrieval_chance"].values()) + ")",
             f"{'direction':<10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>8}{'MeanR':>9}"]
    for d, m in result["retrieval"].items():
        lines.append(f"{d:<10}{m['r1']:>8.4f}{m['r5']:>8.4f}{m['r10']:>8.4f}{m['median_rank']:>8.1f}"
                     f"{m['mean_rank']:>9.1f}")
    chance, n = result["retrieval_chance"], result["clips"]
    lines.append(f"{'chance':<10}{chance['r1']:>8.4f}{chance['r5']:>8.4f}{chance['r10']:>8.4f}{(n + 1) / 2:>8.1f}"
                 f"{(n + 1) / 2:>9.1f}")
    loc = result["localization"]
    if loc:
        kinds = {"zero-shot": loc}
        kinds.update({f"probe {s}": v for s, v in (result.get("probe") or {}).get("seeds", {}).items()})
        sel = "selection_accuracy" in loc
        chance = f", selection chance {loc['selection_chance']:.3f}" if sel else ""
        lines += ["", f"localization over {loc['clips']} clips ({loc['gt_mode']} ground truth; uniform-map cIoU "
                  f"{loc['uniform_map_ciou']:.4f}{chance}; mismatched: the next clip's audio)",
                  f"{'map':<12}{'AP50':>7}{'cIoU':>8}{'AUC':>7}{'x unif':>8}{'mism x':>8}"
                  + (f"{'select':>8}{'mism sel':>9}{'other x':>9}" if sel else "")]
        for name, k in kinds.items():
            line = (f"{name:<12}{k['ap50']:>7.3f}{k['ciou']:>8.4f}{k['auc']:>7.3f}{k['ciou_x_uniform']:>8.2f}"
                    f"{k.get('mismatched_ciou_x_uniform', float('nan')):>8.2f}")
            if sel:
                line += (f"{k['selection_accuracy']:>8.3f}{k.get('mismatched_selection_accuracy', float('nan')):>9.3f}"
                         f"{k['nonsounding_ciou_x_uniform']:>9.2f}")
            lines.append(line)
        if sel:
            lines.append("x unif: cIoU / uniform-map cIoU; mism: from mismatched audio; select: the sounding object's "
                         "box holds the highest mean map value; other x: cIoU against a non-sounding object's box / "
                         "its uniform cIoU")
    else:
        lines += ["", "localization: the manifest has no boxes"]
    return "\n".join(lines)


RETRIEVAL_FACTOR = 3.0
VARIANTS = ("crossmae", "cl-av")
"""The variants the learning check trains (each must pass the retrieval target)."""
THRESHOLDS = {"retrieval_r10_x_chance": RETRIEVAL_FACTOR}
"""The learning check's only targets: retrieval. Localization is measured and reported (docs/design.md,
"What the synthetic set can and cannot show"), not judged."""


def probe_spread(metrics: dict, key: str = "selection_accuracy") -> dict | None:
    """A probe figure over the probe seeds: {"mean", "std" (sample, n - 1; 0 for one seed), "seeds":
    {seed: value}}; None without a probe."""
    seeds = (metrics.get("probe") or {}).get("seeds") or {}
    values = {s: v[key] for s, v in seeds.items() if isinstance(v.get(key), float)}
    if not values:
        return None
    xs = list(values.values())
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "seeds": values}


def learning_check_targets(models: dict[str, dict]) -> list[dict]:
    """The learning check's targets (`THRESHOLDS`): R@10 both ways for every trained model of `VARIANTS`,
    each with its value, bar and pass."""
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
    return out


def localization_report(models: dict[str, dict]) -> list[dict]:
    """Per model: the zero-shot map's selection accuracy (and from mismatched audio), the probe's
    selection over probe seeds (`probe_spread`) and its mismatched-audio mean; each trained model with
    the random inits' probe spreads beside it. Measurements, no verdict."""
    def entry(name: str, m: dict) -> dict:
        loc = m["metrics"].get("localization") or {}
        mism = probe_spread(m["metrics"], "mismatched_selection_accuracy")
        return {"model": name, "random_init": m["random_init"], "zero_shot": loc.get("selection_accuracy"),
                "zero_shot_mismatched": loc.get("mismatched_selection_accuracy"),
                "probe": probe_spread(m["metrics"]), "probe_mismatched": mism and mism["mean"],
                "chance": loc.get("selection_chance")}

    randoms = [entry(n, m) for n, m in models.items() if m["random_init"]]
    rows = []
    for name, m in models.items():
        row = entry(name, m)
        if not m["random_init"]:
            row["random_inits"] = {r["model"]: r["probe"] for r in randoms}
        rows.append(row)
    return rows


def fmt(x, digits: int = 3) -> str:
    """`x` with `digits` decimals; "-" for a missing value or NaN."""
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def _spread(s: dict | None) -> str:
    return "-" if not s else f"{fmt(s['mean'])} ± {fmt(s['std'])}"


def localization_markdown(rows: list[dict]) -> list[str]:
    """The localization table: one line per model, the random inits beside each trained one."""
    chance = next((r["chance"] for r in rows if r["chance"] is not None), None)
    lines = [f"Localization (measured, no target; selection chance {fmt(chance)}): selection accuracy of the "
             "zero-shot map, and of the probe over its probe seeds (mean ± standard deviation, then each seed)."
             " Mismatched: the same from another clip's audio.", "",
             "| model | zero-shot (mismatched) | probe mean ± std | probe per seed | probe, mismatched | "
             "random inits' probe, beside it |", "|---|---|---|---|---|---|"]
    for r in rows:
        seeds = " / ".join(fmt(v) for v in r["probe"]["seeds"].values()) if r["probe"] else "-"
        beside = "; ".join(f"{n}: {_spread(s)}" for n, s in r.get("random_inits", {}).items()) or "(control)"
        lines.append(f"| {r['model']} | {fmt(r['zero_shot'])} ({fmt(r['zero_shot_mismatched'])}) | "
                     f"{_spread(r['probe'])} | {seeds} | {fmt(r['probe_mismatched'])} | {beside} |")
    return lines


def learning_check_markdown(results: dict) -> str:
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
            row(f"{label} R@{k[1:]}", lambda m, d=d, k=k: fmt(m["metrics"]["retrieval"][d][k]))
    chance = first["retrieval_chance"]
    lines.append(f"| chance R@1 / 5 / 10 ({first['clips']} clips) | "
                 + " | ".join([" / ".join(fmt(v) for v in chance.values())] * len(names)) + " |")
    for kind, get in (("zero-shot map", lambda m: m["metrics"]["localization"]),
                      ("probe (mean of seeds)", lambda m: m["metrics"]["probe"]["mean"])):
        row(f"{kind}: cIoU / uniform cIoU", lambda m, g=get: fmt(g(m)["ciou_x_uniform"], 2))
        row(f"{kind}: selection accuracy", lambda m, g=get: fmt(g(m)["selection_accuracy"]))
        row(f"{kind}: non-sounding box cIoU / uniform", lambda m, g=get: fmt(g(m)["nonsounding_ciou_x_uniform"], 2))
        row(f"{kind}: mismatched audio, selection", lambda m, g=get: fmt(g(m)["mismatched_selection_accuracy"]))
        row(f"{kind}: mismatched audio, cIoU / uniform", lambda m, g=get: fmt(g(m)["mismatched_ciou_x_uniform"], 2))
    row("probe selection: std over probe seeds", lambda m: fmt(probe_spread(m["metrics"])["std"]))
    row("probe selection per probe seed", lambda m: " / ".join(
        fmt(s["selection_accuracy"]) for s in m["metrics"]["probe"]["seeds"].values()))
    loc = first["localization"] or {}
    chance_cells = " | ".join([fmt(loc.get("selection_chance"))] * len(names))
    lines.append(f"| selection chance (mean 1 / objects) | {chance_cells} |")
    row("train steps / seconds",
        lambda m: f"{m['steps']} / {m['train_seconds']:.0f}" if m["steps"] else "0 (random init)")
    lines += ["", *localization_markdown(localization_report(models))]
    lines += ["", "Targets (retrieval only):", "", "| target | model | value | bar | verdict |",
              "|---|---|---:|---:|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['model']} | {fmt(t['value'])} | {fmt(t['bar'])} | "
                     f"{'PASS' if t['pass'] else 'FAIL'} |")
    lines += ["", "Commands:", "", "```", results["command"]]
    lines += [m["pretrain_command"] for m in models.values() if m.get("pretrain_command")]
    lines += ["```", "", f"Wall time {results['wall_seconds']:.0f} s (training {results['train_wall_seconds']:.0f} s, "
              f"evaluation {results['eval_wall_seconds']:.0f} s; {results['host']})."]
    return "\n".join(lines) + "\n"


def evaluate_models(runs: dict[str, tuple[str, Path | None]], manifests: dict, cfg: EvalConfig, loader: str,
                    workers: int) -> dict[str, dict]:
    """Each run's latest checkpoint (`{name: (variant, run folder)}`) and each random init (`{"random K":
    (variant, None)}`: the tiny preset seeded with 1000 + K) evaluated alike on `manifests["eval"]`:
    `{name: {"variant", "random_init", "metrics"}}`."""
    mcfg = model_config("tiny", "crossmae")
    models = {}
    for name, (variant, run_dir) in runs.items():
        if run_dir is not None:
            model, dcfg = model_from_checkpoint(run_dir), checkpoint_data_config(run_dir)
        else:
            torch.manual_seed(1000 + int(name.split()[1]))
            model, dcfg = CrossMAE(mcfg).eval(), normalisation.resolve(data_config(mcfg), manifests["train"])
        metrics = evaluate(model, manifests["eval"], cfg, dataclasses.replace(dcfg, loader=loader, workers=workers))
        sel = probe_spread(metrics)
        print(f"[{name}] R@10 {metrics['retrieval']['a2v']['r10']:.3f} / {metrics['retrieval']['v2a']['r10']:.3f}; "
              f"probe selection {_spread(sel)}", flush=True)
        models[name] = {"variant": variant, "random_init": run_dir is None, "metrics": metrics}
    return models
