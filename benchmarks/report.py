"""Markdown tables from pytest-benchmark JSON files, and the README's performance table.

    python -m benchmarks.report RESULTS.json [MORE.json ...]
    python -m benchmarks.report --summary RESULTS.json
    python -m benchmarks.report --update-readme [--results-dir benchmarks/results] [--readme README.md]

The first form prints a table per file; the second one line per target of `benchmarks.common.TARGETS`
(MET, NOT MET, NOT MEASURED, or N/A for a CPU run: the targets are the GPU's); the third rewrites
what lies between `<!-- perf-table:start -->` and `<!-- perf-table:end -->` in the README with one
table per device: the newest committed result file of each. Targets are checked against the whole
group as the file holds it, so a baseline measured after ours (torch.compile runs last) counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import TARGETS, check_targets

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
COLUMNS = ["group", "impl", "shape / batch", "mean", "throughput", "TFLOP/s", "GB/s (of copy)", "speedup",
           "peak GiB", "target", "met"]


def load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: not a readable pytest-benchmark JSON file ({e})") from e
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise SystemExit(f"{path}: no 'benchmarks' list: not a pytest-benchmark JSON file")
    recheck_targets(data)
    return data


def _is_cuda(info: dict) -> bool:
    return info.get("device_type", "cpu" if "threads" in info else "cuda") == "cuda"


def recheck_targets(data: dict) -> None:
    """Check every target again against its whole group (this suite's results; others are left alone)."""
    groups: dict[str, dict[str, dict]] = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        if info.get("group") and info.get("impl"):
            groups.setdefault(info["group"], {})[info["impl"]] = info
    for group in groups.values():
        for info in group.values():
            check_targets(info, group, cuda=_is_cuda(info))


def summary(data: dict) -> list[str]:
    """One line per target: MET, NOT MET, NOT MEASURED (with why) or N/A (a CPU run)."""
    found = {(i.get("group"), i.get("impl")): i for i in (b.get("extra_info") or {} for b in data["benchmarks"])}
    lines, counts = [], {}
    for (group, impl), targets in TARGETS.items():
        info = found.get((group, impl))
        checked = {t["what"]: t for t in (info or {}).get("targets", [])}
        for target in targets:
            t = checked.get(target.what)
            if t is None or t.get("value") is None:
                status = "NOT MEASURED"
                why = "not run (skipped, failed or cut short)" if info is None else "a baseline was not measured"
                detail = f"{target.what}: {why}"
            else:
                status = ("N/A" if not _is_cuda(info) else "MET" if t["met"] else "NOT MET")
                detail = f"{target.what}: {_num(t['value'])}" + (" (CPU run; the targets are the GPU's)"
                                                                  if status == "N/A" else "")
            counts[status] = counts.get(status, 0) + 1
            lines.append(f"{status:<13} {group}/{impl}: {detail}")
    order = ("MET", "NOT MET", "NOT MEASURED", "N/A")
    lines.append("targets: " + ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
                 + f" (of {sum(counts.values())})")
    return lines


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"


def _time(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _met(value: bool | None) -> str:
    return {True: "yes", False: "no"}.get(value, "n/a")


def row(bench: dict) -> list[str]:
    """One table row from one benchmark entry (this suite's extra_info, or any other benchmark's)."""
    info = bench.get("extra_info") or {}
    mean = (bench.get("stats") or {}).get("mean", info.get("mean_s"))
    rates = [(k[: -len("_per_s")], v) for k, v in info.items() if k.endswith("_per_s") and v is not None]
    unit, rate = rates[0] if rates else ("calls", 1 / mean if mean else None)
    speedup, baseline = info.get("speedup"), info.get("baseline")
    if speedup is None:  # other benchmarks' convention: ratio_to_<baseline>
        baseline, speedup = next(((k[len("ratio_to_"):], v) for k, v in info.items()
                                  if k.startswith("ratio_to_") and v is not None), (None, None))
    gbps = ""
    if info.get("gbps") is not None:
        frac = info.get("copy_fraction")
        gbps = _num(info["gbps"]) + (f" ({frac:.0%})" if frac is not None else "")
    tflops = _num(info.get("tflops"))
    if info.get("mfu") is not None:
        tflops += f" (MFU {info['mfu']:.0%})"
    targets = "; ".join(f"{t['what']}: {_num(t['value'])}" if t.get("value") is not None else t["what"]
                        for t in info.get("targets", []))
    shape = info.get("shape") or (f"batch {info['batch']}" if "batch" in info else "")
    impl = info.get("impl") or bench.get("param") or bench.get("name", "")
    if info.get("note"):
        impl = f"{impl} ({info['note']})"
    speedup_text = ""
    if speedup is not None:
        speedup_text = f"{speedup:.2f}x" + (f" vs {baseline}" if baseline else "")
    group = bench.get("group") or info.get("group") or bench.get("name", "").split("[")[0].removeprefix("test_")
    return [group, str(impl), shape, _time(mean),
            f"{_num(rate)} {unit}/s" if rate else "", tflops, gbps, speedup_text,
            _num(info.get("peak_gib")), targets, _met(info.get("target_met")) if "target_met" in info else ""]


def describe(data: dict) -> str:
    """Device, date and versions of a result file."""
    infos = [b.get("extra_info") or {} for b in data["benchmarks"]]
    first = next((i for i in infos if i.get("group")), infos[0] if infos else {})
    device = first.get("device") or (data.get("machine_info") or {}).get("cpu", {}).get("brand_raw", "unknown")
    parts = [f"**{device}**", (data.get("datetime") or "")[:16].replace("T", " ")]
    parts += [f"{k} {first[k]}" for k in ("torch", "triton", "cuda") if first.get(k)]
    if data.get("partial"):
        parts.append("partial run (cut short)")
    return ", ".join(p for p in parts if p)


def table(data: dict) -> str:
    order: dict[str, int] = {}
    for b in data["benchmarks"]:
        order.setdefault(b.get("group") or "", len(order))
    benches = sorted(data["benchmarks"], key=lambda b: order[b.get("group") or ""])  # groups together, run order
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row(b)) + " |" for b in benches]
    return "\n".join(lines)


def newest_per_device(files: list[Path]) -> list[tuple[Path, dict]]:
    """The newest result file of each device, devices in name order."""
    best: dict[str, tuple[str, Path, dict]] = {}
    for path in files:
        data = load(path)
        infos = [b.get("extra_info") or {} for b in data["benchmarks"]]
        device = next((i["device"] for i in infos if i.get("device")), path.stem.split("_")[0])
        stamp = data.get("datetime") or ""
        if device not in best or stamp > best[device][0]:
            best[device] = (stamp, path, data)
    return [(p, d) for _, p, d in (best[k] for k in sorted(best))]


def readme_section(results_dir: Path) -> str:
    files = sorted(results_dir.glob("*.json"))
    if not files:
        return ("No result files are committed under `benchmarks/results/` yet: run `bash benchmarks/gpu_suite.sh` "
                "on a GPU (see `benchmarks/results/README.md`).")
    blocks = []
    for path, data in newest_per_device(files):
        blocks.append(f"{describe(data)} (`{path.as_posix()}`)\n\n{table(data)}")
    return "\n\n".join(blocks)


def update_readme(readme: Path, results_dir: Path) -> bool:
    """Rewrite the marked section; True when the file changed."""
    text = readme.read_text(encoding="utf-8")
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme}: needs exactly one '{START}' line followed by one '{END}' line")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    new = f"{head}{START}\n{readme_section(results_dir)}\n{END}{tail}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the README's performance table")
    parser.add_argument("--summary", action="store_true", help="one MET / NOT MET line per target instead of tables")
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    if args.update_readme:
        changed = update_readme(args.readme, args.results_dir)
        print(f"{args.readme}: performance table {'updated' if changed else 'unchanged'}")
        return 0
    if not args.files:
        parser.error("give result files, or --update-readme")
    for path in args.files:
        data = load(path)
        if args.summary:
            print(f"Targets, {describe(data)} (`{path}`):")
            print("\n".join(summary(data)))
        else:
            print(f"{describe(data)} (`{path}`)\n\n{table(data)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
