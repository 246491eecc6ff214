"""Results: the JSON file, the markdown tables and the plots, all made from the JSON
document alone (``mpt-kernels bench --from-json FILE`` remakes them), so no figure is
ever edited by hand."""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

DISPLAY_ORDER = ("triton", "cuda", "liger", "compile", "reference")
BASELINES = ("reference", "compile")
BASELINE_LABEL = {"reference": "eager", "compile": "compile"}
DTYPE_ORDER = ("bf16", "fp16", "fp32")
MODE_LABEL = {"fwd": "forward", "fwd+bwd": "forward+backward"}
# Relative difference from the eager reference (loss, gradient norm) beyond which a cell is flagged.
TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2, "fp32": 1e-3}
# A cell whose host time per call is at least this fraction of its measured time is marked
# host-bound: the CPU's Python and launch path, not the device, set its time.
HOST_BOUND = 0.8


def host_bound(cell: dict) -> bool:
    host = cell.get("host_ms")
    return host is not None and host >= HOST_BOUND * cell["median_ms"]


def speedup_host_bound(cell: dict, baseline: Optional[dict]) -> bool:
    """A speed-up of two times of which one is host-bound compares launch paths, not kernels."""
    return host_bound(cell) or (baseline is not None and _ok(baseline) and host_bound(baseline))


def _key(cell: dict, provider: str = None) -> tuple:
    return (cell["loss"], cell["n"], cell["c"], cell["dtype"], cell["mode"], provider or cell["provider"])


def _by_key(cells) -> dict:
    """The cells by _key (a baseline cell is ``_by_key(cells).get(_key(cell, baseline))``)."""
    return {_key(cell): cell for cell in cells}


def _ok(cell) -> bool:
    return cell is not None and cell.get("status") == "ok"


def _relative(value, reference):
    if value is None or reference is None:
        return None
    return abs(value - reference) / max(abs(reference), 1e-12)


def annotate(doc: dict) -> None:
    """Speed-ups against the eager reference and torch.compile, and the sanity check
    against the reference's loss and gradient norm, for every cell that ran."""
    cells = _by_key(doc["cells"])
    for cell in doc["cells"]:
        if not _ok(cell):
            continue
        provider = cell["provider"]
        for baseline in BASELINES:
            if provider == "reference" or provider == baseline:
                continue
            other = cells.get(_key(cell, baseline))
            cell[f"speedup_vs_{baseline}"] = other["median_ms"] / cell["median_ms"] if _ok(other) else None
        if provider == "reference":
            continue
        ref = cells.get(_key(cell, "reference"))
        if not _ok(ref):
            cell["check"] = None
            continue
        cell["rel_diff_loss"] = _relative(cell["loss_value"], ref["loss_value"])
        cell["rel_diff_grad_norm"] = _relative(cell.get("grad_norm"), ref.get("grad_norm"))
        worst = max(d for d in (cell["rel_diff_loss"], cell["rel_diff_grad_norm"], 0.0) if d is not None)
        cell["check"] = "ok" if worst <= TOLERANCE.get(cell["dtype"], 1e-2) else "mismatch"


def rederive_bytes(doc: dict) -> int:
    """Recomputes each measured cell's minimum bytes from its shape, dtype, mode and the
    target bytes the run recorded, with this version's formulas (``cases.py``); where they
    differ, the bandwidth and copy fraction follow (the measured times are untouched).
    Runs made before this function existed (2026-11-22) planned the multi-label cells with targets as
    wide as the logits while the inputs were bool. Returns how many cells changed, and
    notes it in the document."""
    from .cases import CASES, DTYPES

    changed = 0
    for cell in doc["cells"]:
        t = cell.get("target_element_bytes")
        if not _ok(cell) or t is None or cell["loss"] not in CASES:
            continue
        right = CASES[cell["loss"]].min_bytes(cell["n"], cell["c"], cell["k"], DTYPES[cell["dtype"]].itemsize, t,
                                              cell["mode"] == "fwd+bwd")
        if right != cell["min_bytes"]:
            factor = right / cell["min_bytes"]
            cell["min_bytes"] = right
            cell["bytes_per_s"] *= factor
            cell["copy_fraction"] *= factor
            changed += 1
    if changed:
        doc["rederived"] = (f"min_bytes, bytes_per_s and copy_fraction of {changed} cell(s) re-derived from the "
                            "recorded shapes and target bytes (the run had counted bool multi-label targets "
                            "as wide as the logits); times unchanged")
    return changed


def grad_output(doc: dict) -> float:
    """The fwd+bwd cells' upstream gradient (1 in runs from before it was recorded)."""
    return doc["settings"].get("grad_output", 1.0)


def merge(docs: list) -> dict:
    """One document from the runs of one sweep split over several calls (a GPU lease
    limits each call): the same device, code and settings of compile, every cell of
    every part (a cell measured twice keeps the later part's). Each cell keeps the
    fraction of its own run's copy bandwidth; the parts' bandwidths are listed."""
    first = docs[0]
    for doc in docs[1:]:
        for what, get in (("device", lambda d: d["device"].get("name")), ("commit", lambda d: d["git"].get("commit")),
                          ("source digest", lambda d: d["source_digest"]),
                          ("torch.compile settings", lambda d: d["settings"]["compile"]),
                          ("upstream gradients", grad_output),
                          ("launch settings", lambda d: d.get("launch_settings"))):
            if get(doc) != get(first):
                raise ValueError(f"cannot merge runs of different {what}: {get(first)!r} and {get(doc)!r}")
    merged = dict(first)
    cells = {}
    for doc in docs:  # a later part's cell replaces an earlier one, but never a measured one by one that is not
        for cell in doc["cells"]:
            kept = cells.get(_key(cell))
            if kept is None or cell["status"] == "ok" or kept["status"] != "ok":
                cells[_key(cell)] = cell
    merged["cells"] = list(cells.values())
    merged["providers"] = {name: info for doc in docs for name, info in doc["providers"].items()}
    merged["losses"] = {name: info for doc in docs for name, info in doc["losses"].items()}
    merged["complete"] = all(doc.get("complete", True) for doc in docs)
    merged["aborted"] = "; ".join(doc["aborted"] for doc in docs if doc.get("aborted")) or None
    merged["elapsed_s"] = sum(doc.get("elapsed_s") or 0 for doc in docs)
    merged["estimate_s"] = sum(doc.get("estimate_s") or 0 for doc in docs)
    merged["parts"] = [{"date_utc": doc["date_utc"], "command": doc["command"],
                        "copy_bandwidth": doc["copy_bandwidth"]} for doc in docs]
    return merged


def file_stem(doc: dict) -> str:
    date = datetime.datetime.fromisoformat(doc["date_utc"])
    if doc["gpu_figures"]:
        device = re.sub(r"[^a-z0-9]+", "-", doc["device"]["name"].lower()).strip("-")
    else:
        device = "cpu-smoke"
    return f"bench-{date:%Y%m%d-%H%M%S}-{device}"


def _finite(value):
    """JSON has no NaN or infinity: they become null (the cell's status says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write(doc: dict, out_dir: Path, stem: str, *, data: bool = True, markdown: bool = True,
          plots: bool = True) -> list:
    """Writes ``<stem>.json`` (unless ``data`` is False), ``.md`` and the PNG plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if data:
        paths.append(out_dir / f"{stem}.json")
        paths[-1].write_text(json.dumps(_finite(doc), indent=1, allow_nan=False, default=str) + "\n")
    if markdown:
        paths.append(out_dir / f"{stem}.md")
        paths[-1].write_text(to_markdown(doc))
    if plots:
        paths.extend(write_plots(doc, out_dir, stem))
    return paths


# --------------------------------------------------------------------------- markdown
def _ms(ms: float) -> str:
    """Three or more significant digits, never in scientific notation."""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _mib(nbytes) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


def _cell_text(cell) -> str:
    if cell is None:
        return ""
    if cell["status"] == "ok":
        text = f"{_ms(cell['median_ms'])} ms · {cell['copy_fraction']:.0%}"
        if cell.get("peak_bytes_above_inputs") is not None:
            text += f" · +{_mib(cell['peak_bytes_above_inputs'])}"
        text += " ʰ" if host_bound(cell) else ""
        return text + (" ⚠" if cell.get("check") == "mismatch" else "")
    if cell["status"] == "failed":
        return "failed"
    return {"memory": "no fit", "time": "no time", "n/a": "n/a", "aborted": "aborted"}.get(cell.get("skip"), "skipped")


def _providers_in(cells) -> list:
    present = {c["provider"] for c in cells if c.get("skip") != "n/a"}
    return [p for p in DISPLAY_ORDER if p in present]


def _table(doc: dict, loss: str, mode: str) -> list:
    cells = [c for c in doc["cells"] if c["loss"] == loss and c["mode"] == mode]
    shown = _providers_in(cells)
    if not shown:
        return []
    by_key = _by_key(cells)
    fast = [p for p in shown if p not in BASELINES]
    speedups = [(p, b) for p in fast for b in BASELINES if b in shown]
    if "compile" in shown and "reference" in shown:
        speedups.append(("compile", "reference"))
    header = ["dtype", "N", "C", "min MB"] + shown + [f"{p} ×{BASELINE_LABEL[b]}" for p, b in speedups]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = sorted({(c["dtype"], c["n"], c["c"]) for c in cells},
                  key=lambda r: (DTYPE_ORDER.index(r[0]) if r[0] in DTYPE_ORDER else 9, r[1], r[2]))
    for dtype, n, c in rows:
        row_cells = [by_key.get((loss, n, c, dtype, mode, p)) for p in shown]
        min_bytes = next((x["min_bytes"] for x in row_cells if x is not None and x.get("min_bytes")), None)
        entries = [dtype, str(n), str(c), "" if min_bytes is None else _ms(min_bytes / 1e6)]
        entries += [_cell_text(x) for x in row_cells]
        for p, b in speedups:
            x = by_key.get((loss, n, c, dtype, mode, p))
            value = x.get(f"speedup_vs_{b}") if _ok(x) else None
            mark = " ʰ" if value is not None and speedup_host_bound(x, by_key.get((loss, n, c, dtype, mode, b))) else ""
            entries.append("" if value is None else f"{value:.3g}×{mark}")
        lines.append("| " + " | ".join(entries) + " |")
    return lines


def _grouped(cells, status: str) -> list:
    groups = defaultdict(list)
    for c in cells:
        if c["status"] == status:
            groups[(c["provider"], (c["reason"] or "").splitlines()[0][:300])].append(c)
    lines = []
    for (provider, reason), members in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        examples = ", ".join(f"{c['loss']} N={c['n']} C={c['c']} {c['dtype']} {c['mode']}" for c in members[:3])
        more = f" and {len(members) - 3} more" if len(members) > 3 else ""
        lines.append(f"- **{provider}**, {len(members)} cell(s) ({examples}{more}): {reason}")
    return lines


def to_markdown(doc: dict) -> str:
    device, versions, git = doc["device"], doc["versions"], doc["git"]
    copy = doc["copy_bandwidth"]
    lines = [f"# mpt-kernels benchmark: {device.get('name')} ({doc['date_utc']})", ""]
    if not doc["gpu_figures"]:
        lines += [f"> **{doc['notice']}**", ""]
    if not doc.get("complete", True):
        lines += [f"> **Incomplete run**: {doc.get('aborted') or 'interrupted before the end'}", ""]
    commit = git.get("commit") or "unknown"
    dirty = {True: " (tree dirty)", False: "", None: ""}[git.get("dirty")]
    lines += [
        f"- code: commit {commit}{dirty}, source digest {doc['source_digest'][:16]}",
        f"- device: {device.get('name')}"
        + (f", capability {device['capability']}, driver {device.get('driver')}, CUDA {device.get('cuda_runtime')}"
           if device.get("type") == "cuda" else ""),
        f"- versions: torch {versions['torch']}, triton {versions['triton']}, python {versions['python']}"
        + (f", liger-kernel {versions['liger_kernel']}" if versions.get("liger_kernel") else ""),
        f"- timing: {doc['timer']}",
        f"- copy bandwidth (torch copy, read + write): {copy['bytes_per_s'] / 1e9:.0f} GB/s"
        + ("" if "parts" not in doc else
           f"; merged from {len(doc['parts'])} runs, each cell against its own run's copy bandwidth ("
           + ", ".join(f"{part['copy_bandwidth']['bytes_per_s'] / 1e9:.0f}" for part in doc["parts"]) + " GB/s)"),
        "- each cell: `time ms · min bytes / time as a fraction of the copy bandwidth · peak memory above the inputs`;"
        " ⚠ marks a loss or gradient norm off the eager reference by more than "
        + ", ".join(f"{v:g} ({k})" for k, v in TOLERANCE.items()) + " (relative)"
        + (f"; ʰ marks a host-bound cell: launching its call took at least {HOST_BOUND:.0%} of its time "
           "(the CPU's Python and launch path decide it, not the kernels), and a speed-up with a host-bound "
           "side; the plots draw those points hollow"
           if any(c.get("host_ms") is not None for c in doc["cells"]) else "")
        + "; the copy both reads and writes, so a forward cell (nearly all reads) may pass 100%",
        f"- fwd+bwd: backward with upstream gradient {grad_output(doc):g}"
        + (" (a plain `loss.backward()`): the fused backends make that gradient in the forward; a scaled loss "
           "(GradScaler, a weight) costs them one more read of the inputs and a gradient write "
           "(`--grad-output` times it)" if grad_output(doc) == 1.0 else
           ": the fused backends recompute the gradient in the backward, the eager and compiled reference as always"),
        f"- torch.compile: {'dynamic' if doc['settings']['compile']['dynamic'] else 'static'} shapes, default mode"
        + (" (one graph per loss, dtype and mode, its kernels tuned at the first shape it ran, the smallest; "
           "`--compile-shapes static` compiles and tunes each shape)" if doc["settings"]["compile"]["dynamic"] else ""),
        *(["- launch settings: " + ", ".join(f"{k} = {v}" for k, v in doc["launch_settings"].items())]
          if doc.get("launch_settings") else []),
        f"- wall time {doc.get('elapsed_s') or 0:.0f} s (estimated {doc.get('estimate_s') or 0:.0f} s before the run)",
    ]
    if doc.get("rederived"):
        lines.append(f"- {doc['rederived']}")
    lines += [
        "",
        "## Providers",
        "",
    ]
    for name, status in doc["providers"].items():
        lines.append(f"- **{name}**: {status['description']}"
                     + ("" if status["available"] else f" — not run: {status['reason']}"))
    lines += ["", "## Minimum bytes (e = bytes per logit, t = per target element, K = C/2)", ""]
    for name, info in doc["losses"].items():
        lines.append(f"- **{name}** ({info['title']}): {info['min_bytes']}; Liger: {info['liger']}")
    for loss in doc["losses"]:
        for mode in MODE_LABEL:
            table = _table(doc, loss, mode)
            if table:
                lines += ["", f"## {loss} — {MODE_LABEL[mode]}", ""] + table
    mismatches = [c for c in doc["cells"] if c.get("check") == "mismatch"]
    if mismatches:
        lines += ["", "## Off the reference (⚠)", ""]
        for c in mismatches:
            lines.append(f"- {c['provider']} {c['loss']} N={c['n']} C={c['c']} {c['dtype']} {c['mode']}: "
                         f"loss {c.get('rel_diff_loss')}, gradient norm {c.get('rel_diff_grad_norm')} (relative)")
    failed = _grouped(doc["cells"], "failed")
    if failed:
        lines += ["", "## Failed cells", ""] + failed
    skipped = _grouped(doc["cells"], "skipped")
    if skipped:
        lines += ["", "## Skipped cells", ""] + skipped
    return "\n".join(lines) + "\n"


def summary(doc: dict) -> list:
    """A few lines for the terminal: each loss, dtype and mode at its largest shape."""
    lines = []
    groups = defaultdict(list)
    by_key = _by_key(doc["cells"])
    for c in doc["cells"]:
        if _ok(c):
            groups[(c["loss"], c["dtype"], c["mode"])].append(c)
    for (loss, dtype, mode), cells in groups.items():
        n, c = max(((x["n"], x["c"]) for x in cells), key=lambda nc: nc[0] * nc[1])
        parts = []
        for x in sorted((x for x in cells if (x["n"], x["c"]) == (n, c)),
                        key=lambda x: DISPLAY_ORDER.index(x["provider"])):
            text = f"{x['provider']} {_ms(x['median_ms'])} ms {x['copy_fraction']:.0%}" + (" ʰ" if host_bound(x) else "")
            ups = [f"{x[k]:.3g}x {BASELINE_LABEL[b]}" + (" ʰ" if speedup_host_bound(x, by_key.get(_key(x, b))) else "")
                   for b in BASELINES if (k := f"speedup_vs_{b}") in x and x[k] is not None]
            parts.append(text + (f" ({', '.join(ups)})" if ups else ""))
        lines.append(f"{loss:<20} {dtype:<4} {mode:<7} N={n:<5} C={c:<6} " + " | ".join(parts))
    counts = defaultdict(int)
    for c in doc["cells"]:
        counts[c["status"]] += 1
    lines.append("cells: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
    if not doc["gpu_figures"]:
        lines.append(doc["notice"])
    return lines


# --------------------------------------------------------------------------- plots
def write_plots(doc: dict, out_dir: Path, stem: str) -> list:
    """Bandwidth vs C per provider, and speed-ups against eager and torch.compile: one
    panel per loss (rows) and dtype/mode (columns), one legend per figure."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'mpt-kernels[bench]')", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ok = [c for c in doc["cells"] if _ok(c)]
    losses = [loss for loss in doc["losses"] if any(c["loss"] == loss for c in ok)]
    panels = sorted({(c["dtype"], c["mode"]) for c in ok},
                    key=lambda p: (DTYPE_ORDER.index(p[0]) if p[0] in DTYPE_ORDER else 9, p[1]))
    if not losses or not panels:
        print("plots skipped: no cell ran", file=sys.stderr)
        return []
    providers = [p for p in DISPLAY_ORDER if any(c["provider"] == p for c in ok)]
    colors = {p: f"C{i}" for i, p in enumerate(DISPLAY_ORDER)}
    n_values = sorted({c["n"] for c in ok})
    n_styles = dict(zip(n_values, ["-", "--", ":", "-."] * 4))
    title_note = "" if doc["gpu_figures"] else " — CPU SMOKE RUN, NOT GPU FIGURES"
    paths = []

    by_key = _by_key(doc["cells"])

    def series(loss, dtype, mode, provider, n, field, baseline=None):
        """Sorted (C, value, host-bound) points of one line (host-bound: the cell, or for a
        speed-up the cell or its baseline)."""
        return sorted((c["c"], c[field], speedup_host_bound(c, by_key.get(_key(c, baseline)) if baseline else None))
                      for c in ok
                      if (c["loss"], c["dtype"], c["mode"], c["provider"], c["n"]) == (loss, dtype, mode, provider, n)
                      and c.get(field) is not None)

    def plot(ax, points, style, color, scale=1.0):
        """A line through the points; host-bound points hollow."""
        cs, values, hollow = zip(*points)
        values = [v * scale for v in values]
        ax.plot(cs, values, style, color=color)
        for filled in (True, False):
            chosen = [(x, v) for x, v, h in zip(cs, values, hollow) if h != filled]
            if chosen:
                ax.plot(*zip(*chosen), "o", markersize=3, color=color, markerfacecolor=color if filled else "white")

    def figure(title, draw, ylabel, log_y, legend):
        rows, cols = len(losses), len(panels)
        fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(4.4 * cols, 3.0 * rows + 1.4))
        fig.suptitle(f"{title}{title_note}\n{doc['device'].get('name')}, {doc['date_utc']}", fontsize=12)
        for row, loss in enumerate(losses):
            for col, (dtype, mode) in enumerate(panels):
                ax = axes[row][col]
                draw(ax, loss, dtype, mode)
                ax.set_xscale("log")
                if log_y:
                    ax.set_yscale("log")
                ax.set_title(f"{loss}, {dtype}, {MODE_LABEL[mode]}", fontsize=9)
                ax.set_xlabel("C (classes)")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="major", linewidth=0.3)
        height = fig.get_size_inches()[1]
        fig.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=8,
                   bbox_to_anchor=(0.5, 1 - 0.75 / height))
        fig.tight_layout(rect=(0, 0, 1, 1 - 1.3 / height))  # room for the title and the legend
        return fig

    def save(fig, name):
        paths.append(out_dir / f"{stem}-{name}.png")
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)

    # bandwidth: colour = provider, line style = N
    copy_gbps = doc["copy_bandwidth"]["bytes_per_s"] / 1e9

    def draw_bandwidth(ax, loss, dtype, mode):
        for provider in providers:
            for n in n_values:
                points = series(loss, dtype, mode, provider, n, "bytes_per_s")
                if points:
                    plot(ax, points, n_styles[n], colors[provider], scale=1e-9)
        ax.axhline(copy_gbps, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylim(bottom=0)

    hollow = ([Line2D([], [], color="black", marker="o", markersize=3, markerfacecolor="white", linestyle="",
                      label="host-bound")] if any(host_bound(c) for c in ok) else [])
    legend = ([Line2D([], [], color=colors[p], marker="o", markersize=3, label=p) for p in providers]
              + [Line2D([], [], color="black", linestyle=n_styles[n], label=f"N={n}") for n in n_values]
              + [Line2D([], [], color="grey", linestyle="--", label=f"copy {copy_gbps:.0f} GB/s")] + hollow)
    save(figure("Minimum bytes / median time (GB/s) vs C", draw_bandwidth, "GB/s", False, legend), "bandwidth")

    # speed-ups at the largest N: colour = provider, line style = baseline
    n_max = max(n_values)
    baseline_styles = {b: style for b, style in (("reference", "-"), ("compile", "--"))
                       if any(c.get(f"speedup_vs_{b}") is not None for c in ok)}

    def draw_speedup(ax, loss, dtype, mode):
        for provider in providers:
            for baseline, style in baseline_styles.items():
                points = series(loss, dtype, mode, provider, n_max, f"speedup_vs_{baseline}", baseline)
                if points:
                    plot(ax, points, style, colors[provider])
        ax.axhline(1.0, color="grey", linewidth=0.8)

    fast = [p for p in providers if p != "reference"]
    if not baseline_styles or not fast:
        print("speed-up plot skipped: no provider ran beside a baseline", file=sys.stderr)
        return paths
    legend = ([Line2D([], [], color=colors[p], marker="o", markersize=3, label=p) for p in fast]
              + [Line2D([], [], color="black", linestyle=style, label=f"against {BASELINE_LABEL[b]}")
                 for b, style in baseline_styles.items()] + hollow)
    save(figure(f"Speed-up vs C at N={n_max}", draw_speedup, "speed-up (x)", True, legend), "speedup")
    return paths
