#!/usr/bin/env bash
# One-call GPU suite, sized for one command of the device tool (10 minutes at most): correctness tests on
# the GPU, then the benchmarks, then the report and one MET / NOT MET line per target. Runs on the bare GPU
# image (torch, triton, timm, torchaudio, pytest, pytest-benchmark; no DALI, xformers, PyAV, soundfile;
# no network): whatever needs those is skipped with the reason.
#
#     bash benchmarks/gpu_suite.sh            # from a copy of this working tree, `python3` holding torch
#
# Phases, in order; each is bounded by `timeout`, interpreter start-ups included (worst case, seconds):
#   0. versions, card and the result files' stem                                 30 (+5 kill grace)
#   1. tests on the GPU (markers `gpu or core`): the CUDA-graph train step first (test_train_cuda),
#      then the kernels' correctness tests, cheapest first (masking, restore, top-k, the model with the
#      fused ops, the MAE patch, cross-attention) and TrainStep's fallback. Cold Triton compiles
#      dominate: every autotune config of every kernel, per dtype (fp32, fp16, bf16) and per length
#      specialisation, about 1-3 s each; on the order of a hundred compiles (150-450 s, earlier
#      estimates said 15-55 s per autotuned kernel), so this phase is cut at TEST_BUDGET_S.   200 (+10)
#   2. benchmarks, one pytest session: the op benchmarks (eager baselines, SDPA backends, ours), the
#      MAE step with and without kernels.patch_mae, the CrossMAE train step (eager reference, fused ops,
#      CUDA graph), then every torch.compile baseline (the train step's first). Each benchmark starts
#      only while its worst case (`WORST_CASE_S` in its module: 20-60 s for an op, 45-90 s for an eager
#      step, 120-180 s for compiling a ViT-B step) is still left;
#      results so far are kept in <stem>_partial.json.           what phases 0-1 left of SUITE_BUDGET_S (+10)
#   3. report: the table and one line per target (MET, NOT MET, NOT MEASURED)              30 (+5)
# Phases 0-2 stop by SUITE_BUDGET_S (default 480) plus a kill grace; the whole script's worst case is
# SUITE_BUDGET_S + 10 + 35 = 525 s, so pass the device tool timeout_s=600.
#
# Results go to $OUT when it is set (the device tool brings that folder back), else benchmarks/results/:
#     <stem>.json   pytest-benchmark JSON (or <stem>_partial.json, the results so far, when phase 2 was cut)
#     <stem>.md     the table and the target summary
#     <stem>_tests.log, <stem>_bench.log
# where <stem> is <card>_<YYYYmmdd-HHMM UTC>_torch<version>_triton<version>. Then, on the development
# machine: copy the .json and .md into benchmarks/results/, run `python -m benchmarks.report
# --update-readme`, and commit them (benchmarks/results/README.md).
#
# Without CUDA it says so, runs the CPU reference-op benchmarks briefly into a temporary folder (or
# $OUT), prints their table and summary (targets N/A: they are the GPU's) and exits 0.
#
# Environment: PYTHON (default .venv/bin/python if present, else python3); SUITE_BUDGET_S (480);
# TEST_BUDGET_S (200); GPU_SUITE_FORCE=1 takes the GPU path without CUDA (a dry run of the phases,
# budgets and reports on the CPU); optional wheels in .whl/ (e.g. av and soundfile, for the data tests)
# are installed first: name .whl in the device tool's `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
status=0
suite_budget="${SUITE_BUDGET_S:-480}"
if compgen -G ".whl/*.whl" >/dev/null; then
    timeout -k 5 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# phase 0: the card, versions and stem in one interpreter start
info="$(timeout -k 5 30 "$PY" -c '
import torch, triton
from benchmarks.common import result_stem
cuda = torch.cuda.is_available()
print(result_stem())
print("cuda" if cuda else "cpu")
print((torch.cuda.get_device_name() if cuda else "no CUDA device"), "| torch", torch.__version__,
      "| triton", triton.__version__, "| CUDA", torch.version.cuda)
')" || { echo "gpu_suite: could not import torch and triton with $PY"; exit 2; }
stem="$(sed -n 1p <<<"$info")"; kind="$(sed -n 2p <<<"$info")"
echo "gpu_suite: $(sed -n 3p <<<"$info")"

if [ "$kind" != cuda ] && [ "${GPU_SUITE_FORCE:-0}" != 1 ]; then
    echo "gpu_suite: no CUDA device here; running only the CPU-safe part (reference-op benchmarks)."
    dir="${OUT:-$(mktemp -d)}"
    mkdir -p "$dir"
    CROSSMAE_BENCH_BUDGET_S="${BENCH_BUDGET_S:-120}" \
        "$PY" -m pytest benchmarks/bench_ops.py --benchmark-only -q -rs -p no:cacheprovider \
        --benchmark-json="$dir/$stem.json" || status=$?
    { "$PY" -m benchmarks.report "$dir/$stem.json" && "$PY" -m benchmarks.report --summary "$dir/$stem.json"; } \
        | tee "$dir/$stem.md" || status=$?
    echo "gpu_suite: CPU-only run finished (status $status); results in $dir"
    exit "$status"
fi

dir="${OUT:-benchmarks/results}"
mkdir -p "$dir"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true

test_budget=$(( suite_budget - SECONDS - 10 - 120 ))  # leave the benchmarks at least 120 s
[ "$test_budget" -gt "${TEST_BUDGET_S:-200}" ] && test_budget="${TEST_BUDGET_S:-200}"
[ "$test_budget" -lt 30 ] && test_budget=30
echo "== phase 1: tests on the GPU (budget $test_budget s) =="
# TRITON_INTERPRET unset: the kernels compile for the GPU (tests/conftest.py sets it only without CUDA)
# Most important first: the CUDA-graph step, then the kernels with the fewest compiles, cross-attention
# (the most autotuned variants) last; any other kernel test file after these.
files=(tests/test_train_cuda.py tests/test_kernel_masking.py tests/test_kernel_restore.py tests/test_kernel_topk.py
       tests/test_model_ops.py tests/test_kernel_mae_patch.py tests/test_kernel_cross_attention.py tests/test_train_step.py)
for f in tests/test_kernel_*.py; do [[ " ${files[*]} " == *" $f "* ]] || files+=("$f"); done
timeout --signal=INT --kill-after=10 "$test_budget" env -u TRITON_INTERPRET \
    "$PY" -m pytest "${files[@]}" -m "gpu or core" -q -rfEs -p no:cacheprovider --durations=15 2>&1 \
    | tee "$dir/${stem}_tests.log"
test_status=${PIPESTATUS[0]}
tests_line="$(grep -E '[0-9]+ (passed|failed|skipped|error)|no tests ran' "$dir/${stem}_tests.log" | tail -n 1)"
case "$test_status" in
    0) ;;
    124|137) tests_line="cut short at $test_budget s: ${tests_line:-nothing finished}"; status=1 ;;
    *) status=1 ;;
esac

bench_budget=$(( suite_budget - SECONDS ))
echo "== phase 2: benchmarks (budget $bench_budget s) =="
bench_line="not run: no time left"
if [ "$bench_budget" -ge 30 ]; then
    # the session's own guard stops starting benchmarks 20 s before the hard limit (start-up, JSON)
    CROSSMAE_BENCH_PARTIAL="$dir/${stem}_partial.json" CROSSMAE_BENCH_BUDGET_S=$(( bench_budget - 20 )) \
        timeout --signal=INT --kill-after=10 "$bench_budget" env -u TRITON_INTERPRET \
        "$PY" -m pytest benchmarks/bench_ops.py benchmarks/bench_mae_patch.py benchmarks/bench_train_step.py \
        benchmarks/bench_loaders.py \
        --benchmark-only -q -rfEs -p no:cacheprovider --benchmark-json="$dir/$stem.json" 2>&1 \
        | tee "$dir/${stem}_bench.log"
    bench_status=${PIPESTATUS[0]}
    bench_line="$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$dir/${stem}_bench.log" | tail -n 1)"
    [ "$bench_status" -eq 0 ] || { bench_line="exit $bench_status: $bench_line"; status=1; }
fi

echo "== phase 3: report =="
results="$dir/$stem.json"
if [ -f "$results" ]; then
    rm -f "$dir/${stem}_partial.json"
elif [ -f "$dir/${stem}_partial.json" ]; then
    results="$dir/${stem}_partial.json"
    bench_line="cut short; reporting what finished (${stem}_partial.json): $bench_line"
    status=1
else
    results=""
    status=1
fi
if [ -n "$results" ]; then
    timeout -k 5 30 "$PY" -c '
import sys
from benchmarks import report
data = report.load(sys.argv[1])
print(f"{report.describe(data)}\n\n{report.table(data)}\n")
print("\n".join(report.summary(data)))
' "$results" > "$dir/$stem.md" || status=1
else
    echo "no benchmark results were written" > "$dir/$stem.md"
fi
cat "$dir/$stem.md"
echo
echo "== gpu_suite summary =="
echo "tests:      ${tests_line:-no result line (see ${stem}_tests.log)}"
echo "benchmarks: ${bench_line:-no result line (see ${stem}_bench.log)}"
grep -E '^(MET|NOT MET|NOT MEASURED|N/A) ' "$dir/$stem.md"
grep -E '^targets: ' "$dir/$stem.md"
echo "gpu_suite: finished in $SECONDS s (status $status); results in $dir/$stem.*"
exit "$status"
