"""The package reads ``TRITON_INTERPRET`` as Triton does
(mpt_kernels/backends/triton_interpreter.py): a value that Triton takes for "on" but a
plain ``== "1"`` test would not, or the reverse, must not leave the kernels defined for
one mode and the package's inline-assembly switch or device checks set for the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from mpt_kernels.backends.triton_interpreter import interpreter_enabled

PROBE = """
import json, triton
from mpt_kernels.backends import triton_fastmath, triton_interpreter
print(json.dumps([bool(triton.knobs.runtime.interpret), triton_interpreter.interpreter_enabled(),
                  bool(triton_fastmath.HARDWARE.value)]))
"""


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), ("0", False), ("2", False)])
def test_interpreter_setting_is_tritons(value, on):
    env = {**os.environ, "TRITON_INTERPRET": value}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    triton_says, package_says, hardware = json.loads(result.stdout.strip().splitlines()[-1])
    assert triton_says == on  # the table above is Triton's reading
    assert package_says == on
    assert hardware == (not on)  # inline assembly only in compiled kernels


@triton.jit
def _plus_one(x):
    return x + 1.0


@triton.jit
def _count_calls_kernel(out_ptr, calls):
    total = tl.zeros([1], tl.float32)
    for _ in range(calls):
        total = _plus_one(total)  # one device-function call per iteration
    tl.store(out_ptr + tl.arange(0, 1), total)


@pytest.mark.skipif(not interpreter_enabled(), reason="about Triton's interpreter")
def test_language_patched_once_per_launch(monkeypatch):
    """A launch patches triton.language once, however many helper calls its kernel makes
    (triton_interpreter._patch_language_once_per_launch), and every launch still works,
    so each found the language restored by the one before and patched it again."""
    from triton.runtime import interpreter

    patched = []
    patch_builtin = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin",
                        lambda package, *rest: (patched.append(package), patch_builtin(package, *rest))[1])

    def launch(calls):
        patched.clear()
        out = torch.full([1], float("nan"))
        _count_calls_kernel[(1, )](out, calls)
        assert out.item() == calls
        return len(patched)

    launch(1)  # Triton's own helpers (tl.zeros) may import more of the language at first
    once = launch(1)
    assert once > 0
    assert launch(8) == once  # without it: 4 more for every helper call
    assert launch(0) == once
    assert tl.core.is_builtin(tl.load)  # the launch's patches undone
