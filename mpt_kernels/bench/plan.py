"""How long the sweep will take, and how many repetitions fit in a time budget.

The model below is a guess made before anything ran (per call: the minimum bytes at a
provider-typical fraction of the copy bandwidth, or a launch floor; per cell: a fixed
overhead and the untimed calls; once per compiled graph or kernel specialisation: a
first-call cost). As cells finish, each provider's estimates are rescaled by what was
measured, and the repetition budget of the remaining cells is chosen again so that the
estimate fits the time left. Only the number of repetitions is trimmed; a cell is
skipped for time only once the run is well past its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Guesses for the plan only, never reported as measurements.
COPY_FRACTION = {"triton": 0.7, "cuda": 0.7, "liger": 0.25, "compile": 0.35, "reference": 0.08}
LAUNCH_MS = {"triton": 0.03, "cuda": 0.03, "liger": 0.4, "compile": 0.1, "reference": 0.8}
FIRST_CALL_S = {"triton": 0.6, "cuda": 0.3, "liger": 0.6, "compile": 10.0, "reference": 0.0}
CPU_FIRST_CALL_S = {"compile": 20.0}
CPU_BYTES_PER_S = 2e9
CPU_INTERPRETER_MS_PER_ROW = 60.0  # Triton interpreter: a program per row, numpy per block op
CELL_OVERHEAD_S = 0.02
PRIOR_WEIGHT_S = 2.0  # how strongly the guesses hold against the first measurements
OVERRUN_FACTOR = 1.2  # past budget x this, the remaining cells are skipped


@dataclass(frozen=True)
class Cell:
    case: str
    n: int
    c: int
    dtype: str
    mode: str  # "fwd" | "fwd+bwd"
    provider: str
    min_bytes: int


def first_call_key(cell: Cell, compile_dynamic: bool):
    """What a first-call cost is paid once for: a compiled graph, a kernel specialisation."""
    if cell.provider == "reference":
        return None
    if cell.provider == "compile":
        shape = () if compile_dynamic else (cell.n, cell.c)
        return (cell.provider, cell.case, cell.dtype, cell.mode, *shape)
    return (cell.provider, cell.case, cell.dtype, cell.mode, cell.c)


class Planner:
    def __init__(self, cells, *, gpu: bool, copy_bytes_per_s: float, flush_ms: float,
                 rep_ms: float, min_reps: int, max_reps: int, untimed_calls: int, compile_dynamic: bool):
        self.rep_ms, self.min_reps, self.max_reps = rep_ms, min_reps, max_reps
        self.untimed_calls = untimed_calls  # the first call, the probes, the memory/sanity call
        self.flush_ms = flush_ms
        providers = sorted({cell.provider for cell in cells})
        self._provider_index = {p: i for i, p in enumerate(providers)}
        self.providers = np.array([self._provider_index[cell.provider] for cell in cells], dtype=np.int64)
        self.call_ms = np.array([self._call_ms(cell, gpu, copy_bytes_per_s) for cell in cells])
        seen = set()
        first = []
        for cell in cells:
            key = first_call_key(cell, compile_dynamic)
            cost = 0.0
            if key is not None and key not in seen:
                seen.add(key)
                table = FIRST_CALL_S if gpu else CPU_FIRST_CALL_S
                cost = table.get(cell.provider, 0.0)
            first.append(cost)
        self.first_s = np.array(first)
        # measured / estimated, per provider, for one-time costs and for the rest
        self._first = np.full((len(providers), 2), PRIOR_WEIGHT_S)
        self._run = np.full((len(providers), 2), PRIOR_WEIGHT_S)

    @staticmethod
    def _call_ms(cell: Cell, gpu: bool, copy_bytes_per_s: float) -> float:
        passes = 2.0 if cell.mode == "fwd+bwd" else 1.0
        if gpu:
            bandwidth = copy_bytes_per_s * COPY_FRACTION.get(cell.provider, 0.1)
            return max(LAUNCH_MS.get(cell.provider, 0.5) * passes, cell.min_bytes / bandwidth * 1e3)
        if cell.provider == "triton":  # the interpreter
            return CPU_INTERPRETER_MS_PER_ROW * cell.n * passes
        return 0.3 * passes + cell.min_bytes / CPU_BYTES_PER_S * 1e3 * 10

    def _reps(self, call_ms: np.ndarray, rep_ms: float) -> np.ndarray:
        return np.clip(np.floor(rep_ms / np.maximum(call_ms, 1e-3)), self.min_reps, self.max_reps)

    def _run_estimate(self, sl: slice, rep_ms: float) -> np.ndarray:
        call_ms = self.call_ms[sl]
        calls = self.untimed_calls + self._reps(call_ms, rep_ms)
        return CELL_OVERHEAD_S + calls * (call_ms + self.flush_ms) * 1e-3

    def estimate(self, start: int = 0, rep_ms: float = None) -> float:
        """Seconds for cells[start:] at a repetition budget of ``rep_ms`` per cell."""
        rep_ms = self.rep_ms if rep_ms is None else rep_ms
        sl = slice(start, None)
        p = self.providers[sl]
        first_ratio = self._first[p, 0] / self._first[p, 1]
        run_ratio = self._run[p, 0] / self._run[p, 1]
        return float((self.first_s[sl] * first_ratio).sum() + (self._run_estimate(sl, rep_ms) * run_ratio).sum())

    def first_call_estimate(self) -> float:
        return float(self.first_s.sum())

    def choose_rep_ms(self, start: int, seconds_left) -> float:
        """The largest repetition budget (at most the configured one) whose estimate fits."""
        if seconds_left is None or self.estimate(start, self.rep_ms) <= seconds_left:
            return self.rep_ms
        if self.estimate(start, 0.0) >= seconds_left:
            return 0.0  # minimum repetitions
        low, high = 0.0, self.rep_ms
        for _ in range(20):
            middle = 0.5 * (low + high)
            if self.estimate(start, middle) <= seconds_left:
                low = middle
            else:
                high = middle
        return low

    def record(self, index: int, rep_ms: float, wall_s: float, first_call_s: float) -> None:
        """Fold a finished cell's measured wall time into its provider's ratios."""
        p = self.providers[index]
        run_s = wall_s
        if self.first_s[index] > 0:
            self._first[p] += (first_call_s, self.first_s[index])
            run_s = max(0.0, wall_s - first_call_s)
        self._run[p] += (run_s, float(self._run_estimate(slice(index, index + 1), rep_ms)[0]))
