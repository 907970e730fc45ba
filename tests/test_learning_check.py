"""Learning check: the targets and the table on made-up metrics; one tiny end-to-end run."""

from __future__ import annotations

import json
import statistics

from crossmae_fast import learning_check as lc
from crossmae_fast.eval import report


def fake_metrics(r10: float, clips: int = 80, selection=None, mismatched: float = 0.42) -> dict:
    """Made-up evaluation metrics; `selection`: the probe's selection accuracy per probe seed."""
    ret = {"r1": r10 / 4, "r5": r10 / 2, "r10": r10, "median_rank": 3.0, "mean_rank": 4.0}
    loc = {"ap50": 0.1, "ciou": 0.08, "auc": 0.2, "uniform_map_ciou": 0.05, "ciou_x_uniform": 1.6, "clips": clips,
           "selection_accuracy": 0.45, "selection_chance": 0.42, "nonsounding_ciou_x_uniform": 0.9,
           "mismatched_selection_accuracy": 0.4, "mismatched_ciou_x_uniform": 1.0}
    m = {"clips": clips, "retrieval": {"a2v": dict(ret), "v2a": {**ret, "r10": r10 * 0.5}},
         "retrieval_chance": {"r1": 1 / clips, "r5": 5 / clips, "r10": 10 / clips}, "localization": loc}
    if selection is not None:
        seeds = {str(k): {**loc, "selection_accuracy": s, "mismatched_selection_accuracy": mismatched}
                 for k, s in enumerate(selection)}
        m["probe"] = {"seeds": seeds, "mean": {**loc, "selection_accuracy": sum(selection) / len(selection),
                                               "mismatched_selection_accuracy": mismatched}}
    return m


def model(variant, metrics, random_init=False):
    return {"variant": variant, "random_init": random_init, "metrics": metrics, "steps": 0 if random_init else 5,
            "train_seconds": 1.0, "pretrain_command": None if random_init else f"pt {variant}"}


def test_targets_are_retrieval_on_every_seed_and_localization_is_reported():
    models = {"crossmae s0": model("crossmae", fake_metrics(0.9, selection=[0.6, 0.7, 0.8, 0.9, 1.0])),
              "crossmae s1": model("crossmae", fake_metrics(0.9, selection=[0.5] * 5, mismatched=0.6)),
              "cl-av s0": model("cl-av", fake_metrics(0.5, selection=[0.9] * 5)),  # v2a 0.25 < 3 x 0.125
              "random 0": model("crossmae", fake_metrics(0.1, selection=[0.5, 0.7] * 2 + [0.6]), True),
              "random 1": model("crossmae", fake_metrics(0.1, selection=[0.65] * 5), True)}
    targets = report.learning_check_targets(models)
    assert len(targets) == 3 * 2 and all("R@10" in t["target"] for t in targets)  # no localization target
    verdicts = {(t["model"], t["target"].split(": ")[1][:4]): t["pass"] for t in targets}
    assert verdicts[("crossmae s0", "A->V")] and verdicts[("cl-av s0", "A->V")] and not verdicts[("cl-av s0", "V->A")]
    spread = report.probe_spread(models["crossmae s0"]["metrics"])
    assert abs(spread["mean"] - 0.8) < 1e-12
    assert abs(spread["std"] - statistics.stdev([0.6, 0.7, 0.8, 0.9, 1.0])) < 1e-12
    assert list(spread["seeds"]) == ["0", "1", "2", "3", "4"]
    assert report.probe_spread(fake_metrics(0.1)) is None
    rows = {r["model"]: r for r in report.localization_report(models)}
    assert set(rows["crossmae s1"]["random_inits"]) == {"random 0", "random 1"}
    assert "random_inits" not in rows["random 0"] and rows["crossmae s1"]["probe_mismatched"] == 0.6
    table = report.learning_check_markdown({"models": models, "targets": targets, "command": "lc",
                                            "wall_seconds": 2.0, "train_wall_seconds": 1.0, "eval_wall_seconds": 1.0,
                                            "host": "h"})
    assert "| metric | crossmae s0 | crossmae s1 | cl-av s0 | random 0 | random 1 |" in table
    assert "0 (random init)" in table and "pt cl-av" in table
    assert "0.600 / 0.700 / 0.800 / 0.900 / 1.000" in table  # every probe seed listed
    assert "0.800 ± 0.158" in table and "random 0: 0.600 ± 0.100; random 1: 0.650 ± 0.000" in table
    assert table.count("PASS") + table.count("FAIL") == 6


def test_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSMAE_CACHE", str(tmp_path / "cache"))
    out, report = tmp_path / "lc", tmp_path / "rep" / "learning_check"
    rc = lc.main(["--out", str(out), "--steps", "2", "--seeds", "0", "--random-inits", "1", "--probe-steps", "2",
                  "--probe-seeds", "0", "1", "--clips", "24", "--eval-clips", "6", "--jobs", "1", "--loader", "torch",
                  "--workers", "0",
                  "--batch-size", "4", "--report", str(report)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert json.loads(report.with_suffix(".json").read_text()) == res
    assert set(res["models"]) == {"crossmae s0", "cl-av s0", "random 0"}
    m = res["models"]["crossmae s0"]["metrics"]
    assert m["clips"] == 6 and set(m["probe"]["seeds"]) == {"0", "1"}
    assert {"selection_accuracy", "selection_chance", "nonsounding_ciou_x_uniform", "mismatched_selection_accuracy",
            "ciou_x_uniform"} <= set(m["localization"]) & set(m["probe"]["mean"])
    assert len(res["targets"]) == 2 * 2  # R@10 both ways per trained model; localization has no target
    assert set(m["probe"]["std"]) == set(m["probe"]["mean"])
    table = (out / "results.md").read_text()
    assert "--variant cl-av" in table and table.count("PASS") + table.count("FAIL") == 4
    assert "random 0: " in table and "(control)" in table
