"""Learning-check plumbing: thresholds and table on made-up metrics; one tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
from optional import needs_media

from crossmae_fast import learning_check as lc


def fake_metrics(r10: float, ciou: float, clips: int, uniform: float) -> dict:
    ret = {"r1": r10 / 4, "r5": r10 / 2, "r10": r10, "median_rank": 3.0, "mean_rank": 4.0}
    return {"clips": clips, "retrieval": {"a2v": dict(ret), "v2a": {**ret, "r10": r10 * 0.5}},
            "retrieval_chance": {"r1": 1 / clips, "r5": 5 / clips, "r10": 10 / clips},
            "localization": {"ap50": 0.1, "ciou": ciou, "auc": 0.2, "uniform_map_ciou": uniform, "clips": clips}}


def test_verdict_and_table():
    m = fake_metrics(r10=0.5, ciou=0.09, clips=80, uniform=0.05)  # bars: R@10 0.375, cIoU 0.075
    v = lc.verdict(m)
    assert v["a2v_r10"]["pass"] and not v["v2a_r10"]["pass"]  # v2a R@10 = 0.25 < 0.375
    assert abs(v["ciou"]["bar"] - 0.075) < 1e-12 and v["ciou"]["pass"]
    assert not lc.verdict(fake_metrics(0.5, 0.07, 80, 0.05))["ciou"]["pass"]
    runs = {name: {"steps": 3, "train_seconds": 1.0, "metrics": m, "verdict": v, "pretrain_command": f"pt {name}",
                   "evaluate_command": f"ev {name}"} for name in ("crossmae", "cl-av")}
    table = lc.markdown({"variants": runs, "command": "lc", "wall_seconds": 2.0, "host": "h"})
    assert "| metric | crossmae | cl-av |" in table
    assert table.count("PASS") == 4 and table.count("FAIL") == 2
    assert "0.3750" in table and "pt cl-av" in table


@pytest.mark.slow
@needs_media
def test_end_to_end(tmp_path):
    out, report = tmp_path / "lc", tmp_path / "rep" / "learning_check"
    rc = lc.main(["--out", str(out), "--variants", "cl-av", "--steps", "2", "--batch-size", "4", "--clips", "12",
                  "--seconds", "2.6", "--workers", "0", "--threads", "1", "--report", str(report)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert json.loads(report.with_suffix(".json").read_text()) == res
    run = res["variants"]["cl-av"]
    assert run["metrics"]["clips"] == 3 and run["metrics"]["retrieval_chance"]["r10"] == 1.0
    assert set(run["verdict"]) == {"a2v_r10", "v2a_r10", "ciou"}
    table = (out / "results.md").read_text()
    assert "| metric | cl-av |" in table and "--variant cl-av" in table
    assert table.count("PASS") + table.count("FAIL") == 3
