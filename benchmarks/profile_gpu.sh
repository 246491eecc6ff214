#!/usr/bin/env bash
# Kernel profile on a lent GPU machine: the per-kernel table of profile_kernels.py, then
# Nsight Compute (speed of light, memory, occupancy, warp stalls) of one forward+backward
# per target. Output in $OUT (or benchmarks/results). TARGETS overrides the ncu targets.
set -uo pipefail
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
MPT_KERNELS_CUDA=1 MPT_KERNELS_CUDA_ARCHS=${MPT_KERNELS_CUDA_ARCHS:-90} \
    python3 -m pip install -q --no-build-isolation --no-deps -e . || echo "!!! install failed"
python3 benchmarks/profile_kernels.py ${PROFILE_ARGS:-} 2>&1 | tee "$RESULTS/profile.txt"
for target in ${TARGETS:-triton:mpt_kl:32768 cuda:mpt_kl:32768 triton:hill_loss:32768 cuda:hill_loss:32768}; do
    echo "=== ncu $target"
    timeout 120 ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
        -k 'regex:mpt|multilabel|softmax' -c 4 \
        python3 benchmarks/profile_kernels.py --ncu-target "$target" > "$RESULTS/ncu-${target//:/-}.txt" 2>&1
    grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Size|Grid Size|Executed Ipc A|L2 Hit|Stall|Issue Slots Busy|Waves Per SM" \
        "$RESULTS/ncu-${target//:/-}.txt" | head -80
done
