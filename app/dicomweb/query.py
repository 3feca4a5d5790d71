"""QIDO-RS query parameters (PS3.18 §8.3.4) and attribute matching (PS3.4 C.2.2.2).

A query is parsed once into :class:`QidoQuery`: one :class:`Matcher` per match key, the
``includefield`` set, paging and ``fuzzymatching``. Each matcher can test a value in Python and
build the equivalent SQL condition, so study searches page in the database while series and
instance searches (which mix database rows and result objects) filter the same way in memory.

Matching follows C-FIND semantics: an empty value is a universal match (the attribute is only
returned); ``*`` and ``?`` are wildcards for text and code strings; dates and times accept
``a-b``, ``-b`` and ``a-`` ranges; UIDs and code strings accept lists (``a,b`` or ``a\\b``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sqlalchemy import Boolean, ColumnElement, and_, false, func, or_, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from app.dicomweb.dicom_json import parse_tag, tag_name, vr_of
from app.errors import BadRequest

Kind = Literal["uid", "text", "code", "date", "time", "int"]
Level = Literal["study", "series", "instance"]

# Match keys we evaluate, per level (PS3.18 Table 10.6.1-5 and the stored attributes).
STUDY_KEYS: Final = frozenset(
    {
        0x0020000D,  # StudyInstanceUID
        0x00100020,  # PatientID
        0x00100010,  # PatientName
        0x00100030,  # PatientBirthDate
        0x00100040,  # PatientSex
        0x00080020,  # StudyDate
        0x00080030,  # StudyTime
        0x00080050,  # AccessionNumber
        0x00080061,  # ModalitiesInStudy
        0x00080090,  # ReferringPhysicianName
        0x00200010,  # StudyID
        0x00081030,  # StudyDescription
    }
)
SERIES_KEYS: Final = frozenset(
    {
        0x00080060,  # Modality
        0x0020000E,  # SeriesInstanceUID
        0x00200011,  # SeriesNumber
        0x0008103E,  # SeriesDescription
    }
)
INSTANCE_KEYS: Final = frozenset(
    {
        0x00080016,  # SOPClassUID
        0x00080018,  # SOPInstanceUID
        0x00200013,  # InstanceNumber
    }
)
KEYS_BY_LEVEL: Final[dict[str, frozenset[int]]] = {
    "study": STUDY_KEYS,
    "series": STUDY_KEYS | SERIES_KEYS,
    "instance": STUDY_KEYS | SERIES_KEYS | INSTANCE_KEYS,
}

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
_RESERVED: Final = frozenset(
    {"limit", "offset", "includefield", "fuzzymatching", "emptyvaluematching",
     "multiplevaluematching"}
)  # fmt: skip
_DATE: Final = re.compile(r"^\d{8}$")
_TIME: Final = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_LIST_SEPARATORS: Final = re.compile(r"[,\\]")


def _kind(tag: int) -> Kind:
    vr = vr_of(tag)
    if vr == "UI":
        return "uid"
    if vr == "DA":
        return "date"
    if vr == "TM":
        return "time"
    if vr == "IS":
        return "int"
    if vr == "CS":
        return "code"
    return "text"


def _normal_time(text: str, name: str) -> str:
    """HHMMSS.ffffff, padded, so that times compare as strings (PS3.5 §6.2 TM)."""
    text = text.replace(":", "")
    if not _TIME.match(text):
        raise BadRequest("invalid_query", f"{name}: {text[:32]!r} is not a DICOM time")
    whole, _, fraction = text.partition(".")
    return whole.ljust(6, "0") + ("." + fraction if fraction else "")


def _wildcard_regex(pattern: str, *, fold: bool) -> re.Pattern[str]:
    body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(f"^{body}$", re.IGNORECASE | re.DOTALL if fold else re.DOTALL)


def _like(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _glob(pattern: str) -> str:
    # GLOB already uses * and ?; only '[' opens a character class and must be quoted.
    return pattern.replace("[", "[[]")


class WildcardMatch(FunctionElement[bool]):
    """Case-sensitive DICOM wildcard match: ``LIKE ... ESCAPE`` in general, ``GLOB`` on SQLite
    (whose LIKE ignores ASCII case, which would make "DOE*" match "doe^john")."""

    type = Boolean()
    name = "wildcard_match"
    inherit_cache = True


@compiles(WildcardMatch)
def _wildcard_like(element: WildcardMatch, compiler: SQLCompiler, **kw: Any) -> str:
    column, like, _glob_pattern = list(element.clauses)
    return f"({compiler.process(column, **kw)} LIKE {compiler.process(like, **kw)} ESCAPE '\\')"


@compiles(WildcardMatch, "sqlite")
def _wildcard_glob(element: WildcardMatch, compiler: SQLCompiler, **kw: Any) -> str:
    column, _like_pattern, glob = list(element.clauses)
    return f"({compiler.process(column, **kw)} GLOB {compiler.process(glob, **kw)})"


@dataclass(frozen=True)
class Matcher:
    """One match key: its tag, how it matches and the parsed key value."""

    tag: int
    kind: Kind
    raw: str
    values: tuple[str, ...] = ()
    low: str | None = None
    high: str | None = None
    fuzzy: bool = False

    @property
    def universal(self) -> bool:
        """An empty key value matches everything (the attribute is only returned)."""
        return self.raw == ""

    @classmethod
    def parse(cls, tag: int, raw: str, *, fuzzy: bool) -> Matcher:
        """Parse a key value for ``tag`` (400 for a malformed date, time or number)."""
        kind, name, raw = _kind(tag), tag_name(tag), raw.strip()
        if raw == "":
            return cls(tag, kind, raw)
        if kind in ("date", "time"):
            return cls._parse_range(tag, kind, name, raw)
        if kind == "int":
            if not re.fullmatch(r"[+-]?\d{1,12}", raw):
                raise BadRequest("invalid_query", f"{name}: {raw[:32]!r} is not an integer")
            return cls(tag, kind, raw, values=(str(int(raw)),))
        if kind in ("uid", "code"):
            values = tuple(v.strip() for v in _LIST_SEPARATORS.split(raw) if v.strip())
            return cls(tag, kind, raw, values=values, fuzzy=fuzzy)
        return cls(tag, kind, raw, values=(raw,), fuzzy=fuzzy)

    @classmethod
    def _parse_range(cls, tag: int, kind: Kind, name: str, raw: str) -> Matcher:
        low, dash, high = raw.partition("-")
        if not dash:
            low = high = raw
        bounds: list[str | None] = []
        for bound in (low.strip(), high.strip()):
            if not bound:
                bounds.append(None)
            elif kind == "date":
                bound = bound.replace(".", "")  # ACR-NEMA style YYYY.MM.DD
                if not _DATE.match(bound):
                    raise BadRequest("invalid_query", f"{name}: {bound[:32]!r} is not a date")
                bounds.append(bound)
            else:
                bounds.append(_normal_time(bound, name))
        if bounds == [None, None]:
            raise BadRequest("invalid_query", f"{name}: {raw[:32]!r} is an empty range")
        high_bound = bounds[1]
        if kind == "time" and high_bound is not None and dash and "." not in high_bound:
            high_bound += ".999999"  # an upper bound of 1300 includes 13:00:00.5
        return cls(tag, kind, raw, low=bounds[0], high=high_bound)

    # -- matching ---------------------------------------------------------------------

    def test(self, value: Any) -> bool:
        """Does a stored value (str, int, None, or a list for multi-valued ones) match?"""
        if self.universal:
            return True
        if isinstance(value, list | tuple | set | frozenset):
            return any(self.test(v) for v in value)
        if value is None or value == "":
            return False
        text = str(value)
        if self.kind == "int":
            try:
                return int(text) == int(self.values[0])
            except ValueError:
                return False
        if self.kind in ("date", "time"):
            stored = text if self.kind == "date" else _safe_time(text)
            if stored is None:
                return False
            return (self.low is None or stored >= self.low) and (
                self.high is None or stored <= self.high
            )
        if self.kind == "uid":
            return text in self.values
        fold = self.fuzzy or self.kind == "code"
        return any(_wildcard_regex(v, fold=fold).match(text) for v in self.values)

    def sql(self, column: Any) -> ColumnElement[bool]:
        """The same test as an SQL condition on ``column`` (a string or integer column)."""
        if self.universal:
            return true()
        if self.kind == "uid":
            return column.in_(self.values) if self.values else false()
        if self.kind == "int":
            return column == int(self.values[0])  # type: ignore[no-any-return]
        if self.kind in ("date", "time"):
            parts = []
            if self.low is not None:
                parts.append(column >= self.low)
            if self.high is not None:
                parts.append(column <= self.high)
            return and_(*parts)
        fold = self.fuzzy or self.kind == "code"
        conditions: list[ColumnElement[bool]] = []
        for value in self.values:
            wildcard = "*" in value or "?" in value
            if fold:  # lower() on both sides: the same on every database
                pattern = value.lower()
                target = func.lower(column)
                conditions.append(
                    target.like(_like(pattern), escape="\\") if wildcard else target == pattern
                )
            elif wildcard:
                conditions.append(WildcardMatch(column, _like(value), _glob(value)))
            else:
                conditions.append(column == value)
        return or_(*conditions)


def _safe_time(text: str) -> str | None:
    try:
        return _normal_time(text, "time")
    except BadRequest:
        return None


@dataclass
class QidoQuery:
    """A parsed QIDO-RS request."""

    matchers: dict[int, Matcher] = field(default_factory=dict)
    include: set[int] = field(default_factory=set)
    include_all: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    fuzzy: bool = False
    ignored: list[str] = field(default_factory=list)  # keys we cannot match (Warning header)

    def matcher(self, tag: int) -> Matcher | None:
        """The matcher of ``tag`` if it is a match key of this query."""
        return self.matchers.get(tag)

    def key_names(self) -> list[str]:
        """Names of the match keys (for audit details: the keys, never their values)."""
        return sorted(tag_name(t) for t, m in self.matchers.items() if not m.universal)


def _int_param(name: str, value: str, *, maximum: int | None = None) -> int:
    if not value.isdigit():
        raise BadRequest("invalid_query", f"{name} must be a non-negative integer, got {value!r}")
    number = int(value)
    return min(number, maximum) if maximum is not None else number


def _bool_param(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise BadRequest("invalid_query", f"{name} must be true or false, got {value[:16]!r}")
    return lowered == "true"


def parse_query(items: Iterable[tuple[str, str]], level: Level) -> QidoQuery:
    """Parse query parameters for a search at ``level`` (400 on malformed parameters).

    Match keys that are valid attributes but not searchable at this level are ignored and
    listed in ``ignored`` (PS3.18 §8.3.4.1: the origin server may ignore them and warn).
    """
    query = QidoQuery()
    pairs = list(items)
    for name, value in pairs:
        if name.lower() == "fuzzymatching":
            query.fuzzy = _bool_param(name, value)
    supported = KEYS_BY_LEVEL[level]
    for name, value in pairs:
        lowered = name.lower()
        if lowered == "limit":
            query.limit = _int_param(name, value, maximum=MAX_LIMIT)
        elif lowered == "offset":
            query.offset = _int_param(name, value)
        elif lowered == "includefield":
            _add_includes(query, value)
        elif lowered in ("emptyvaluematching", "multiplevaluematching"):
            _bool_param(name, value)  # accepted; our matching already follows the defaults
        elif lowered in _RESERVED:
            continue
        elif "." in name:
            query.ignored.append(name[:64])  # sequence matching is not supported
        else:
            tag = int(parse_tag(name))
            if tag in supported:
                query.matchers[tag] = Matcher.parse(tag, value, fuzzy=query.fuzzy)
            elif value.strip() == "":
                query.include.add(tag)  # a universal key only asks for the attribute back
            else:
                query.ignored.append(tag_name(tag))
    return query


def _add_includes(query: QidoQuery, value: str) -> None:
    for token in (t.strip() for t in value.split(",")):
        if not token:
            continue
        if token.lower() == "all":
            query.include_all = True
        elif "." in token:
            query.ignored.append(token[:64])
        else:
            query.include.add(int(parse_tag(token)))


def warning_header(query: QidoQuery) -> Mapping[str, str]:
    """The ``Warning`` header naming ignored keys (PS3.18 §8.3.4.1), if any."""
    if not query.ignored:
        return {}
    names = ", ".join(sorted(set(query.ignored)))[:500]
    return {
        "Warning": f'299 medcad "The following attributes are not supported as query keys: {names}"'
    }
