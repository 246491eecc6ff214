"""``mpt-kernels bench``: the benchmark suite.

Every loss (``mpt_loss`` KL and LM with both sources, ``margin_cross_entropy``,
``focal_distillation``, ``hill_loss``, ``splc_loss``) x provider (the ``triton`` and
``cuda`` backends, the eager reference, torch.compile of the reference, Liger-Kernel's
kernels composed into the loss where that makes sense) x shape x dtype x mode
(forward, forward+backward). Each cell: the median time (CUDA events, cold L2), the
minimum bytes, the bandwidth they give and its fraction of the device's copy
bandwidth, and the peak memory above the inputs. Writes a JSON file, a markdown table
and PNG plots. Without a GPU, ``--quick`` runs a tiny CPU smoke run that says so.

This module stays light to import (``mpt_kernels.cli`` builds its parser from it):
the sweep, the timers and matplotlib are imported in ``run``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cases import CASE_NAMES
from .providers import PROVIDER_NAMES

DTYPE_NAMES = ("bf16", "fp16", "fp32")
MODE_NAMES = ("fwd", "fwd+bwd")
DEFAULT_OUT = Path("benchmarks") / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pick = parser.add_argument_group("what to run (default: everything; the full sweep needs a GPU)")
    pick.add_argument("--loss", nargs="+", choices=CASE_NAMES, metavar="LOSS",
                      help=f"losses ({', '.join(CASE_NAMES)})")
    pick.add_argument("--provider", nargs="+", choices=PROVIDER_NAMES, metavar="PROVIDER",
                      help=f"providers ({', '.join(PROVIDER_NAMES)}); default: all on a GPU; on CPU the "
                           "reference and the Triton interpreter (TRITON_INTERPRET=1) or torch.compile")
    pick.add_argument("--dtype", nargs="+", choices=DTYPE_NAMES, help="logit dtypes (default bf16 fp32)")
    pick.add_argument("--mode", nargs="+", choices=MODE_NAMES, help="fwd and/or fwd+bwd (default both)")
    pick.add_argument("--n", nargs="+", type=int, metavar="N", help="rows (default 1024 4096 16384)")
    pick.add_argument("--c", nargs="+", type=int, metavar="C",
                      help="classes (default 1000 8192 32768 131072); old classes K = C/2")
    pick.add_argument("--quick", action="store_true",
                      help="a small sweep (GPU); without a GPU, the CPU smoke run on tiny shapes")
    pick.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--budget-s", type=float, default=None,
                        help="time budget for the whole run: repetitions are trimmed to fit it, "
                             "and cells are skipped once the run is 1.2x past it")
    timing.add_argument("--rep-ms", type=float, default=None,
                        help="timed runs per cell: about this many ms (default 100 on GPU)")
    timing.add_argument("--min-reps", type=int, default=None, help="at least this many timed runs (default 5)")
    timing.add_argument("--max-reps", type=int, default=None, help="at most this many timed runs (default 100)")
    timing.add_argument("--compile-shapes", choices=("dynamic", "static"), default="dynamic",
                        help="torch.compile with dynamic shapes (one graph per loss, dtype and mode; "
                             "default) or static (one per shape too: slower to compile)")
    timing.add_argument("--grad-output", type=float, default=1.0, metavar="G",
                        help="the upstream gradient of the fwd+bwd mode (default 1: loss.backward()). The "
                             "fused backends make the gradient for 1 in the forward and recompute it in the "
                             "backward where it is not 1 (GradScaler, a weighted loss): one more read of the "
                             "inputs and a gradient write, which G = 0.5, say, times")
    timing.add_argument("--seed", type=int, default=0)
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for the JSON, markdown and PNG files (default benchmarks/results)")
    output.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    output.add_argument("--from-json", type=Path, metavar="FILE", nargs="+",
                        help="run nothing: remake the markdown and plots of an earlier run's JSON file; "
                             "several files (one sweep split over calls) are merged into one report, "
                             "JSON included")


def run(args) -> int:
    import json

    from . import report

    if args.from_json is not None:
        docs = [json.loads(path.read_text()) for path in args.from_json]
        out = args.out if args.out != DEFAULT_OUT else args.from_json[0].parent
        if len(docs) == 1:
            doc, stem, data = docs[0], args.from_json[0].stem, False
        else:
            doc = report.merge(docs)
            stem, data = report.file_stem(doc) + "-merged", True
        if report.rederive_bytes(doc):
            data = True  # the JSON must say what the tables say
        report.annotate(doc)
        for path in report.write(doc, out, stem, data=data, plots=not args.no_plots):
            print(f"wrote {path}")
        return 0

    from .runner import resolve, run_sweep

    doc = run_sweep(resolve(args), args.out, write_plots=not args.no_plots)
    print("\n".join(report.summary(doc)))
    ran = any(cell["status"] == "ok" for cell in doc["cells"])
    if not ran:
        print("mpt-kernels bench: no cell ran (see the providers' reasons above)")
    return 0 if doc["complete"] and ran else 1
