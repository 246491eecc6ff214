"""The ``mpt-kernels`` command: ``info`` and ``demo`` (``bench`` has its own tests)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import mpt_kernels
from mpt_kernels import backends
from mpt_kernels.cli import main


def test_info_prints_versions_device_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"mpt-kernels {mpt_kernels.__version__}" in out
    assert f"torch       {torch.__version__}" in out
    assert "triton " in out and "python " in out
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in out
    else:
        assert "no CUDA device" in out
    for name in ("reference", "triton", "cuda"):
        assert f"\n  {name} " in out
    assert "cpu   available for softmax, multilabel" in out  # the reference backend
    assert "auto on cpu: softmax -> reference, multilabel -> reference" in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mpt_kernels"] == mpt_kernels.__version__
    assert report["torch"] == torch.__version__
    assert set(report["backends"]) >= {"reference", "triton", "cuda"}
    reference = report["backends"]["reference"]
    assert reference["available"] is True
    assert reference["families"]["cpu"] == {"softmax": None, "multilabel": None}
    assert report["auto"]["cpu"]["softmax"] == "reference"


def test_info_says_why_a_backend_is_missing(capsys, monkeypatch):
    from mpt_kernels import _registry

    # As in a build without the CUDA extension: "cuda" not registered, no import error.
    monkeypatch.delitem(_registry._BACKENDS, "cuda", raising=False)
    monkeypatch.delitem(backends.IMPORT_ERRORS, "cuda", raising=False)
    assert main(["info"]) == 0
    assert "  cuda       not available: not registered in this build" in capsys.readouterr().out
    # A backend module that failed to import says why, known name or not.
    monkeypatch.setitem(backends.IMPORT_ERRORS, "cuda", "ImportError: no compiled extension")
    monkeypatch.setitem(backends.IMPORT_ERRORS, "other", "ModuleNotFoundError: No module named 'x'")
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["backends"]
    assert report["cuda"]["available"] is False
    assert report["cuda"]["reason"] == "its module failed to import (ImportError: no compiled extension)"
    assert "No module named 'x'" in report["other"]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, triton can run")
@pytest.mark.skipif(backends.IMPORT_ERRORS.get("triton") is not None, reason="triton did not import")
def test_info_reports_an_unavailable_registered_backend(capsys, triton_compiled_not_interpreted):
    # Without TRITON_INTERPRET and without a GPU, triton is registered but cannot run.
    assert main(["info", "--json"]) == 0
    triton_report = json.loads(capsys.readouterr().out)["backends"]["triton"]
    assert triton_report["available"] is False
    assert "no CUDA device" in triton_report["families"]["cpu"]["softmax"]


def _finite_numbers(entry: dict) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in entry.values())


def test_demo_quick_writes_json(tmp_path, capsys, monkeypatch):
    calls = {"margin_cross_entropy": 0, "mpt_loss": 0}
    for name in calls:  # the demo must train with the package's own losses
        original = getattr(mpt_kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(mpt_kernels, name, counted)
    threads = torch.get_num_threads()
    path = tmp_path / "demo.json"

    assert main(["demo", "--quick", "--json", str(path)]) == 0

    assert torch.get_num_threads() == threads  # restored
    captured = capsys.readouterr()
    assert "NFR" in captured.out and "mpt" in captured.out
    assert "seed 2/2" in captured.err  # progress goes to stderr
    result = json.loads(path.read_text())
    assert set(result["methods"]) == {"ce", "pct", "mpt"}
    for method, entry in result["methods"].items():
        for metric in ("accuracy", "accuracy_old_classes", "accuracy_new_classes", "nfr", "relative_nfr"):
            assert metric in entry and f"{metric}_std" in entry, (method, metric)
        assert _finite_numbers(entry), (method, entry)
        assert 0.0 <= entry["nfr"] <= 1.0 - entry["accuracy_old_classes"] + 1e-12
        assert 0.1 < entry["accuracy"] <= 1.0  # better than chance on 10 classes
    assert _finite_numbers(result["references"]["new_reference"])
    assert result["seeds"] == [0, 1] and len(result["per_seed"]) == 2
    assert result["config"]["steps"] == 30 and result["config"]["backend"] == "reference"
    # 2 seeds x (old model + new reference + ce) x 30 steps of CE; pct and mpt: 2 x 2 x 30
    assert calls == {"margin_cross_entropy": 2 * 3 * 30, "mpt_loss": 2 * 2 * 30}


def test_demo_without_sklearn_says_how_to_install(capsys, monkeypatch):
    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    assert main(["demo", "--quick"]) == 1
    assert "pip install 'mpt-kernels[demo]'" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--seeds", "0"], ["--train-fraction", "1.5"], ["--noise", "-1"]])
def test_demo_rejects_bad_options(option, capsys):
    assert main(["demo", *option]) == 2
    assert "error:" in capsys.readouterr().err


def test_python_m_mpt_kernels_info():
    completed = subprocess.run(
        [sys.executable, "-m", "mpt_kernels", "info"], capture_output=True, text=True,
        timeout=300, env=os.environ.copy(),
    )
    assert completed.returncode == 0, completed.stderr
    assert "backends" in completed.stdout and "reference" in completed.stdout
