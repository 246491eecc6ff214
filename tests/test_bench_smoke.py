"""The benchmark suite's CPU smoke run: ``mpt-kernels bench --quick`` on tiny shapes.

It must run without a GPU (reference vs the Triton interpreter, which conftest turns on),
write its JSON and markdown with finite numbers, say plainly that they are not GPU
figures, survive a provider that raises, and remake its report from the JSON alone.
"""

import copy
import importlib.util
import json
import math
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from mpt_kernels.bench import plan, providers, report, runner
from mpt_kernels.bench.cases import CASES
from mpt_kernels.cli import build_parser, main


def _smoke_args(out_dir) -> list:
    args = ["bench", "--quick", "--device", "cpu", "--out", str(out_dir)]
    if not providers.interpreter_enabled():  # a GPU machine: no interpreter, and CPU compiles are slow
        args += ["--provider", "reference"]
    return args


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    status = main(_smoke_args(out_dir))
    (json_path,) = out_dir.glob("*.json")
    (md_path,) = out_dir.glob("*.md")
    return status, out_dir, json_path, json.loads(json_path.read_text()), md_path.read_text()


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_run_writes_its_files_and_says_they_are_not_gpu_figures(smoke_run):
    status, out_dir, json_path, doc, markdown = smoke_run
    assert status == 0
    assert doc["complete"] is True and doc["gpu_figures"] is False
    assert "NOT GPU figures" in doc["notice"] and "NOT GPU figures" in doc["timer"]
    assert "NOT GPU figures" in markdown
    assert doc["device"]["type"] == "cpu"
    assert doc["versions"]["torch"] == torch.__version__
    assert "commit" in doc["git"] and len(doc["source_digest"]) == 64
    # the knobs that change speed, not results, as the run had them
    assert doc["launch_settings"]["cuda.SHARED_ROW_BYTES"] is None
    assert doc["launch_settings"]["triton_softmax.MAX_REGISTERS"] == 64
    assert "- launch settings: triton_softmax.MAX_REGISTERS = 64, " in markdown
    assert _finite_positive(doc["copy_bandwidth"]["bytes_per_s"])
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    # the speed-up plot needs a kernel provider: on a GPU machine this CPU run has only the reference
    plots = (2 if providers.interpreter_enabled() else 1) if has_matplotlib else 0
    assert len(list(out_dir.glob("*.png"))) == plots


def test_every_cell_that_ran_has_finite_figures(smoke_run):
    _, _, _, doc, _ = smoke_run
    cells = doc["cells"]
    assert cells
    for cell in cells:
        assert cell["status"] in ("ok", "failed", "skipped"), cell
        if cell["status"] != "ok":
            assert cell["reason"], cell
            continue
        for field in ("median_ms", "min_ms", "min_bytes", "bytes_per_s", "copy_fraction", "first_call_s"):
            assert _finite_positive(cell[field]), (field, cell)
        assert cell["min_ms"] <= cell["median_ms"] <= cell["q80_ms"]
        assert cell["reps"] >= doc["settings"]["min_reps"]
        assert math.isfinite(cell["loss_value"])
        assert (cell["grad_norm"] is None) == (cell["mode"] == "fwd")
        assert cell.get("check") in (None, "ok"), cell  # a provider off the reference times the wrong thing
    ran = {(c["loss"], c["mode"]) for c in cells if c["provider"] == "reference" and c["status"] == "ok"}
    assert ran == {(loss, mode) for loss in CASES for mode in ("fwd", "fwd+bwd")}


def test_min_bytes_follow_the_formulas(smoke_run):
    _, _, _, doc, _ = smoke_run

    def cell_of(loss, mode, n, c):
        return next(x for x in doc["cells"] if (x["loss"], x["mode"], x["n"], x["c"]) == (loss, mode, n, c))

    cell = cell_of("mpt_kl", "fwd+bwd", 4, 100)
    # fp32 logits (4 x 100), old (4 x 50), new (4 x 100), int64 targets, scalar loss, gradient (4 x 100)
    assert cell["min_bytes"] == 4 * 100 * 4 + 4 * 50 * 4 + 4 * 100 * 4 + 4 * 8 + 4 + 4 * 100 * 4
    cell = cell_of("focal_distillation", "fwd", 4, 1000)
    assert cell["min_bytes"] == 4 * 500 * 4 + 4 * 500 * 4 + 4 * 8 + 4
    cell = cell_of("hill_loss", "fwd+bwd", 4, 1000)
    # fp32 logits, bool targets (1 byte each), scalar loss, gradient
    assert cell["min_bytes"] == 4 * 1000 * 4 + 4 * 1000 * 1 + 4 + 4 * 1000 * 4


def test_runs_that_miscounted_bytes_are_rederived(smoke_run):
    # runs before the fix counted bool multi-label targets as wide as the logits: the
    # report recomputes min_bytes from the recorded shapes and target bytes, and scales the
    # bandwidth figures with it (times untouched)
    _, _, _, doc, _ = smoke_run
    doc = copy.deepcopy(doc)
    assert report.rederive_bytes(doc) == 0 and "rederived" not in doc
    cell = next(x for x in doc["cells"] if x["loss"] == "hill_loss" and x["status"] == "ok" and x["mode"] == "fwd+bwd")
    right = dict(cell)
    cell["min_bytes"] = cell["n"] * cell["c"] * 4 * 3 + 4  # the old count: 4-byte targets
    cell["bytes_per_s"] = cell["min_bytes"] / (cell["median_ms"] / 1e3)
    cell["copy_fraction"] *= cell["min_bytes"] / right["min_bytes"]
    assert report.rederive_bytes(doc) == 1 and "re-derived" in doc["rederived"]
    assert cell["min_bytes"] == right["min_bytes"] and cell["median_ms"] == right["median_ms"]
    assert cell["copy_fraction"] == pytest.approx(right["copy_fraction"], rel=1e-12)
    assert cell["bytes_per_s"] == pytest.approx(right["bytes_per_s"], rel=1e-12)


def test_markdown_has_a_table_per_loss_and_mode(smoke_run):
    _, _, _, doc, markdown = smoke_run
    for loss in CASES:
        assert f"## {loss} — forward+backward" in markdown
        assert f"## {loss} — forward" in markdown
    assert "| dtype | N | C | min MB |" in markdown


def test_report_is_remade_from_the_json_alone(smoke_run, tmp_path):
    _, _, json_path, _, markdown = smoke_run
    assert main(["bench", "--from-json", str(json_path), "--no-plots", "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{json_path.stem}.md").read_text() == markdown


def test_runs_split_over_calls_merge_into_one_report(smoke_run, tmp_path):
    """A sweep run in two parts (say, one loss per GPU call) becomes one report."""
    _, _, json_path, doc, _ = smoke_run
    losses = sorted({cell["loss"] for cell in doc["cells"]})
    parts = []
    for index, chosen in enumerate((losses[:1], losses[1:])):
        part = dict(doc, cells=[cell for cell in doc["cells"] if cell["loss"] in chosen])
        part["copy_bandwidth"] = dict(doc["copy_bandwidth"], bytes_per_s=doc["copy_bandwidth"]["bytes_per_s"] * (index + 1))
        parts.append(tmp_path / f"part{index}.json")
        parts[-1].write_text(json.dumps(part))
    out = tmp_path / "merged"
    assert main(["bench", "--from-json", *map(str, parts), "--no-plots", "--out", str(out)]) == 0
    (merged_json,) = out.glob("*-merged.json")
    merged = json.loads(merged_json.read_text())
    key = lambda cell: (cell["loss"], cell["provider"], cell["n"], cell["c"], cell["dtype"], cell["mode"])  # noqa: E731
    assert sorted(map(key, merged["cells"])) == sorted(map(key, doc["cells"]))
    assert len(merged["parts"]) == 2
    (merged_md,) = out.glob("*-merged.md")
    assert "merged from 2 runs" in merged_md.read_text()
    # runs of other code do not merge
    other = dict(json.loads(parts[1].read_text()), source_digest="f" * 64)
    parts[1].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="source digest"):
        main(["bench", "--from-json", *map(str, parts), "--no-plots", "--out", str(out)])
    # nor do runs with other launch settings
    other = dict(json.loads(parts[0].read_text()), launch_settings={"cuda.SHARED_ROW_BYTES": 0})
    parts[1].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="launch settings"):
        main(["bench", "--from-json", *map(str, parts), "--no-plots", "--out", str(out)])


def test_launch_settings_skip_a_backend_that_cannot_import(monkeypatch):
    # off Linux triton is not installed: the CPU smoke run must still write its JSON
    import sys

    from mpt_kernels.bench import environment

    for name in ("triton_softmax", "triton_multilabel"):
        monkeypatch.setitem(sys.modules, f"mpt_kernels.backends.{name}", None)  # import raises ImportError
    assert environment.launch_settings() == {"cuda.SHARED_ROW_BYTES": None}


def test_a_provider_that_raises_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def build(name, case, **kwargs):
        if name == "triton":
            def broken(logits, inputs):
                raise NotImplementedError("kernel still being written")
            return broken
        return real_build(name, case, **kwargs)

    real_build = providers.build
    monkeypatch.setattr(providers, "build", build)
    monkeypatch.setattr(providers, "run_unavailable", lambda name, device: None)
    monkeypatch.setattr(providers, "cell_unavailable", lambda name, case, dtype, device: None)
    args = build_parser().parse_args(
        ["bench", "--quick", "--device", "cpu", "--loss", "mpt_kl", "hill_loss", "--provider", "reference",
         "triton", "--c", "50", "--no-plots", "--out", str(tmp_path)])
    doc = runner.run_sweep(runner.resolve(args), tmp_path, write_plots=False)
    assert doc["complete"]
    failed = [c for c in doc["cells"] if c["provider"] == "triton"]
    assert failed and all(c["status"] == "failed" for c in failed)
    assert all("NotImplementedError: kernel still being written" in c["reason"] for c in failed)
    assert all(c["status"] == "ok" for c in doc["cells"] if c["provider"] == "reference")
    assert "## Failed cells" in report.to_markdown(doc)


def test_the_plan_trims_repetitions_to_fit_a_budget():
    cells = [plan.Cell("mpt_kl", 4096, c, "bf16", mode, provider, 10 * 4096 * c)
             for c in (1000, 131072) for mode in ("fwd", "fwd+bwd") for provider in ("reference", "triton", "compile")]
    planner = plan.Planner(cells, gpu=True, copy_bytes_per_s=4e12, flush_ms=0.05, rep_ms=100.0, min_reps=5,
                           max_reps=100, untimed_calls=4, compile_dynamic=True)
    full, least = planner.estimate(0, 100.0), planner.estimate(0, 0.0)
    assert least < full
    assert planner.choose_rep_ms(0, None) == 100.0
    assert planner.choose_rep_ms(0, full + 1) == 100.0
    assert planner.choose_rep_ms(0, least / 2) == 0.0
    middle = planner.choose_rep_ms(0, 0.5 * (least + full))
    assert 0.0 < middle < 100.0 and planner.estimate(0, middle) <= 0.5 * (least + full)
    # a provider measured twice as slow as planned doubles its share of the estimate
    before = planner.estimate(1)
    planner.record(0, 100.0, wall_s=1000.0, first_call_s=0.0)
    assert planner.estimate(1) > before


def test_git_commit_from_the_environment_wins(monkeypatch):
    """A GPU machine's copy of the tree may carry an older .git: the caller's commit wins."""
    from mpt_kernels.bench import environment

    monkeypatch.setenv("MPT_KERNELS_GIT_COMMIT", "0123abc")
    monkeypatch.setenv("MPT_KERNELS_GIT_DIRTY", "0")
    state = environment.git_state()
    assert (state["commit"], state["dirty"], state["source"]) == ("0123abc", False, "MPT_KERNELS_GIT_COMMIT")
    monkeypatch.delenv("MPT_KERNELS_GIT_COMMIT")
    state = environment.git_state()
    assert state["source"] in ("git", "unknown (no git repository here)") and state["commit"] != "0123abc"


def test_host_bound_cells_are_marked(smoke_run, tmp_path):
    # the CPU smoke run has no host time apart from its measured time (None: no mark);
    # a GPU cell whose launches take most of its event time is marked ʰ, with a legend
    _, _, _, doc, markdown = smoke_run
    assert all(cell.get("host_ms") is None for cell in doc["cells"] if cell["status"] == "ok")
    assert "ʰ" not in markdown
    doc = copy.deepcopy(doc)
    ok = [cell for cell in doc["cells"] if cell["status"] == "ok"]
    ok[0]["host_ms"] = ok[0]["median_ms"] * 0.9  # host-bound
    ok[1]["host_ms"] = ok[1]["median_ms"] * 0.5  # not
    assert report.host_bound(ok[0]) and not report.host_bound(ok[1])
    marked = report.to_markdown(doc)
    assert "ʰ marks a host-bound cell" in marked
    # the cell, its own speed-ups, and the speed-ups that have it as their baseline
    own = sum(ok[0].get(f"speedup_vs_{b}") is not None for b in report.BASELINES)
    dependents = sum(c is not ok[0] and c.get(f"speedup_vs_{ok[0]['provider']}") is not None
                     and report._key(c, ok[0]["provider"]) == report._key(ok[0]) for c in ok)
    assert marked.count(" ʰ") == 1 + own + dependents + marked.count(" ʰ marks")
    # a speed-up against a host-bound baseline compares launch paths: marked too, in the
    # table and in the terminal summary
    for cell in doc["cells"]:
        cell.pop("host_ms", None)
    fast = next(c for c in ok if c.get("speedup_vs_reference") is not None)
    baseline = next(c for c in ok if c["provider"] == "reference" and report._key(c) == report._key(fast, "reference"))
    baseline["host_ms"] = baseline["median_ms"]
    marked = report.to_markdown(doc)
    assert marked.count(" ʰ") == 2 + marked.count(" ʰ marks")  # the baseline's cell, the speed-up
    assert report.speedup_host_bound(fast, baseline) and not report.host_bound(fast)
    largest = max(c["n"] * c["c"] for c in ok if (c["loss"], c["dtype"], c["mode"]) ==
                  (fast["loss"], fast["dtype"], fast["mode"]))
    if fast["n"] * fast["c"] == largest:
        assert any("eager ʰ" in line for line in report.summary(doc))
    if importlib.util.find_spec("matplotlib") is not None:  # host-bound points are drawn hollow
        assert len(report.write_plots(doc, tmp_path, "host-bound")) == 2


def test_merge_keeps_a_measured_cell_over_a_later_part_that_did_not_measure_it(smoke_run):
    _, _, _, doc, _ = smoke_run
    measured = [cell for cell in doc["cells"] if cell["status"] == "ok"]
    later = copy.deepcopy(doc)
    for cell in later["cells"]:
        cell.update(status="skipped", skip="time", reason="time budget exhausted")
    for parts in ([doc, later], [later, doc]):
        merged = report.merge(copy.deepcopy(parts))
        kept = [cell for cell in merged["cells"] if cell["status"] == "ok"]
        assert len(kept) == len(measured) > 0
    # between two measured cells the later part's wins (a re-run replaces a cell)
    rerun = copy.deepcopy(doc)
    for cell in rerun["cells"]:
        cell["median_ms"] = 12345.0
    merged = report.merge([copy.deepcopy(doc), rerun])
    assert all(cell["median_ms"] == 12345.0 for cell in merged["cells"] if cell["status"] == "ok")


def test_grad_output_reaches_the_backward_and_the_report(smoke_run, tmp_path):
    """--grad-output G: fwd+bwd backpropagates G (the gradient norm scales by it), the
    report says so, and runs of different G do not merge."""
    _, _, _, doc, _ = smoke_run
    assert doc["settings"]["grad_output"] == 1.0
    args = ["bench", "--quick", "--device", "cpu", "--provider", "reference", "--loss", "hill_loss",
            "--mode", "fwd+bwd", "--no-plots", "--grad-output", "0.5", "--out", str(tmp_path)]
    assert main(args) == 0
    (json_path,) = tmp_path.glob("*.json")
    half = json.loads(json_path.read_text())
    assert half["settings"]["grad_output"] == 0.5
    assert "backward with upstream gradient 0.5" in next(tmp_path.glob("*.md")).read_text()
    key = lambda cell: (cell["loss"], cell["provider"], cell["n"], cell["c"], cell["dtype"], cell["mode"])  # noqa: E731
    ones = {key(cell): cell for cell in doc["cells"] if cell["status"] == "ok"}
    pairs = [(cell, ones[key(cell)]) for cell in half["cells"] if cell["status"] == "ok" and key(cell) in ones]
    assert pairs
    for scaled, one in pairs:
        assert scaled["grad_norm"] == pytest.approx(0.5 * one["grad_norm"], rel=1e-5)
    with pytest.raises(ValueError, match="upstream gradients"):
        report.merge([doc, half])
    with pytest.raises(SystemExit, match="grad-output"):
        main(args[:-4] + ["--grad-output", "nan"])


def test_the_gpu_clock_flushes_the_l2_by_reading():
    """CudaClock's flush reads its buffer (a sum into a preallocated scalar) and writes
    nothing else: a written flush leaves dirty lines that the timed call writes back."""
    from mpt_kernels.bench.timing import CudaClock

    clock = object.__new__(CudaClock)  # its buffers, on the CPU (no device to ask for the L2 size)
    clock._flush = torch.ones(1000, dtype=torch.int32)
    clock._flush_sum = torch.empty((), dtype=torch.int32)
    clock.flush()
    assert torch.equal(clock._flush, torch.ones(1000, dtype=torch.int32)) and clock._flush_sum.item() == 1000


def test_the_host_overhead_script_stubs_every_launch_and_times_every_loss():
    """benchmarks/host_overhead.py (a subprocess: it turns the interpreter on before the
    package defines its kernels) replaces each kernel the Triton backend launches and
    prints a finite time per loss."""
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
    run = subprocess.run([sys.executable, str(script), "--calls", "2", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    stubbed = set(re.search(r"stubbed: (.*)", run.stdout).group(1).split(", "))
    assert {"_mpt_loss_kernel", "_mpt_loss_backward_kernel", "_inverse_count_kernel", "_multilabel_kernel",
            "_scaled_sum_kernel"} <= stubbed
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| loss")}
    assert set(rows) == set(CASES)
    assert all(_finite_positive(float(cell)) for cells in rows.values() for cell in cells[:2])
