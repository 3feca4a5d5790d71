"""The rules of the security scans (the scans themselves run from ``tests/security/scan.py``):
waivers need a reason and dates, expired waivers cover nothing, and bandit sees a planted
high-severity finding."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from tests.security.scan import WAIVERS, Finding, load_waivers, unwaived


def test_the_waiver_file_is_valid_and_current() -> None:
    for waiver in load_waivers(WAIVERS):
        assert waiver.added <= date.today() <= waiver.expires, waiver


def test_expired_or_unexplained_waivers_do_not_count(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(
        '[[waiver]]\ntool = "pip-audit"\nid = "GHSA-1"\nreason = "not reachable"\n'
        "added = 2026-01-01\nexpires = 2026-02-01\n"
        '[[waiver]]\ntool = "pip-audit"\nid = "GHSA-2"\nreason = "not reachable"\n'
        "added = 2026-01-01\nexpires = 2099-01-01\n"
    )
    findings = [Finding("pip-audit", "GHSA-1", "a"), Finding("pip-audit", "GHSA-2", "b"),
                Finding("bandit", "B602:x.py:1", "c")]  # fmt: skip
    left = unwaived(findings, load_waivers(path), date(2026, 6, 1))
    assert [f.id for f in left] == ["GHSA-1", "B602:x.py:1"]
    path.write_text('[[waiver]]\ntool = "bandit"\nid = "B1"\nreason = " "\n'
                    "added = 2026-01-01\nexpires = 2099-01-01\n")  # fmt: skip
    with pytest.raises(ValueError, match="reason"):
        load_waivers(path)


def test_bandit_reports_a_planted_high_finding(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "import subprocess\nsubprocess.call('ls ' + input(), shell=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "bandit", "-r", str(tmp_path), "-f", "json", "-q"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    severities = {r["issue_severity"] for r in json.loads(result.stdout)["results"]}
    assert "HIGH" in severities
