"""Timing on a shared machine: interleaved rounds, medians, per-round ratios.

Variants of one comparison run in the same process, interleaved: round ``r`` times A, B, C…,
round ``r + 1`` the reverse order. Each block starts with a short pause and one untimed warm
call, then times ``inner`` calls one by one. A drift of the machine's load affects every
variant of a round alike, so the **median over rounds of the per-round ratio** is far more
stable than a ratio of two medians taken minutes apart.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.reliability.harness import children


def loadavg() -> float:
    """1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every live descendant, plus the children
    each of them has already reaped (Linux ``/proc``; 0 for a process that is gone).

    A worker's pool children run the jobs, so a worker's cost is its whole tree; children
    replaced by the pool were waited for and count in their parent's ``cutime``/``cstime``.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # fields[0] is field 3 of proc(5): utime, stime, cutime, cstime are fields 14–17
    own = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return own + sum(process_tree_cpu_seconds(k) for k in children(pid))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


@dataclass
class Stats:
    """Wall-clock statistics of one variant, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    thread_cpu_ms: float  # CPU time of the calling thread (= compute time for 1-thread work)
    rounds_ms: list[float] = field(default_factory=list)  # per-round medians
    ratios: dict[str, float] = field(default_factory=dict)  # median per-round ratio vs a ref

    def to_json(self) -> dict[str, object]:
        return {
            "median_ms": self.median_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "n": self.n,
            "thread_cpu_ms": self.thread_cpu_ms,
            "ratios": dict(self.ratios),
        }


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    rounds: int = 5,
    block_s: float = 0.3,
    max_inner: int = 20,
    refs: Sequence[str] = (),
    gap_s: float = 0.02,
) -> dict[str, Stats]:
    """Time zero-argument callables interleaved; see the module docstring.

    ``refs`` names variants against which every variant gets ``ratios[ref]`` = median over
    rounds of (its round median / the ref's round median).
    """
    names = list(fns)
    estimate: dict[str, float] = {}
    for name in names:  # warm-up (first calls allocate, JIT layouts, fill caches)
        fns[name]()
        t0 = time.perf_counter()
        fns[name]()
        estimate[name] = time.perf_counter() - t0
    inner = {n: max(1, min(max_inner, int(block_s / max(estimate[n], 1e-6)))) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            time.sleep(gap_s)
            if estimate[name] < 0.5:
                fns[name]()  # untimed warm call after switching variant
            block = []
            for _ in range(inner[name]):
                c0 = time.thread_time()
                t0 = time.perf_counter()
                fns[name]()
                block.append(time.perf_counter() - t0)
                cpu[name].append(time.thread_time() - c0)
            times[name] += block
            per_round[name].append(statistics.median(block))
    out: dict[str, Stats] = {}
    for name in names:
        t = times[name]
        stats = Stats(
            median_ms=1e3 * statistics.median(t),
            p10_ms=1e3 * percentile(t, 10),
            p90_ms=1e3 * percentile(t, 90),
            n=len(t),
            thread_cpu_ms=1e3 * statistics.median(cpu[name]),
            rounds_ms=[1e3 * x for x in per_round[name]],
        )
        for ref in refs:
            if ref in per_round:
                stats.ratios[ref] = statistics.median(
                    a / b for a, b in zip(per_round[name], per_round[ref], strict=True)
                )
        out[name] = stats
    return out


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of element-wise ratios a[i] / b[i] (paired measurements)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))
