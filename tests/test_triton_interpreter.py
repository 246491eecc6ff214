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
