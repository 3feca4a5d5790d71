"""Security scans with a pass figure: ``bandit`` on our code, ``pip-audit`` on the installed
dependencies. Exit 0 when no high-severity bandit finding and no known dependency
vulnerability remains after the dated waivers in ``scan_waivers.toml``.

    python tests/security/scan.py            # both scans
    python tests/security/scan.py --offline  # bandit only (pip-audit needs the network)

pip-audit queries the PyPI vulnerability database over the network. When it cannot be
reached the scan fails if ``CI=true`` and is reported as skipped otherwise, like the tests that
need a service.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WAIVERS = HERE / "scan_waivers.toml"
BANDIT_TARGETS = ("app", "workers")


@dataclass(frozen=True)
class Finding:
    tool: str
    id: str  # bandit: "<test id>:<path>:<line>"; pip-audit: the advisory id
    text: str


@dataclass(frozen=True)
class Waiver:
    tool: str
    id: str
    reason: str
    added: date
    expires: date


def load_waivers(path: Path = WAIVERS) -> list[Waiver]:
    """The waivers; each needs a reason, the date it was added and an expiry date."""
    if not path.exists():
        return []
    entries = tomllib.loads(path.read_text()).get("waiver", [])
    waivers = []
    for entry in entries:
        missing = {"tool", "id", "reason", "added", "expires"} - set(entry)
        if missing or not str(entry["reason"]).strip():
            raise ValueError(f"waiver {entry.get('id')!r} lacks {sorted(missing) or ['reason']}")
        waivers.append(Waiver(entry["tool"], entry["id"], entry["reason"], entry["added"],
                              entry["expires"]))  # fmt: skip
    return waivers


def unwaived(findings: list[Finding], waivers: list[Waiver], today: date) -> list[Finding]:
    """Findings that no current waiver covers (an expired waiver covers nothing)."""
    active = {(w.tool, w.id) for w in waivers if w.expires >= today}
    return [f for f in findings if (f.tool, f.id) not in active]


def bandit_findings() -> list[Finding]:
    """High-severity bandit findings in our code."""
    result = subprocess.run(
        [sys.executable, "-m", "bandit", "-r", *BANDIT_TARGETS, "-f", "json", "-q"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    report = json.loads(result.stdout)
    if report.get("errors"):
        raise RuntimeError(f"bandit could not scan: {report['errors'][:3]}")
    return [
        Finding("bandit", f"{r['test_id']}:{r['filename']}:{r['line_number']}",
                f"{r['issue_severity']}/{r['issue_confidence']} {r['issue_text']}")
        for r in report["results"]
        if r["issue_severity"] == "HIGH"
    ]  # fmt: skip


def pip_audit_findings() -> list[Finding] | None:
    """Known vulnerabilities of installed packages; None when the database is unreachable."""
    result = subprocess.run(
        [sys.executable, "-m", "pip_audit", "--skip-editable", "--progress-spinner", "off",
         "-f", "json"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        print(f"pip-audit did not answer: {result.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    return [
        Finding("pip-audit", vuln["id"],
                f"{dep['name']} {dep['version']}: fixed in {vuln.get('fix_versions') or '-'}")
        for dep in report.get("dependencies", [])
        for vuln in dep.get("vulns", [])
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="bandit only")
    args = parser.parse_args(argv)
    waivers = load_waivers()
    today = date.today()
    for waiver in waivers:
        if waiver.expires < today:
            print(f"expired waiver {waiver.tool} {waiver.id} ({waiver.expires}): renew or fix")
    findings = bandit_findings()
    print(f"bandit -r {' '.join(BANDIT_TARGETS)}: {len(findings)} high findings")
    if not args.offline:
        audited = pip_audit_findings()
        if audited is None:
            if os.environ.get("CI") == "true":
                print("pip-audit: vulnerability database unreachable (required in CI)")
                return 1
            print("pip-audit: skipped, vulnerability database unreachable")
        else:
            print(f"pip-audit: {len(audited)} known vulnerabilities")
            findings += audited
    remaining = unwaived(findings, waivers, today)
    for finding in remaining:
        print(f"  {finding.tool} {finding.id}: {finding.text}")
    waived = len(findings) - len(remaining)
    print(f"security scans: {len(remaining)} open findings, {waived} waived")
    return 1 if remaining else 0


if __name__ == "__main__":
    sys.exit(main())
