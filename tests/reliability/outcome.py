"""The result of one fault scenario: measured figures and named pass conditions.

The bounded tests in ``tests/reliability`` assert ``outcome.passed``; ``tests/proof/run_proof.py``
runs the same scenarios full-size and prints every outcome's summary in a table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    """Figures measured by a scenario and the checks that decide whether it passed."""

    test: str
    title: str
    figures: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    summary: str = ""
    seconds: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    targets: dict[str, bool] = field(default_factory=dict)

    def check(self, name: str, ok: bool) -> bool:
        """Record a named pass condition."""
        self.checks[name] = bool(ok)
        return bool(ok)

    def target(self, name: str, ok: bool) -> bool:
        """Record a timing or throughput target of the catalogue.

        Targets depend on the machine's speed and load, so they do not decide ``passed`` (the
        bounded tests in ``make test`` are not timed tests); ``make proof`` reports every
        missed target and does not call a run with one "all passed".
        """
        self.targets[name] = bool(ok)
        return bool(ok)

    @property
    def targets_missed(self) -> list[str]:
        return [name for name, ok in self.targets.items() if not ok]

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(self.checks.values())

    @property
    def failures(self) -> list[str]:
        failed = [name for name, ok in self.checks.items() if not ok]
        return failed + ([f"error: {self.error}"] if self.error else [])

    def report(self) -> str:
        """A multi-line description for assertion messages."""
        figures = json.dumps(self.figures, indent=1, default=str)
        return (
            f"{self.test} {self.title}: {self.summary}\nfailed: {self.failures}\n"
            f"figures: {figures}\nnotes: {self.notes}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "title": self.title,
            "passed": self.passed,
            "summary": self.summary,
            "figures": self.figures,
            "checks": self.checks,
            "targets": self.targets,
            "seconds": round(self.seconds, 1),
            "error": self.error,
            "notes": self.notes,
        }


@contextmanager
def timed(outcome: Outcome) -> Iterator[Outcome]:
    """Measure the scenario's wall time into ``outcome.seconds``."""
    start = time.monotonic()
    try:
        yield outcome
    finally:
        outcome.seconds = time.monotonic() - start
