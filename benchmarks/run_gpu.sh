#!/usr/bin/env bash
# The whole GPU check in one go, for a lent GPU machine (H200: Python 3.12, torch 2.11,
# Triton 3.6, no network): install, the GPU tests (with the pytest-benchmark
# microbenchmarks), then the full benchmark sweep with what is left of the time budget.
#
#   bash benchmarks/run_gpu.sh                 # results in $OUT if set, else benchmarks/results
#   MPT_KERNELS_GIT_COMMIT=<sha> bash benchmarks/run_gpu.sh   # where the copy has no .git
#
# Settings (environment): TOTAL_BUDGET_S (default 480: the whole script), TEST_TIMEOUT_S
# (default 180: the GPU tests), SKIP_TESTS=1 (the whole budget to the sweep), PYTHON
# (default python3), BENCH_ARGS (extra arguments for `mpt-kernels bench`, e.g.
# "--loss mpt_kl hill_loss"). Wheels under .whl/ (Liger-Kernel, say) are installed first
# when present.
#
# Files written (few, flat: the device tool returns at most 8): run_gpu-<stamp>.log,
# microbench-<stamp>.json, and the sweep's bench-<stamp>-<device>.{json,md},
# -bandwidth.png, -speedup.png.
set -uo pipefail

START=$SECONDS
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-480}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-180}
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
STAMP=$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS"
LOG="$RESULTS/run_gpu-$STAMP.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

elapsed() { echo $((SECONDS - START)); }
section() { echo; echo "=== [$(elapsed) s] $*"; }

section "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu \
    --format=csv 2>&1 || echo "nvidia-smi failed"
"$PYTHON" --version

if compgen -G ".whl/*.whl" > /dev/null; then
    section "wheels from .whl/"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

section "install"
# The CUDA extension must build there (a failure is loud); only for the H200's sm_90, to
# keep the build short (MPT_KERNELS_CUDA_ARCHS overrides).
MPT_KERNELS_CUDA=1 MPT_KERNELS_CUDA_ARCHS=${MPT_KERNELS_CUDA_ARCHS:-90} \
    "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e . || echo "!!! install failed"
"$PYTHON" -m mpt_kernels info || echo "!!! mpt-kernels info failed"

TESTS_STATUS=0
if [ "${SKIP_TESTS:-0}" = "1" ]; then
    section "GPU tests skipped (SKIP_TESTS=1)"
else
    section "GPU tests (pytest -m gpu, at most ${TEST_TIMEOUT_S} s)"
    timeout --signal=INT --kill-after=30 "$TEST_TIMEOUT_S" "$PYTHON" -m pytest -m gpu -q -rfEs -p no:cacheprovider \
        --benchmark-json "$RESULTS/microbench-$STAMP.json" --benchmark-columns=min,median,max,rounds \
        --benchmark-sort=name tests
    TESTS_STATUS=$?
    echo "pytest exit status: $TESTS_STATUS$([ $TESTS_STATUS -eq 124 ] && echo ' (timed out)')"
fi

# The sweep fits its repetitions to --budget-s and stops starting cells at 1.2 x that, so
# 5/6 of what is left (less 30 s for the last cell, the report and the plots).
BENCH_BUDGET_S=$(( (TOTAL_BUDGET_S - $(elapsed) - 30) * 5 / 6 ))
if [ "$BENCH_BUDGET_S" -lt 60 ]; then BENCH_BUDGET_S=60; fi
section "benchmark sweep (budget ${BENCH_BUDGET_S} s; the plan and its estimate follow)"
# shellcheck disable=SC2086
"$PYTHON" -m mpt_kernels bench --budget-s "$BENCH_BUDGET_S" --out "$RESULTS" ${BENCH_ARGS:-}
BENCH_STATUS=$?
echo "bench exit status: $BENCH_STATUS"

section "done: tests $TESTS_STATUS, bench $BENCH_STATUS; files in $RESULTS"
ls -la "$RESULTS"
[ "$TESTS_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ]
