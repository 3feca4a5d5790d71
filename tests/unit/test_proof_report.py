"""The README's table of a `make proof` report: passed, target missed, failed and n/a rows."""

from __future__ import annotations

from tests.proof.run_proof import markdown_table
from tests.reliability.outcome import Outcome


def _outcome(test: str, *, check: bool, target: bool | None) -> Outcome:
    out = Outcome(test, f"scenario {test}")
    out.check("a check", check)
    if target is not None:
        out.target("p95 < 200 ms", target)
    out.summary = f"figures of {test}"
    return out


def test_rows_say_passed_target_missed_failed_and_not_applicable():
    report = {
        "results": [
            _outcome("L2", check=True, target=True).as_json(),
            _outcome("L5", check=True, target=False).as_json(),
            _outcome("Q1", check=False, target=None).as_json(),
        ],
        "not_applicable": {"P9": {"title": "TLS", "reason": "behind the proxy"}},
    }
    rows = markdown_table(report).splitlines()
    assert rows[:2] == ["| test | result | figures |", "|---|---|---|"]
    assert rows[2] == "| L2 scenario L2 | PASS | figures of L2 |"
    assert rows[3] == "| L5 scenario L5 | PASS, **target missed**: p95 < 200 ms | figures of L5 |"
    assert rows[4] == "| Q1 scenario Q1 | **FAIL** | figures of Q1 |"
    assert rows[5] == "| P9 TLS | n/a | behind the proxy |"
