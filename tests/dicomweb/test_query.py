"""QIDO-RS parameter parsing and C-FIND style matching (PS3.4 C.2.2.2, PS3.18 §8.3.4)."""

from __future__ import annotations

import pytest

from app.dicomweb.query import Matcher, parse_query, warning_header
from app.errors import BadRequest

PATIENT_NAME, STUDY_DATE, STUDY_TIME, STUDY_UID = 0x00100010, 0x00080020, 0x00080030, 0x0020000D
MODALITY, SERIES_NUMBER = 0x00080060, 0x00200011


@pytest.mark.parametrize(
    ("key", "stored", "fuzzy", "expected"),
    [
        ("DOE*", "DOE^JOHN", False, True),
        ("DOE*", "doe^john", False, False),
        ("DOE*", "doe^john", True, True),
        ("D?E^JOHN", "DOE^JOHN", False, True),
        ("D?E^JOHN", "DOOE^JOHN", False, False),
        ("*JOHN", "DOE^JOHN", False, True),
        ("DOE^JOHN", "DOE^JOHN", False, True),
        ("DOE", "DOE^JOHN", False, False),  # no wildcard: exact
        ("100%_*", "100%_x", False, True),  # SQL LIKE characters are literal
        ("DOE*", None, False, False),
        ("", None, False, True),  # universal match
    ],
)
def test_text_wildcards(key: str, stored: str | None, fuzzy: bool, expected: bool) -> None:
    assert Matcher.parse(PATIENT_NAME, key, fuzzy=fuzzy).test(stored) is expected


@pytest.mark.parametrize(
    ("key", "stored", "expected"),
    [
        ("20260101", "20260101", True),
        ("20260101-20260131", "20260115", True),
        ("20260101-20260131", "20260201", False),
        ("-20251231", "20260101", False),
        ("-20251231", "19991231", True),
        ("20260101-", "20270101", True),
        ("2026.01.01-", "20260101", True),
    ],
)
def test_date_ranges(key: str, stored: str, expected: bool) -> None:
    assert Matcher.parse(STUDY_DATE, key, fuzzy=False).test(stored) is expected


@pytest.mark.parametrize(
    ("key", "stored", "expected"),
    [
        ("1200-1300", "125959.5", True),
        ("1200-1300", "1300", True),
        ("1200-1300", "130000.5", True),  # the hour 13:00 includes its fractions
        ("1200-1300", "130100", False),
        ("12", "120000", True),
    ],
)
def test_time_ranges(key: str, stored: str, expected: bool) -> None:
    assert Matcher.parse(STUDY_TIME, key, fuzzy=False).test(stored) is expected


def test_uid_lists_and_code_lists() -> None:
    uids = Matcher.parse(STUDY_UID, "1.2.3,1.2.4\\1.2.5", fuzzy=False)
    assert uids.test("1.2.4") and uids.test("1.2.5") and not uids.test("1.2.3.4")
    modalities = Matcher.parse(MODALITY, "CT\\SEG", fuzzy=False)
    assert modalities.test("seg") and modalities.test(["MR", "CT"]) and not modalities.test("SR")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("StudyDate", "2026-13"),
        ("StudyDate", "-"),
        ("StudyTime", "25x"),
        ("SeriesNumber", "one"),
        ("NotAKeyword", "x"),
        ("limit", "-1"),
        ("offset", "x"),
        ("fuzzymatching", "maybe"),
    ],
)
def test_malformed_parameters_are_400(name: str, value: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_query([(name, value)], "instance")
    assert info.value.status == 400 and info.value.code == "invalid_query"


def test_keys_includefield_paging_and_ignored_keys() -> None:
    query = parse_query(
        [
            ("00100010", "doe*"),
            ("fuzzymatching", "true"),
            ("includefield", "StudyDescription,00080090"),
            ("includefield", "all"),
            ("limit", "5000"),
            ("offset", "3"),
            ("SeriesNumber", "2"),  # not a study-level key
            ("RequestAttributeSequence.ScheduledProcedureStepID", "x"),
            ("InstitutionName", ""),  # empty: only asks for the attribute back
        ],
        "study",
    )
    assert query.matchers[PATIENT_NAME].fuzzy and query.matchers[PATIENT_NAME].test("DOE^J")
    assert query.include == {0x00081030, 0x00080090, 0x00080080} and query.include_all
    assert query.limit == 1000 and query.offset == 3
    assert SERIES_NUMBER not in query.matchers
    assert sorted(query.ignored) == [
        "RequestAttributeSequence.ScheduledProcedureStepID",
        "SeriesNumber",
    ]
    assert "SeriesNumber" in warning_header(query)["Warning"]
    assert query.key_names() == ["PatientName"]
