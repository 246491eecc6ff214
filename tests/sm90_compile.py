"""Lowering Triton kernels to sm_90 machine code without a GPU (shared by the Triton tests).

``run_without_interpreter(script, marker)`` runs a script in a fresh process with the
kernels defined for the compiler rather than the interpreter.

The interpreter accepts code that the compiler rejects (a global that is not a
constexpr, a loop-carried value that changes type, inline assembly it never runs, ...).
``run_sm90_compile(body)`` runs ``body`` in a fresh process without TRITON_INTERPRET,
after a prelude that defines ``compile_kernel(fn, types, constexprs, num_warps, aligned=(),
**options)``: it lowers ``fn`` to a cubin for sm_90 with Triton's own ptxas (the arguments
named in ``aligned`` that ``fn`` has are specialised as divisible by 16, as the JIT does for
aligned tensors),
asserts that nothing spills (neither a stack frame nor local memory), and returns the SASS text. The body must print
"compiled" at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRELUDE = r'''
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

def compile_kernel(fn, types, constexprs, num_warps, aligned=(), **options):
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    # what the JIT assumes of a 16-byte-aligned pointer or an integer divisible by 16
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned if name in fn.arg_names}
    options = dict(dict(enable_fp_fusion=True), **options)  # as the kernels launch (triton_fastmath.LAUNCH_OPTIONS)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, **options))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"]); f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    regs, stack, local = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage).groups()
    print(fn.__name__, constexprs, "registers", regs, "stack bytes", stack, "local bytes", local)
    # spills land in the stack frame (STACK) as well as in LOCAL
    assert local == "0" and stack == "0", f"{fn.__name__} {constexprs} spills: stack {stack}, local {local} bytes"
    return sass
'''


def run_without_interpreter(script: str, done_marker: str) -> str:
    """Runs ``script`` in a fresh Python process without TRITON_INTERPRET (the kernels are
    then defined for the compiler); asserts it exits 0 and prints ``done_marker``, and
    returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done_marker in done.stdout, done.stdout + done.stderr[-4000:]
    return done.stdout


def run_sm90_compile(body: str) -> str:
    """Runs PRELUDE + body in a fresh interpreter-free process; returns its stdout."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")) or not os.path.exists(os.path.join(bin_dir, "cuobjdump")):
        pytest.skip("this Triton has no bundled ptxas/cuobjdump")
    return run_without_interpreter(PRELUDE + body, "compiled")
