"""Test set-up shared by every test module.

Without a GPU, Triton kernels run in interpreter mode on CPU tensors; the variable
must be set before any kernel is defined, so before mpt_kernels is imported.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# The CPU tests use tiny tensors, for which a second intra-op thread adds only latency;
# on a loaded 2-core machine a descheduled OpenMP worker turns a 0.2 ms op into tens of ms.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Every test draws the same inputs on every run (a failure reproduces), and
    different tests draw different ones; a test that seeds itself overrides this."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def triton_compiled_not_interpreted(monkeypatch):
    """The triton backend as on a machine where its kernels are compiled, not
    interpreted: CPU tensors cannot reach it (and without a GPU it cannot run)."""
    monkeypatch.setattr("mpt_kernels.backends.triton.interpreter_enabled", lambda: False)
