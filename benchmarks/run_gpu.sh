#!/usr/bin/env bash
# The whole GPU check in one go, for a lent GPU machine (H200: Python 3.12, torch 2.11,
# Triton 3.6, no network): install, the GPU tests (with the pytest-benchmark
# microbenchmarks), then the full benchmark sweep with what is left of the time budget.
#
#   bash benchmarks/run_gpu.sh                 # results in $OUT if set, else benchmarks/results
#   MPT_KERNELS_GIT_COMMIT=<sha> bash benchmarks/run_gpu.sh   # where the copy has no .git
#
# Settings (environment): TOTAL_BUDGET_S (default 480: the whole script), TEST_TIMEOUT_S
# (default 200: the small-shape tests), GPU_TIMEOUT_S, GPU_WORKERS, HUGE_TIMEOUT_S, MICRO_TIMEOUT_S, SANITIZE=0 (no
# compute-sanitizer), SANITIZE_K (its pytest -k), SANITIZE_TIMEOUT_S, TEST_WORKERS,
# SKIP_TESTS=1 (the whole budget to the sweep), SKIP_MICRO=1, SKIP_BENCH=1, PROFILE=1 (profile_kernels.py first;
# PROFILE_ARGS, CPROFILE_TARGETS, PROFILE_TILES="4096:8 8192:8 ..." for the multi-label tiles,
# PROFILE_CHUNKS="none 4096 8192 ..." for the Triton softmax's chunked rows,
# PROFILE_SHARED_ROWS="0 device ..." for the CUDA softmax's rows kept in shared memory), PYTHON
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
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-200}
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

if [ "${PROFILE:-0}" = "1" ]; then
    section "kernel profile (benchmarks/profile_kernels.py)"
    "$PYTHON" benchmarks/profile_kernels.py ${PROFILE_ARGS:-} 2>&1 | grep -v Warning | tee "$RESULTS/profile-$STAMP.txt"
    # the multi-label kernel's launch shapes (ELEMENTS[:WARPS] each), timed one after another
    for tile in ${PROFILE_TILES:-}; do
        section "kernel profile, multi-label tile $tile"
        "$PYTHON" benchmarks/profile_kernels.py --loss hill_loss splc_loss --backend triton \
            --multilabel-tile "$tile" 2>&1 | grep -v Warning | tee -a "$RESULTS/profile-$STAMP.txt"
    done
    # the Triton softmax forward's chunked rows (classes per chunk, or none), one after another
    for chunk in ${PROFILE_CHUNKS:-}; do
        section "kernel profile, Triton softmax chunks of $chunk classes"
        "$PYTHON" benchmarks/profile_kernels.py --loss mpt_kl mpt_lm --backend triton \
            --triton-chunk "$chunk" 2>&1 | grep -v Warning | tee -a "$RESULTS/profile-$STAMP.txt"
    done
    # the CUDA softmax forward's long rows in shared memory (bytes per row, or device), one after another
    for bytes in ${PROFILE_SHARED_ROWS:-}; do
        section "kernel profile, CUDA softmax rows in shared memory: $bytes"
        "$PYTHON" benchmarks/profile_kernels.py --loss mpt_kl mpt_lm --backend cuda \
            --cuda-shared-row-bytes "$bytes" 2>&1 | grep -v Warning | tee -a "$RESULTS/profile-$STAMP.txt"
    done
    for target in ${CPROFILE_TARGETS:-triton:mpt_kl:8192}; do
        section "host time by function: $target"
        "$PYTHON" benchmarks/profile_kernels.py --cprofile "$target" 2>&1 | head -${CPROFILE_LINES:-45}
    done
fi

TESTS_STATUS=0
if [ "${SKIP_TESTS:-0}" = "1" ]; then
    section "GPU tests skipped (SKIP_TESTS=1)"
else
    # Every test runs on the GPU here (the softmax and multi-label suites, properties and
    # determinism pick the CUDA device when there is one), spread over worker processes;
    # the N*C > 2^31 tests need tens of GB each, so they run alone afterwards, and the
    # pytest-benchmark microbenchmarks run alone too (no timing beside other work).
    HUGE="beyond_int32 or int64_offsets"
    section "small-shape tests on the GPU, in parallel (at most ${TEST_TIMEOUT_S} s)"
    timeout --signal=INT --kill-after=30 "$TEST_TIMEOUT_S" "$PYTHON" -m pytest -q -rfE -p no:cacheprovider \
        -n "${TEST_WORKERS:-12}" --timeout 240 --benchmark-disable -m "not gpu" tests
    TESTS_STATUS=$?
    echo "pytest exit status: $TESTS_STATUS$([ $TESTS_STATUS -eq 124 ] && echo ' (timed out)')"

    # the gpu-marked tests hold up to ~60 GB each (N = 4096, C = 131072, float32, with
    # the reference's intermediates): few workers
    section "realistic-size GPU tests, ${GPU_WORKERS:-2} workers (at most ${GPU_TIMEOUT_S:-200} s)"
    timeout --signal=INT --kill-after=30 "${GPU_TIMEOUT_S:-200}" "$PYTHON" -m pytest -q -rfE -p no:cacheprovider \
        -n "${GPU_WORKERS:-2}" --timeout 240 --benchmark-disable -m gpu -k "not ($HUGE)" \
        --ignore tests/test_microbenchmarks.py tests
    STATUS=$?; echo "pytest exit status: $STATUS"; [ $STATUS -ne 0 ] && TESTS_STATUS=$STATUS

    section "N*C > 2^31 tests, alone (at most ${HUGE_TIMEOUT_S:-150} s)"
    timeout --signal=INT --kill-after=30 "${HUGE_TIMEOUT_S:-150}" "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider \
        -m gpu -k "$HUGE" tests
    STATUS=$?; echo "pytest exit status: $STATUS"; [ $STATUS -ne 0 ] && TESTS_STATUS=$STATUS

    if [ "${SKIP_MICRO:-0}" != "1" ]; then
    section "microbenchmarks (pytest-benchmark)"
    timeout --signal=INT --kill-after=30 "${MICRO_TIMEOUT_S:-90}" "$PYTHON" -m pytest -q -rfE -p no:cacheprovider \
        --benchmark-json "$RESULTS/microbench-$STAMP.json" --benchmark-columns=min,median,max,rounds \
        --benchmark-sort=name tests/test_microbenchmarks.py
    STATUS=$?; echo "pytest exit status: $STATUS"; [ $STATUS -ne 0 ] && TESTS_STATUS=$STATUS
    fi
fi

if [ "${SKIP_TESTS:-0}" != "1" ] && [ "${SANITIZE:-1}" = "1" ] && command -v compute-sanitizer > /dev/null; then
    # memcheck over the bad-input and edge-case tests of both backends (small shapes:
    # memcheck runs kernels far slower)
    section "compute-sanitizer memcheck (at most ${SANITIZE_TIMEOUT_S:-150} s)"
    timeout --signal=INT --kill-after=30 "${SANITIZE_TIMEOUT_S:-150}" compute-sanitizer --tool memcheck \
        --error-exitcode 97 --print-limit 20 --target-processes all \
        "$PYTHON" -m pytest -q -rfE -p no:cacheprovider -p no:xdist --benchmark-disable \
        -k "${SANITIZE_K:-mpt_loss_shapes or non_contiguous or out_of_range or poisoned or masked or nan or extreme or multilabel_shapes or empty or bad or cpu_tensors}" \
        tests/test_cuda_backend.py tests/test_triton_softmax.py tests/test_triton_multilabel.py tests/test_validation.py
    STATUS=$?
    echo "compute-sanitizer exit status: $STATUS$([ $STATUS -eq 97 ] && echo ' (memcheck found errors)')"
    [ $STATUS -ne 0 ] && TESTS_STATUS=$STATUS
fi

# The sweep fits its repetitions to --budget-s and stops starting cells at 1.2 x that, so
# 5/6 of what is left (less 30 s for the last cell, the report and the plots).
BENCH_STATUS=0
if [ "${SKIP_BENCH:-0}" = "1" ]; then
    section "benchmark sweep skipped (SKIP_BENCH=1)"
else
BENCH_BUDGET_S=$(( (TOTAL_BUDGET_S - $(elapsed) - 30) * 5 / 6 ))
if [ "$BENCH_BUDGET_S" -lt 60 ]; then BENCH_BUDGET_S=60; fi
section "benchmark sweep (budget ${BENCH_BUDGET_S} s; the plan and its estimate follow)"
# shellcheck disable=SC2086
"$PYTHON" -m mpt_kernels bench --budget-s "$BENCH_BUDGET_S" --out "$RESULTS" ${BENCH_ARGS:-}
BENCH_STATUS=$?
echo "bench exit status: $BENCH_STATUS"
fi

section "done: tests $TESTS_STATUS, bench $BENCH_STATUS; files in $RESULTS"
ls -la "$RESULTS"
[ "$TESTS_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ]
