#!/usr/bin/env bash
# One-call GPU suite: the test suite with real Triton (TRITON_INTERPRET unset), then the CUDA
# benchmarks (train step, fused ops, loaders), then the markdown report. About 10 minutes on one H100
# with only torch, triton, timm, torchaudio, pytest and pytest-benchmark (no DALI, no xformers, no network).
#
# On a lent GPU machine (a copy of this working tree, `python3` holding torch):
#     bash benchmarks/gpu_suite.sh
# Results go to $OUT when it is set (the device tool brings that folder back), else to
# benchmarks/results/. File names carry the card, the UTC date and the versions:
#     <card>_<YYYYmmdd-HHMM>_torch<version>_triton<version>.json   (pytest-benchmark JSON)
#     <same stem>.md                                                (the printed table)
# plus <stem>_tests.log and <stem>_bench.log (and <stem>_partial.json, this suite's results so far,
# kept only when the run was cut short before pytest-benchmark wrote its JSON). Afterwards, on the development machine: copy the .json
# (and .md) into benchmarks/results/, run `python -m benchmarks.report --update-readme`, and commit
# both (see benchmarks/results/README.md).
#
# Without CUDA it says so, runs the CPU reference-op benchmarks briefly into a temporary folder (or
# $OUT), prints their table and exits 0.
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), TEST_BUDGET_S (200),
# BENCH_BUDGET_S (300; benchmarks after that are skipped so the JSON is still written).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
status=0
# optional wheels carried along for packages the GPU image lacks (e.g. av, soundfile for the data tests
# and the torch loader): put them in .whl/ and name .whl in the device tool's `carry`
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: no CUDA device here; running only the CPU-safe part (reference-op benchmarks)."
    dir="${OUT:-$(mktemp -d)}"
    mkdir -p "$dir"
    stem="$("$PY" -c 'from benchmarks.common import result_stem; print(result_stem())')"
    CROSSMAE_BENCH_BUDGET_S="${BENCH_BUDGET_S:-120}" \
        "$PY" -m pytest benchmarks/bench_ops.py --benchmark-only -q -rs -p no:cacheprovider \
        --benchmark-json="$dir/$stem.json" || status=$?
    "$PY" -m benchmarks.report "$dir/$stem.json" || status=$?
    echo "gpu_suite: CPU-only run finished (status $status); results in $dir"
    exit "$status"
fi

dir="${OUT:-benchmarks/results}"
mkdir -p "$dir"
stem="$("$PY" -c 'from benchmarks.common import result_stem; print(result_stem())')"
"$PY" -c 'import torch, triton; print("gpu_suite:", torch.cuda.get_device_name(), "torch", torch.__version__,
      "triton", triton.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true

echo "== tests (budget ${TEST_BUDGET_S:-200} s) =="
timeout --signal=INT --kill-after=20 "${TEST_BUDGET_S:-200}" env -u TRITON_INTERPRET \
    "$PY" -m pytest tests/ -q -rs -p no:cacheprovider --durations=10 --continue-on-collection-errors 2>&1 | tee "$dir/${stem}_tests.log"
test_status=${PIPESTATUS[0]}
[ "$test_status" -eq 0 ] || { echo "gpu_suite: tests exited with $test_status"; status=$test_status; }

echo "== benchmarks (budget ${BENCH_BUDGET_S:-300} s) =="
# the train step first: it carries most of the targets; then the ops and the patched MAE step; the
# loaders last (they skip without DALI)
CROSSMAE_BENCH_PARTIAL="$dir/${stem}_partial.json" CROSSMAE_BENCH_BUDGET_S="${BENCH_BUDGET_S:-300}" timeout --signal=INT --kill-after=15 \
    "$(( ${BENCH_BUDGET_S:-300} + 60 ))" env -u TRITON_INTERPRET \
    "$PY" -m pytest benchmarks/bench_train_step.py benchmarks/bench_ops.py benchmarks/bench_mae_patch.py \
    benchmarks/bench_loaders.py \
    --benchmark-only -q -rs -p no:cacheprovider --continue-on-collection-errors \
    --benchmark-json="$dir/$stem.json" 2>&1 | tee "$dir/${stem}_bench.log"
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -eq 0 ] || { echo "gpu_suite: benchmarks exited with $bench_status"; status=$bench_status; }

echo "== report =="
if [ -f "$dir/$stem.json" ]; then
    rm -f "$dir/${stem}_partial.json"
    "$PY" -m benchmarks.report "$dir/$stem.json" | tee "$dir/$stem.md"
elif [ -f "$dir/${stem}_partial.json" ]; then
    echo "gpu_suite: the benchmark run was cut short; reporting what it finished (${stem}_partial.json)"
    "$PY" -m benchmarks.report "$dir/${stem}_partial.json" | tee "$dir/$stem.md"
    status=1
else
    echo "gpu_suite: no benchmark results were written"
    status=1
fi
echo "gpu_suite: finished (status $status); results in $dir/$stem.*"
exit "$status"
