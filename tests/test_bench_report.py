"""The benchmark plumbing that needs no timing: derived figures, targets, the report and the README table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import common, report

ROOT = Path(__file__).resolve().parents[1]


class FakeBenchmark:
    """Enough of pytest-benchmark's fixture for `measure` and `record`: runs pedantic's calls, times nothing."""

    def __init__(self, mean: float):
        self.extra_info: dict = {}
        self.calls = 0
        self.mean = mean

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        for _ in range((rounds + warmup_rounds) * iterations):
            fn()
            self.calls += 1
        self.stats = SimpleNamespace(stats=SimpleNamespace(mean=self.mean))


def _record(results, group, impl, mean, device="cpu", baseline="reference", **kw):
    bench = FakeBenchmark(mean)
    timing = common.Timing(mean, kw.pop("peak", None))
    info = common.record(bench, results, timing, device=torch.device(device), group=group, impl=impl,
                         baseline=baseline, per_call=kw.pop("per_call", 8), unit="samples", **kw)
    assert bench.extra_info == info
    return info


def test_measure_runs_warmup_and_rounds():
    seen = []
    bench = FakeBenchmark(0.5)
    timing = common.measure(bench, lambda: seen.append(1), torch.device("cpu"), warmup=3, round_s=0.0,
                            rounds_s=0.0, min_rounds=4)
    assert timing.mean_s == 0.5 and timing.peak_bytes is None
    assert len(seen) == 3 + 3 + bench.calls and bench.calls == 5  # warm-up, calibration, 1 + 4 rounds


def test_record_derives_throughput_speedup_and_bandwidth():
    results: dict = {}
    base = _record(results, "g", "reference", 0.2, flops=4e12, nbytes=2e9, copy_gbps=40.0)
    assert base["speedup"] == 1.0 and base["samples_per_s"] == pytest.approx(40)
    assert base["tflops"] == pytest.approx(20) and base["gbps"] == pytest.approx(10)
    assert base["copy_fraction"] == pytest.approx(0.25)
    fast = _record(results, "g", "ours", 0.05, flops=4e12, peak_tflops=100.0)
    assert fast["speedup"] == pytest.approx(4) and fast["mfu"] == pytest.approx(0.8)
    assert set(results["g"]) == {"reference", "ours"} and "target" not in fast


def test_targets_are_checked_against_the_group():
    results: dict = {}
    _record(results, "train_step", "reference", 1.0, peak=10 * common.GIB)
    _record(results, "train_step", "compile", 0.6)
    ours = _record(results, "train_step", "ours", 0.4, flops=100e12, peak_tflops=500.0, peak=6 * common.GIB)
    values = {t["what"]: (t["value"], t["met"]) for t in ours["targets"]}
    assert values["speedup vs eager reference >= 2.0"] == (pytest.approx(2.5), True)
    assert values["speedup vs torch.compile >= 1.3"] == (pytest.approx(1.5), True)
    assert values["MFU >= 0.45"] == (pytest.approx(0.5), True)
    assert values["peak memory vs eager reference <= 0.7"] == (pytest.approx(0.6), True)
    assert ours["target_met"] is None  # targets are judged on CUDA only

    results = {}
    _record(results, "cross_attention_index", "reference", 1.0)
    _record(results, "cross_attention_index", "sdpa-flash", 0.5)
    _record(results, "cross_attention_index", "sdpa-efficient", 0.7)
    ours = _record(results, "cross_attention_index", "ours", 0.45)
    (target,) = ours["targets"]
    assert target["value"] == pytest.approx(0.5 / 0.45) and target["met"] is False


def test_missing_baseline_leaves_figures_empty():
    results: dict = {}
    info = _record(results, "cls_topk", "ours", 0.1, baseline="materialized")
    assert info["speedup"] is None
    assert info["targets"][0]["value"] is None and info["target_met"] is None


def _results_file(path: Path, device: str, stamp: str, mean: float) -> Path:
    results: dict = {}
    bench = []
    for impl, m in (("reference", 2 * mean), ("ours", mean)):
        info = _record(results, "train_step", impl, m, flops=1e12, peak=common.GIB)
        info["device"] = device
        bench.append({"group": "train_step", "name": f"test_train_step[{impl}]", "param": impl,
                      "stats": {"mean": m}, "extra_info": info})
    bench.append({"group": None, "name": "test_loader_throughput[torch-cpu]", "stats": {"mean": 2.0},
                  "extra_info": {"device": "cpu", "clips_per_s": 16.0, "ratio_to_torch_loader": 1.25}})
    path.write_text(json.dumps({"datetime": stamp, "machine_info": {}, "benchmarks": bench}))
    return path


def test_report_prints_a_markdown_table(tmp_path, capsys):
    path = _results_file(tmp_path / "r.json", "NVIDIA H100 80GB HBM3", "2026-11-25T10:00:00", 0.25)
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 3 and "**NVIDIA H100 80GB HBM3**" in out
    ours = next(line for line in lines if "| ours |" in line)
    assert "250 ms" in ours and "32 samples/s" in ours and "2.00x vs reference" in ours
    assert "speedup vs eager reference >= 2.0: 2" in ours
    loader = next(line for line in lines if "loader" in line)
    assert "16 clips/s" in loader and "1.25x vs torch_loader" in loader
    assert loader.startswith("| loader_throughput |")


def test_report_checks_targets_against_the_whole_group(tmp_path, capsys):
    """torch.compile runs last: its figure reaches ours' targets when the report reads the file. One line
    per target: MET, NOT MET, NOT MEASURED (never run, or its baseline missing); N/A on a CPU run."""
    results: dict = {}
    bench = []
    for impl, mean, peak in (("reference", 1.0, 10), ("ours", 0.4, 8), ("compile", 0.6, None)):
        info = _record(results, "train_step", impl, mean, flops=100e12, peak_tflops=500.0,
                       peak=peak and peak * common.GIB)
        info["device_type"] = "cuda"
        bench.append({"group": "train_step", "name": f"test_train_step[{impl}]", "stats": {"mean": mean},
                      "extra_info": info})
    assert next(t for t in bench[1]["extra_info"]["targets"] if "compile" in t["what"])["value"] is None
    cpu = _record(results, "masking", "ours", 0.1, nbytes=1e9, copy_gbps=20.0)
    bench.append({"group": "masking", "name": "test_masking[ours]", "stats": {"mean": 0.1}, "extra_info": cpu})
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"datetime": "2026-12-01T00:00:00", "benchmarks": bench}))

    assert report.main(["--summary", str(path)]) == 0
    found = [re.match(r"(MET|NOT MET|NOT MEASURED|N/A) +(\S+): (.+?): ", line)
             for line in capsys.readouterr().out.splitlines()]
    status = {f"{m[2]}: {m[3]}": m[1] for m in found if m}
    assert len(status) == sum(len(t) for t in common.TARGETS.values())
    step = "train_step/ours: "
    assert status[step + "speedup vs eager reference >= 2.0"] == "MET"
    assert status[step + "speedup vs torch.compile >= 1.3"] == "MET"  # 0.6 / 0.4 = 1.5, checked at report time
    assert status[step + "MFU >= 0.45"] == "MET"  # 100 TFLOP / 0.4 s / 500 = 0.5
    assert status[step + "peak memory vs eager reference <= 0.7"] == "NOT MET"  # 0.8
    assert status["masking/ours: copy fraction >= 0.8"] == "N/A"  # a CPU run
    assert status["restore/ours: copy fraction >= 0.8"] == "NOT MEASURED"
    assert list(status.values()).count("NOT MEASURED") == len(status) - 5  # the groups with no results


def test_report_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="pytest-benchmark"):
        report.main([str(bad)])


def test_update_readme_rewrites_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    readme.write_text(f"# title\n\nintro\n\n{report.START}\nold table\n{report.END}\n\n## after\n")
    assert report.update_readme(readme, results_dir)
    text = readme.read_text()
    assert "old table" not in text and "No result files" in text and text.endswith("\n\n## after\n")

    _results_file(results_dir / "h100_old.json", "NVIDIA H100", "2026-11-20T10:00:00", 0.5)
    _results_file(results_dir / "h100_new.json", "NVIDIA H100", "2026-11-25T10:00:00", 0.25)
    _results_file(results_dir / "h200.json", "NVIDIA H200", "2026-11-21T10:00:00", 0.2)
    assert report.update_readme(readme, results_dir)
    text = readme.read_text()
    assert "h100_new.json" in text and "h100_old.json" not in text and "h200.json" in text
    assert text.startswith("# title\n\nintro\n\n") and text.count(report.START) == 1
    assert not report.update_readme(readme, results_dir)  # idempotent

    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="perf-table:start"):
        report.update_readme(readme, results_dir)
    assert readme.read_text() == "# no markers\n"


def test_result_stem_names_card_date_and_versions():
    stem = common.result_stem(torch.device("cpu"))
    card, date, torch_v, triton_v = stem.split("_")
    assert card and all(c.isalnum() or c == "-" for c in card)
    assert len(date) == len("20261125-1000") and torch_v.startswith("torch") and triton_v.startswith("triton")


@pytest.mark.slow
def test_bench_files_are_collected_once():
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q", "-p",
                          "no:cacheprovider", "--ignore=benchmarks/bench_loaders.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert out.returncode == 0, out.stdout + out.stderr
    assert "benchmarks/bench_ops.py::test_masking[ours]" in ids
    assert "benchmarks/bench_train_step.py::test_train_step[reference]" in ids
    assert len(ids) == len(set(ids))
    # torch.compile baselines last, the train step's first; the rest in file order
    compiled = [i for i, x in enumerate(ids) if "compile" in x.rsplit("[", 1)[-1]]
    assert compiled == list(range(len(ids) - len(compiled), len(ids)))
    assert ids[compiled[0]] == "benchmarks/bench_train_step.py::test_train_step[compile]"
    assert ids.index("benchmarks/bench_ops.py::test_masking[ours]") < ids.index(
        "benchmarks/bench_train_step.py::test_train_step[reference]")
