"""Instructions per element of the multi-label kernels in sm_90 machine code, without a GPU.

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

    python benchmarks/sass_census.py            # both
    python benchmarks/sass_census.py --triton   # needs triton with its bundled ptxas
    python benchmarks/sass_census.py --cuda     # needs nvcc

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
        IS_SPLC=splc, WRITE_ELEMENT_LOSS=False, WRITE_TILE_SUMS=True, WRITE_GRAD=True, UPSTREAM_SCALAR=False,
        UPSTREAM_PER_ELEMENT=False, FLAT=True, BLOCK_ROWS=1, BLOCK_COLS=block), warps, aligned=aligned)
    print("@@", "splc" if splc else "hill", 2 * block // (32 * warps))
    print(sass)
print("compiled")
'''


def opcodes(sass: str) -> list:
    """The opcode of every instruction (predicates and modifiers dropped)."""
    return re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)", sass)


def report(name: str, ops: list, per: int, note: str) -> None:
    counts = collections.Counter(ops)
    float_ops = sum(counts[op] for op in FLOAT_PIPE)
    print(f"{name}: {len(ops)} instructions; per element: {len(ops) / per:.1f} all, "
          f"{float_ops / per:.1f} float-pipe, {counts['MUFU'] / per:.2f} MUFU ({note})")
    print("    " + ", ".join(f"{op} {n / per:.2f}" for op, n in counts.most_common(12)))


def triton_census() -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from sm90_compile import PRELUDE  # the tests' ahead-of-time compile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PRELUDE + TRITON_SCRIPT], env=env, capture_output=True, text=True,
                         check=True).stdout
    import triton

    print(f"Triton {triton.__version__}, sm_90, bf16 logits, bool targets, forward with gradient and tile sums")
    for part in out.split("@@ ")[1:]:
        header, sass = part.split("\n", 1)
        loss, per = header.split()
        report(f"  triton {loss}", opcodes(sass), int(per), "full and tail copies of a tile")


def cuda_census() -> None:
    import triton  # for its bundled cuobjdump

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "multilabel.cubin")
        build = subprocess.run(["nvcc", "-std=c++17", "-O3", "-I", os.path.join(ROOT, "csrc"), "-cubin",
                                "-arch=sm_90", "-Xptxas", "-v", "-o", cubin,
                                os.path.join(ROOT, "csrc", "multilabel_loss.cu")],
                               capture_output=True, text=True, check=True)
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"nvcc ({version}), sm_90, bf16 logits, uint8 (bool) targets, forward kernel")
    wanted = "multilabel_loss_kernelINS_8BFloat16ENS_5UInt8"
    for function in re.split(r"\n\s+Function : ", sass)[1:]:
        if wanted in function.split("\n", 1)[0]:
            ops = opcodes(function)
            counts = collections.Counter(ops)
            float_ops = sum(counts[op] for op in FLOAT_PIPE)
            print(f"  cuda hill+splc: {len(ops)} instructions in the kernel; {float_ops / 16:.1f} float-pipe and "
                  f"{counts['MUFU'] / 16:.2f} MUFU per element (both losses, 8 elements each)")
    registers = sorted(set(re.findall(r"Used (\d+) registers", build.stderr)), key=int)
    print(f"  registers per thread across the file's kernels: {', '.join(registers)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", action="store_true", help="only the Triton kernel")
    parser.add_argument("--cuda", action="store_true", help="only the CUDA kernel")
    args = parser.parse_args()
    both = not (args.triton or args.cuda)
    if both or args.triton:
        triton_census()
    if both or args.cuda:
        cuda_census()


if __name__ == "__main__":
    main()
