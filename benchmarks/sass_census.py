"""Instructions per element of the kernels in sm_90 machine code, without a GPU.

The bf16 multi-label kernels issue instructions faster than DRAM can feed them only up
to a point (the H200 run: 76% of the issue rate at 60% of the copy bandwidth), so their
instruction count per element is a speed figure that any machine can measure. This script
lowers, for sm_90:

* the Triton kernel (``--triton``): the flat bf16-logits / bool-targets forward that
  writes the gradient and the tile sums, as ``loss.backward()`` runs it, through the same
  ahead-of-time compile as tests/sm90_compile.py (Triton's own ptxas, 16-byte alignment
  specialised). Its SASS holds a full-tile and a tail copy of the tile's elements, so
  instructions per element = all of them / (2 x elements per thread);
* the CUDA kernel (``--cuda``): csrc/multilabel_loss.cu through nvcc, the bf16/uint8 forward.
  One function holds both losses (a runtime branch) and both load paths (16-byte and
  scalar), so only the float-pipe instructions are divided, by 2 losses x 8 elements.

The softmax family (``--softmax``) is counted per loop: the instructions of each loop
body of the forward that writes the gradient, for ``mpt_loss`` (KL, both sources, the
new-class bias, focus "ref_correct", no label smoothing; bf16), divided by the elements
a thread handles per iteration:

* Triton: ``_mpt_loss_kernel`` as it launches for C = 32768 (its four loops: statistics
  and gradient, old and new classes);
* CUDA: the chunk walk of softmax_loss.cu (``chunk_statistics``, then ``slot_gradient``
  and the store) in a census kernel whose options are constants, so that the compiler
  keeps that configuration's code only; the shipped kernel reads the options at run
  time, and adds a branch per slot and option to these counts.

    python benchmarks/sass_census.py            # all
    python benchmarks/sass_census.py --triton   # needs triton with its bundled ptxas
    python benchmarks/sass_census.py --cuda     # needs nvcc
    python benchmarks/sass_census.py --softmax  # both backends' softmax loops

These are static counts (each instruction once, whatever runs it), not a timing.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT_PIPE = ("FMUL", "FFMA", "FADD", "FSEL", "FMNMX", "FSETP", "MUFU")

TRITON_SCRIPT = r'''
from mpt_kernels.backends import triton_multilabel as TM
FLOATS = ["lamb", "margin", "gamma", "gamma_log2e", "flip_logit", "grad_scale"]
types = dict(logits_ptr="*bf16", targets_ptr="*u8", upstream_ptr="*bf16", loss_ptr="*fp32", grad_ptr="*bf16",
             numel="i64", **{name: "fp32" for name in FLOATS})
aligned = ["logits_ptr", "targets_ptr", "upstream_ptr", "loss_ptr", "grad_ptr", "numel"]
block = TM.TILE_ELEMENTS
warps = TM._num_warps(block)
for splc in (False, True):
    sass = compile_kernel(TM._multilabel_kernel, types, dict(
        IS_SPLC=splc, FOCAL=True, WRITE_ELEMENT_LOSS=False, WRITE_TILE_SUMS=True, WRITE_GRAD=True, UPSTREAM_SCALAR=False,
        UPSTREAM_PER_ELEMENT=False, FLAT=True, BLOCK_ROWS=1, BLOCK_COLS=block), warps, aligned=aligned)
    print("@@", "splc" if splc else "hill", 2 * block // (32 * warps))
    print(sass)
print("compiled")
'''


TRITON_SOFTMAX_SCRIPT = r'''
from mpt_kernels.backends import triton_softmax as TS
import triton.language as tl
block, warps = TS._launch_config(32768, 2)
FLOATS = ["new_class_bias", "label_smoothing", "inv_tau", "kl_scale", "alpha", "beta", "ce_weight", "old_weight",
          "new_weight"]
types = dict(z_ptr="*bf16", target_ptr="*i64", old_ptr="*bf16", new_ptr="*bf16", bias_ptr="*fp32",
             rows_ptr="*fp32", grad_ptr="*bf16", stats_ptr="*fp32", inv_count_ptr="*fp32", sync_ptr="*i32",
             records_ptr="*fp32", **{name: "fp32" for name in FLOATS})
aligned = ["z_ptr", "old_ptr", "new_ptr", "grad_ptr", "z_row_stride", "old_row_stride", "new_row_stride",
           "num_classes", "num_old", "num_read", "split"]
for chunks in (0, 4):  # one program per row; chunked rows (C = 32768 in chunks of 8192)
    sass = compile_kernel(TS._mpt_loss_kernel, types, dict(
        HAS_CE=True, HAS_OLD=True, HAS_NEW=True, IS_KL=True, FOCUS_REF=True, FOCUS_STUDENT=False,
        BIAS=TS.BIAS_NEW_CLASSES, MEAN=True, WRITE_GRAD=True, BLOCK_C=block, CHUNKS=chunks), warps,
        aligned=aligned, maxnreg=TS.MAX_REGISTERS)
    print("@@", chunks, block // (32 * warps))
    print(sass)
print("compiled")
'''

# The CUDA chunk walk for the headline options, as constants (see the module docstring).
CUDA_SOFTMAX_CENSUS = r'''
#include <cuda_bf16.h>
#include "softmax_math.cuh"
using namespace mpt;
constexpr int VEC = 8, NV = kSlotsPerThread;

__device__ SoftmaxRowConsts headline(int C, int K, float b, float inv_tau) {
  SoftmaxRowParams p{};
  p.num_classes = C; p.num_old_classes = K; p.has_ce = true; p.has_old = true; p.has_new = true; p.kl = true;
  p.focus = kFocusRefCorrect; p.ce_weight = 1.0f; p.old_weight = 1.0f; p.new_weight = 1.0f; p.label_smoothing = 0.0f;
  p.new_class_bias = b; p.inv_tau = inv_tau; p.kl_scale = 1.0f; p.alpha = 1.0f; p.beta = 5.0f;
  return SoftmaxRowConsts(p, false);
}

__device__ void unpack(const uint4& raw, float (&out)[VEC]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

struct Slots {
  const uint4 *z, *r_old, *r_new;
  RowLayout layout;
  int chunk;
  __device__ SlotValues<VEC> operator()(int k) const {
    SlotValues<VEC> v;
    const int s = (chunk * NV + k) * blockDim.x + threadIdx.x;
    v.present = s < layout.slots;
    if (!v.present) return v;
    v.span = layout.span(s);
    unpack(z[s], v.z);
    if (v.span.old_segment) unpack(r_old[s], v.r_old);
    unpack(r_new[s], v.r_new);
    return v;
  }
};

extern "C" __global__ void __launch_bounds__(kMaxRowThreads) census_statistics(
    const uint4* z, const uint4* r_old, const uint4* r_new, int C, int K, float b, float inv_tau, int y, int chunks,
    SoftmaxThreadState* out) {
  const SoftmaxRowConsts c = headline(C, K, b, inv_tau);
  SoftmaxThreadState t = thread_state_empty();
  for (int chunk = 0; chunk < chunks; ++chunk) chunk_statistics<VEC, NV>(t, c, Slots{z, r_old, r_new, RowLayout(C, K, VEC), chunk}, y);
  out[threadIdx.x] = t;
}

extern "C" __global__ void __launch_bounds__(kMaxRowThreads) census_gradient(
    const uint4* z, const uint4* r_old, const uint4* r_new, int C, int K, float b, float inv_tau, int y, int chunks,
    const SoftmaxRowStats* stats, uint4* grad) {
  const SoftmaxRowConsts c = headline(C, K, b, inv_tau);
  const SoftmaxRowStats r = *stats;
  for (int chunk = chunks - 1; chunk >= 0; --chunk) {
    const Slots slots{z, r_old, r_new, RowLayout(C, K, VEC), chunk};
    for (int k = 0; k < NV; ++k) {
      const SlotValues<VEC> v = slots(k);
      if (!v.present) break;
      float g[VEC];
      slot_gradient(c, r, 1.0f, y, v, g);
      uint32_t w[4];
      for (int i = 0; i < 4; ++i) {
        const __nv_bfloat162 pair = __floats2bfloat162_rn(g[2 * i], g[2 * i + 1]);
        memcpy(&w[i], &pair, 4);
      }
      grad[(chunk * NV + k) * blockDim.x + threadIdx.x] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}
'''


def loop_bodies(sass: str) -> list:
    """(first, last, opcodes) of every loop body (a branch back to an earlier address), by instruction index."""
    lines = [line for line in sass.split("\n") if re.search(r"/\*[0-9a-f]{4}\*/", line)]
    address = [int(re.search(r"/\*([0-9a-f]{4})\*/", line).group(1), 16) for line in lines]
    loops = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA (?:`\(.*?\)\s*)?0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < address[i]:
            loops.append((address.index(int(target.group(1), 16)), i))
    return [(first, last, opcodes("\n".join(lines[first:last + 1]))) for first, last in loops]


def opcodes(sass: str) -> list:
    """The opcode of every instruction (predicates and modifiers dropped)."""
    return re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)", sass)


def report(name: str, ops: list, per: int, note: str) -> None:
    counts = collections.Counter(ops)
    float_ops = sum(counts[op] for op in FLOAT_PIPE)
    print(f"{name}: {len(ops)} instructions; per element: {len(ops) / per:.1f} all, "
          f"{float_ops / per:.1f} float-pipe, {counts['MUFU'] / per:.2f} MUFU ({note})")
    print("    " + ", ".join(f"{op} {n / per:.2f}" for op, n in counts.most_common(12)))


def run_triton_script(script: str) -> str:
    """stdout of ``script`` after the tests' ahead-of-time compile prelude, run without the interpreter."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from sm90_compile import PRELUDE

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", PRELUDE + script], env=env, capture_output=True, text=True,
                          check=True).stdout


def cuda_sass(source: str) -> tuple:
    """(SASS, ptxas's report) of a .cu file compiled for sm_90 against csrc/."""
    import triton  # for its bundled cuobjdump

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "census.cubin")
        build = subprocess.run(["nvcc", "-std=c++17", "-O3", "-I", os.path.join(ROOT, "csrc"), "-cubin",
                                "-arch=sm_90", "-Xptxas", "-v", "-o", cubin, source],
                               capture_output=True, text=True, check=True)
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return sass, build.stderr


def triton_census() -> None:
    out = run_triton_script(TRITON_SCRIPT)
    import triton

    print(f"Triton {triton.__version__}, sm_90, bf16 logits, bool targets, forward with gradient and tile sums")
    for part in out.split("@@ ")[1:]:
        header, sass = part.split("\n", 1)
        loss, per = header.split()
        report(f"  triton {loss}", opcodes(sass), int(per), "full and tail copies of a tile")


def cuda_census() -> None:
    sass, ptxas = cuda_sass(os.path.join(ROOT, "csrc", "multilabel_loss.cu"))
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"nvcc ({version}), sm_90, bf16 logits, uint8 (bool) targets, forward kernel")
    wanted = "multilabel_loss_kernelINS_8BFloat16ENS_5UInt8ELi8ELb1E"  # VEC 8, kFocal (γ != 0)
    for function in re.split(r"\n\s+Function : ", sass)[1:]:
        if wanted in function.split("\n", 1)[0]:
            ops = opcodes(function)
            counts = collections.Counter(ops)
            float_ops = sum(counts[op] for op in FLOAT_PIPE)
            print(f"  cuda hill+splc: {len(ops)} instructions in the kernel; {float_ops / 16:.1f} float-pipe and "
                  f"{counts['MUFU'] / 16:.2f} MUFU per element (both losses, 8 elements each)")
    registers = sorted(set(re.findall(r"Used (\d+) registers", ptxas)), key=int)
    print(f"  registers per thread across the file's kernels: {', '.join(registers)}")


def slots_per_thread() -> int:
    """kSlotsPerThread of csrc/launchers.h: the census kernel's slots per iteration."""
    with open(os.path.join(ROOT, "csrc", "launchers.h")) as f:
        return int(re.search(r"constexpr int kSlotsPerThread = (\d+);", f.read()).group(1))


def softmax_census() -> None:
    import triton

    for part in run_triton_script(TRITON_SOFTMAX_SCRIPT).split("@@ ")[1:]:
        header, sass = part.split("\n", 1)
        chunks, per = (int(word) for word in header.split())
        layout = f"chunked rows ({chunks} chunks)" if chunks else "one program per row"
        print(f"Triton {triton.__version__}, sm_90, mpt_loss (kl, both sources, new-class bias, ref_correct), bf16, "
              f"C = 32768, {layout}: loop bodies, {per} elements per thread per iteration")
        for first, last, ops in loop_bodies(sass):
            report(f"  triton loop [{first}:{last}]", ops, per, "one iteration")

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "census.cu")
        with open(source, "w") as f:
            f.write('#include "launchers.h"\n' + CUDA_SOFTMAX_CENSUS)
        sass, ptxas = cuda_sass(source)
    per = slots_per_thread() * 8  # slots of 8 bf16
    print(f"nvcc, sm_90, the same options as constants, bf16: loop bodies, {per} elements per thread per iteration")
    for function in re.split(r"\n\s+Function : ", sass)[1:]:
        name = function.split("\n", 1)[0].strip()
        for first, last, ops in loop_bodies(function):
            report(f"  cuda {name} [{first}:{last}]", ops, per, "one iteration")
    registers = ", ".join(re.findall(r"Used (\d+) registers", ptxas))
    spills = ", ".join(re.findall(r"(\d+) bytes spill stores", ptxas))
    print(f"  registers: {registers}; spill stores: {spills} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", action="store_true", help="only the Triton kernel")
    parser.add_argument("--cuda", action="store_true", help="only the CUDA kernel")
    parser.add_argument("--softmax", action="store_true", help="only the softmax family's loops, both backends")
    args = parser.parse_args()
    both = not (args.triton or args.cuda or args.softmax)
    if both or args.triton:
        triton_census()
    if both or args.cuda:
        cuda_census()
    if both or args.softmax:
        softmax_census()


if __name__ == "__main__":
    main()
