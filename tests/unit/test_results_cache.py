"""The per-process cache of serialised result sets: bounded by bytes, least recently used out."""

from __future__ import annotations

from app.api.routes.results import _SerialisedResults


def test_least_recently_used_result_sets_leave_first_and_the_total_stays_bounded() -> None:
    cache = _SerialisedResults(max_bytes=100)
    a, b, c = ("a", 1, "t"), ("b", 1, "t"), ("c", 1, "t")
    cache.put(a, b"x" * 20)
    cache.put(b, b"y" * 20)
    assert cache.get(a) == b"x" * 20  # a is now the most recently used
    cache.put(c, b"z" * 20)
    cache.put(("d", 1, "t"), b"w" * 25)
    cache.put(("e", 1, "t"), b"v" * 25)  # 110 bytes: the least recently used (b) goes
    assert cache.get(b) is None
    assert cache.get(a) == b"x" * 20 and cache.get(c) == b"z" * 20
    # one result set over a quarter of the budget is served but never cached
    cache.put(("huge", 1, "t"), b"h" * 26)
    assert cache.get(("huge", 1, "t")) is None and cache.get(a) is not None


def test_a_rerun_is_another_key() -> None:
    cache = _SerialisedResults()
    cache.put(("job", 1, "2026-01-01T00:00:00"), b"first run")
    assert cache.get(("job", 2, "2026-01-01T00:05:00")) is None
