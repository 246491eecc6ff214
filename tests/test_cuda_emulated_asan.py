"""The CUDA emulation's tests once more, with the kernels built with AddressSanitizer and
UBSan's alignment check: CI's stand-in for ``compute-sanitizer --tool memcheck``.

Every access of every kernel of the ``cuda`` backend in tests/test_cuda_emulated.py
(odd class counts, the three row paths, misaligned and padded rows, out-of-range and
ignored targets, empty batches) is checked against the bounds of the tensor it falls
in: torch's CPU tensors are plain heap blocks, which the sanitizer fences. A 16-byte
vector access at an address the GPU would refuse stops the run as well. The suite runs
in a child process, because the sanitizer's runtime must be loaded first (LD_PRELOAD).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cuda_emulation import build

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def sanitizer_runtime() -> str | None:
    """The path of the compiler's AddressSanitizer runtime, or None."""
    compiler = build.compiler()
    if compiler is None:
        return None
    found = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


@pytest.mark.skipif(build.unavailable_reason() is not None, reason=f"no CUDA emulation: {build.unavailable_reason()}")
@pytest.mark.skipif(sanitizer_runtime() is None, reason="the compiler has no AddressSanitizer runtime")
def test_emulated_kernels_stay_in_bounds():
    module = build.build(asan=True)
    imported = subprocess.run(["nm", "-D", "--undefined-only", str(module)], capture_output=True, text=True,
                              check=True).stdout
    assert "__asan_report_store" in imported and "__ubsan_handle_type_mismatch" in imported  # instrumented

    env = dict(
        # libstdc++ too: Python does not link it, and without it loaded before the sanitizer
        # starts, the sanitizer's hook on C++ throws finds no __cxa_throw (torch throws)
        os.environ, MPT_KERNELS_EMULATION_ASAN="1", LD_PRELOAD=f"{sanitizer_runtime()} libstdc++.so.6",
        # torch and Python keep allocations until exit; only out-of-bounds accesses matter here
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
    )
    run = subprocess.run(
        # -s: a sanitizer report goes to the real stderr, not to a capture lost with the process;
        # the thread-order test repeats accesses the others make, in another order
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_cuda_emulated.py",
         "-k", "not thread_order"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    output = run.stdout + run.stderr
    assert "AddressSanitizer" not in output and "runtime error" not in output, output[-6000:]
    assert run.returncode == 0, output[-6000:]
    summary = [line for line in run.stdout.splitlines() if " passed" in line]
    assert summary and "skipped" not in summary[-1], output[-2000:]  # the suite ran, not skipped
