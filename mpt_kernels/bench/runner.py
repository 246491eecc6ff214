"""The sweep: cases x providers x shapes x dtypes x modes, timed cell by cell.

Order: for each loss, dtype and shape the inputs are made once and every provider and
mode runs on them; torch.compile goes last (a second pass over the inputs), one compiled
function per loss and dtype, so that what a time budget leaves out is compile cells. A
cell that raises is recorded as failed with its error and the sweep goes on; one that
runs out of memory, or whose inputs do not fit, is recorded as skipped, saying so. If
the CUDA context itself fails (an illegal memory access, say), the rest is skipped.
The JSON file is rewritten as the sweep goes, so an interrupted run still leaves one.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from pathlib import Path

import torch

from . import environment, providers, report
from .cases import (CASES, DTYPES, LossCase, input_bytes, old_classes, planned_input_bytes, planned_target_bytes,
                    target_bytes)
from .plan import OVERRUN_FACTOR, Cell, Planner
from .timing import copy_bandwidth, make_clock, measure

MODES = ("fwd", "fwd+bwd")

SWEEPS = {
    # name: (N values, C values, dtypes)
    "gpu-full": ((1024, 4096, 16384), (1000, 8192, 32768, 131072), ("bf16", "fp32")),
    "gpu-quick": ((4096,), (8192, 32768), ("bf16",)),
    "cpu-smoke": ((4,), (100, 1000), ("fp32",)),  # the Triton interpreter takes ~0.1 s a row
}
# Per-cell settings: (rep budget in ms, min reps, max reps, untimed probe calls)
REPS = {"gpu": (100.0, 5, 100, 2), "cpu": (20.0, 2, 5, 1)}
COPY_BYTES = {"gpu": 1 << 30, "cpu": 64 << 20}
MEMORY_HEADROOM = 0.9  # inputs may take this fraction of the free memory
CPU_THREADS = 1  # torch threads during the CPU smoke run
SAVE_EVERY_S = 15.0  # the JSON file is rewritten at most this often while the sweep runs
CPU_NOTICE = ("CPU SMOKE RUN: timed with time.perf_counter on CPU tensors. These are NOT GPU "
              "figures; they show only that the benchmark runs.")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings
def resolve(args) -> dict:
    """The run's settings from the command line; SystemExit with a message when they cannot run."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("mpt-kernels bench: --device cuda, but torch sees no CUDA device")
    gpu = device.type == "cuda"
    if not math.isfinite(args.grad_output):
        raise SystemExit(f"mpt-kernels bench: --grad-output must be finite, got {args.grad_output}")
    if not gpu and not args.quick and not (args.n and args.c):
        raise SystemExit(
            "mpt-kernels bench: no CUDA device here. The full sweep needs a GPU; "
            "`mpt-kernels bench --quick` runs the CPU smoke run (or give --n and --c)."
        )
    sweep = "gpu-full" if gpu and not args.quick else ("gpu-quick" if gpu else "cpu-smoke")
    n_values, c_values, dtypes = SWEEPS[sweep]
    if args.provider:
        chosen = list(args.provider)
    elif gpu:
        chosen = list(providers.PROVIDER_NAMES)
    else:  # CPU: the Triton interpreter when it is on, else torch.compile
        chosen = ["reference", "triton" if providers.interpreter_enabled() else "compile"]
    rep_ms, min_reps, max_reps, probes = REPS["gpu" if gpu else "cpu"]
    return {
        "device": device,
        "gpu": gpu,
        "sweep": sweep,
        "cases": list(args.loss or CASES),
        "providers": chosen,
        "dtypes": list(args.dtype or dtypes),
        "modes": list(args.mode or MODES),
        "n": list(args.n or n_values),
        "c": list(args.c or c_values),
        "rep_ms": args.rep_ms if args.rep_ms is not None else rep_ms,
        "min_reps": args.min_reps if args.min_reps is not None else min_reps,
        "max_reps": args.max_reps if args.max_reps is not None else max_reps,
        "probes": probes,
        "budget_s": args.budget_s,
        "compile_dynamic": args.compile_shapes == "dynamic",
        "grad_output": args.grad_output,
        "seed": args.seed,
    }


def _ordered_providers(chosen: list) -> list:
    """Reference first (the sanity check compares with it), compile last."""
    rank = {name: i for i, name in enumerate(("reference", "triton", "cuda", "liger", "compile"))}
    return sorted(dict.fromkeys(chosen), key=lambda name: rank[name])


# --------------------------------------------------------------------------- cells
def _cell_record(case: LossCase, n: int, c: int, dtype: str, mode: str, provider: str, **fields) -> dict:
    record = {"loss": case.name, "provider": provider, "n": n, "c": c, "k": old_classes(c),
              "dtype": dtype, "mode": mode, "status": None, "skip": None, "reason": None}
    record.update(fields)
    return record


def _make_step(loss_fn, inputs: dict, mode: str, grad_output: float = 1.0):
    """A call of the loss that returns (loss, gradient of the logits or None); fwd+bwd
    backpropagates the upstream gradient ``grad_output`` (a tensor made at the first,
    untimed, call)."""
    logits = inputs["logits"]
    # the logits go in once, as the argument (no aliased second copy for torch.compile to guard)
    others = {name: tensor for name, tensor in inputs.items() if name != "logits"}
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return loss_fn(logits, others), None
        return step
    leaf = logits.detach().requires_grad_(True)
    upstream = []

    def step():
        loss = loss_fn(leaf, others)
        if not upstream:
            upstream.append(torch.full_like(loss, grad_output))
        (grad,) = torch.autograd.grad(loss, leaf, upstream[0])
        return loss, grad
    return step


def _short_error(error: BaseException, limit: int = 1500) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _out_of_memory(error: BaseException) -> bool:
    """Also an OOM that torch.compile or a backend re-raised as another exception type."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _context_alive(clock) -> bool:
    try:
        clock.sync()
        return True
    except Exception:
        return False


class Sweep:
    def __init__(self, settings: dict, out_dir: Path, write_plots: bool):
        self.settings = settings
        self.out_dir = out_dir
        self.write_plots = write_plots
        self.device = settings["device"]
        self.clock = make_clock(self.device)
        self.cells: list = []
        self.started = time.perf_counter()
        self.doc = None
        self.stem = None
        self._last_save = time.perf_counter()

    # ----------------------------------------------------------------- plan
    def _provider_status(self) -> dict:
        status = {}
        for name in self.settings["providers"]:
            reason = providers.run_unavailable(name, self.device)
            status[name] = {"available": reason is None, "reason": reason,
                            "description": providers.DESCRIPTIONS[name]}
        return status

    def _planned_cells(self, provider_status: dict):
        """(runnable Cells in run order, records of the cells that do not apply)."""
        s = self.settings
        runnable_providers = [p for p in _ordered_providers(s["providers"]) if provider_status[p]["available"]]
        phases = [[p for p in runnable_providers if p != "compile"], [p for p in runnable_providers if p == "compile"]]
        runnable, not_applicable = [], []
        for phase in phases:
            for case_name in s["cases"]:
                case = CASES[case_name]
                for dtype_name in s["dtypes"]:
                    dtype = DTYPES[dtype_name]
                    t = planned_target_bytes(case, dtype)
                    for n in s["n"]:
                        for c in s["c"]:
                            for mode in s["modes"]:
                                for provider in phase:
                                    why_not = providers.cell_unavailable(provider, case, dtype, self.device)
                                    if why_not is not None:
                                        not_applicable.append(_cell_record(
                                            case, n, c, dtype_name, mode, provider,
                                            status="skipped", skip="n/a", reason=why_not))
                                        continue
                                    min_bytes = case.min_bytes(n, c, old_classes(c), dtype.itemsize, t, mode == "fwd+bwd")
                                    runnable.append(Cell(case_name, n, c, dtype_name, mode, provider, min_bytes))
        return runnable, not_applicable

    # ----------------------------------------------------------------- run
    def run(self) -> dict:
        s = self.settings
        gpu = s["gpu"]
        if "compile" in s["providers"]:
            providers.configure_compile()
        log(f"mpt-kernels bench: {s['sweep']} on {self._device_name()}")
        if not gpu:
            log(CPU_NOTICE)
        copy = copy_bandwidth(self.clock, COPY_BYTES["gpu" if gpu else "cpu"], 30 if gpu else 5)
        log(f"device-to-device copy: {copy['bytes_per_s'] / 1e9:.0f} GB/s (read + write, "
            f"{copy['bytes_each_way'] / 2**20:.0f} MiB each way)")
        provider_status = self._provider_status()
        for name, status in provider_status.items():
            log(f"  provider {name:<9} " + ("available" if status["available"] else f"unavailable: {status['reason']}"))
        runnable, not_applicable = self._planned_cells(provider_status)
        self.cells.extend(not_applicable)
        # the flush reads its buffer: about the time a copy takes per byte moved
        flush_ms = (self.clock.flush_bytes / copy["bytes_per_s"] * 1e3) if self.clock.flush_bytes else 0.0
        planner = Planner(runnable, gpu=gpu, copy_bytes_per_s=copy["bytes_per_s"], flush_ms=flush_ms,
                          rep_ms=s["rep_ms"], min_reps=s["min_reps"], max_reps=s["max_reps"],
                          untimed_calls=2 + s["probes"], compile_dynamic=s["compile_dynamic"])
        estimate = planner.estimate(0)
        log(f"plan: {len(runnable)} cells to time ({len(not_applicable)} do not apply); "
            f"estimate {estimate:.0f} s at up to {s['rep_ms']:.0f} ms of timed runs per cell "
            f"(of which first calls / compilation ~{planner.first_call_estimate():.0f} s)")
        if s["budget_s"] is not None:
            rep_ms = planner.choose_rep_ms(0, s["budget_s"])
            log(f"budget {s['budget_s']:.0f} s: repetition budget {rep_ms:.1f} ms per cell, estimate "
                f"{planner.estimate(0, rep_ms):.0f} s")
        self.doc = self._document(copy, provider_status, estimate)
        self.stem = report.file_stem(self.doc)
        try:
            aborted = self._time_cells(runnable, planner)
        except KeyboardInterrupt:  # keep what was measured
            aborted = "interrupted (KeyboardInterrupt)"
            log(f"stopping: {aborted}")
        self.doc["complete"] = aborted is None
        self.doc["aborted"] = aborted
        return self._save(final=True)

    def _time_cells(self, runnable: list, planner: Planner):
        """Times the cells in order; returns None, or why the sweep stopped early."""
        s = self.settings
        inputs_key, inputs, why_none, compiled_for, loss_fns = None, None, None, None, {}
        aborted, abort_kind = None, None
        for index, cell in enumerate(runnable):
            case, dtype = CASES[cell.case], DTYPES[cell.dtype]
            elapsed = time.perf_counter() - self.started
            if aborted is None and s["budget_s"] is not None and elapsed > OVERRUN_FACTOR * s["budget_s"]:
                aborted = f"time budget exhausted ({elapsed:.0f} s > {OVERRUN_FACTOR} x {s['budget_s']:.0f} s)"
                abort_kind = "time"
                log(f"stopping: {aborted}")
            if aborted is not None:
                self.cells.append(self._record(cell, status="skipped", skip=abort_kind, reason=aborted))
                continue
            if (cell.case, cell.dtype, cell.n, cell.c) != inputs_key:  # new inputs
                if time.perf_counter() - self._last_save > SAVE_EVERY_S:
                    self._save()
                inputs_key, inputs = (cell.case, cell.dtype, cell.n, cell.c), None
                gc.collect()
                self.clock.release()
                inputs, why_none = self._make_inputs(case, cell.n, cell.c, dtype)
                if inputs is None:
                    log(f"  {cell.case} N={cell.n} C={cell.c} {cell.dtype}: {why_none['status']}: "
                        f"{why_none['reason']}")
            if inputs is None:
                self.cells.append(self._record(cell, **why_none))
                continue
            if cell.provider == "compile" and compiled_for != (cell.case, cell.dtype):
                # one compiled function per (loss, dtype), on a fresh Dynamo cache
                providers.reset_compile()
                compiled_for = (cell.case, cell.dtype)
                loss_fns.pop(("compile",), None)
            fn_key = ("compile",) if cell.provider == "compile" else (cell.provider, cell.case)
            if fn_key not in loss_fns:
                loss_fns[fn_key] = providers.build(cell.provider, case, compile_dynamic=s["compile_dynamic"])

            seconds_left = None if s["budget_s"] is None else s["budget_s"] - elapsed
            rep_ms = planner.choose_rep_ms(index, seconds_left)
            cell_start = time.perf_counter()
            record = self._run_cell(cell, case, inputs, loss_fns[fn_key], rep_ms)
            record["cell_wall_s"] = time.perf_counter() - cell_start
            self.cells.append(record)
            planner.record(index, rep_ms, record["cell_wall_s"], record.get("first_call_s") or 0.0)
            self._progress(index, len(runnable), record, planner)
            if record.get("skip") == "memory":  # free what the failed call held before the next one
                gc.collect()
                self.clock.release()
            if record["status"] == "failed" and s["gpu"] and not _context_alive(self.clock):
                aborted = f"the CUDA context failed after {cell.provider} {cell.case}: {record['reason']}"
                abort_kind = "aborted"
                log(f"stopping: {aborted}")
                inputs = None
        return aborted

    def _make_inputs(self, case: LossCase, n: int, c: int, dtype: torch.dtype):
        needed = planned_input_bytes(case, n, c, dtype)
        free = self.clock.free_bytes()
        if free is not None and needed > MEMORY_HEADROOM * free:
            return None, {"status": "skipped", "skip": "memory",
                          "reason": f"does not fit: the inputs need {needed / 2**30:.1f} GiB, "
                                    f"{free / 2**30:.1f} GiB free"}
        generator = torch.Generator(device=self.device).manual_seed(self.settings["seed"])
        try:
            return case.make_inputs(n, c, dtype, self.device, generator), None
        except Exception as error:
            if _out_of_memory(error):
                return None, {"status": "skipped", "skip": "memory",
                              "reason": f"does not fit: out of memory making the inputs ({_short_error(error, 300)})"}
            return None, {"status": "failed", "reason": f"making the inputs: {_short_error(error)}"}

    def _run_cell(self, cell: Cell, case: LossCase, inputs: dict, loss_fn, rep_ms: float) -> dict:
        s = self.settings
        record = self._record(cell, input_bytes=input_bytes(inputs),
                              target_element_bytes=target_bytes(case, inputs))
        if cell.provider == "liger":
            record["note"] = case.liger_note
        step = _make_step(loss_fn, inputs, cell.mode, s["grad_output"])
        try:
            timing = measure(step, self.clock, rep_ms=rep_ms, min_reps=s["min_reps"], max_reps=s["max_reps"],
                             probes=s["probes"])
        except Exception as error:  # a provider that raises: record it and go on
            if _out_of_memory(error):
                record.update(status="skipped", skip="memory",
                              reason=f"does not fit: out of memory ({_short_error(error, 300)})")
            else:
                record.update(status="failed", reason=_short_error(error))
            return record
        finally:
            del step
        record.update(timing)
        seconds = timing["median_ms"] * 1e-3
        record["bytes_per_s"] = cell.min_bytes / seconds
        record["copy_fraction"] = record["bytes_per_s"] / self.doc["copy_bandwidth"]["bytes_per_s"]
        values = [timing["loss_value"]] + ([timing["grad_norm"]] if timing["grad_norm"] is not None else [])
        if all(math.isfinite(v) for v in values):
            record["status"] = "ok"
        else:
            record.update(status="failed", reason=f"non-finite result: loss {timing['loss_value']}, "
                                                  f"gradient norm {timing['grad_norm']}")
        return record

    def _record(self, cell: Cell, **fields) -> dict:
        return _cell_record(CASES[cell.case], cell.n, cell.c, cell.dtype, cell.mode, cell.provider,
                            min_bytes=cell.min_bytes, **fields)

    def _progress(self, index: int, total: int, record: dict, planner: Planner) -> None:
        elapsed = time.perf_counter() - self.started
        left = planner.estimate(index + 1)
        head = (f"[{index + 1:>4}/{total} {elapsed:6.1f}s, ~{left:4.0f}s left] {record['loss']} "
                f"N={record['n']} C={record['c']} {record['dtype']} {record['mode']} {record['provider']}: ")
        if record["status"] == "ok":
            peak = record["peak_bytes_above_inputs"]
            log(head + f"{record['median_ms']:.3f} ms ({record['reps']} runs), "
                f"{record['bytes_per_s'] / 1e9:.3g} GB/s = {record['copy_fraction']:.0%} of copy"
                + ("" if peak is None else f", peak +{peak / 2**20:.0f} MiB")
                + ("" if record.get("host_ms") is None else f", host {record['host_ms']:.3f} ms/call")
                + (f", first call {record['first_call_s']:.1f} s" if record["first_call_s"] > 1 else ""))
        else:
            log(head + f"{record['status']}: {record['reason'].splitlines()[0][:200]}")

    # ----------------------------------------------------------------- output
    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "CPU"

    def _document(self, copy: dict, provider_status: dict, estimate: float) -> dict:
        import mpt_kernels

        s = self.settings
        date = environment.now_utc()
        doc_versions = environment.versions()
        doc_versions["mpt_kernels"] = mpt_kernels.__version__
        return {
            "schema": 1,
            "tool": "mpt-kernels bench",
            "date_utc": date.isoformat(timespec="seconds"),
            "gpu_figures": s["gpu"],
            "notice": None if s["gpu"] else CPU_NOTICE,
            "command": sys.argv,
            "device": environment.device_info(self.device, self.clock),
            "versions": doc_versions,
            "git": environment.git_state(),
            "source_digest": environment.source_digest(),
            "environment": environment.relevant_environment(),
            "launch_settings": environment.launch_settings(),
            "timer": self.clock.description,
            "copy_bandwidth": copy,
            "settings": {
                "sweep": s["sweep"], "losses": s["cases"], "providers": s["providers"], "dtypes": s["dtypes"],
                "modes": s["modes"], "n": s["n"], "c": s["c"], "old_classes": "K = C // 2",
                "rep_ms": s["rep_ms"], "min_reps": s["min_reps"], "max_reps": s["max_reps"],
                "budget_s": s["budget_s"], "seed": s["seed"], "grad_output": s["grad_output"],
                "cpu_threads": None if s["gpu"] else torch.get_num_threads(),
                "compile": {"dynamic": s["compile_dynamic"], "mode": "default"},
            },
            "providers": provider_status,
            "losses": {name: {"title": case.title, "family": case.family, "min_bytes": case.bytes_formula,
                              "liger": case.liger_note}
                       for name, case in CASES.items() if name in s["cases"]},
            "estimate_s": estimate,
            "elapsed_s": None,
            "complete": False,
            "aborted": None,
            "cells": self.cells,
        }

    def _save(self, final: bool = False) -> dict:
        """Writes the JSON file (while running, so an interrupted run leaves one), and at
        the end the markdown and the plots too."""
        self._last_save = time.perf_counter()
        self.doc["elapsed_s"] = self._last_save - self.started
        report.annotate(self.doc)
        paths = report.write(self.doc, self.out_dir, self.stem, markdown=final, plots=final and self.write_plots)
        if final:
            for path in paths:
                log(f"wrote {path}")
        return self.doc


def run_sweep(settings: dict, out_dir: Path, write_plots: bool) -> dict:
    if settings["gpu"]:
        return Sweep(settings, out_dir, write_plots).run()
    # One CPU thread: tiny tensors gain nothing from more, and on a busy machine idle
    # threads spinning at barriers made eager calls a hundred times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        return Sweep(settings, out_dir, write_plots).run()
    finally:
        torch.set_num_threads(threads)
