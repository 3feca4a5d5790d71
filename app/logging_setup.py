"""Structured JSON logs. Records carry ids (job_id...), never patient attributes or pixels."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# medcad's own messages carry ids only; everything else (pydicom and highdicom warnings and
# dataset reprs, exception texts in Celery's task logs...) may quote element values.
_OWN_LOGGERS = frozenset({"app", "workers"})
# An opening quote (or b-quote, for bytes) follows no letter or digit, so the apostrophe of
# "Patient's Name" in a dataset repr does not start a span that would leave the value exposed.
_QUOTED = re.compile(r"(?<![A-Za-z0-9])b?(?:'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\")")


def redact_quoted(text: str) -> str:
    """``text`` with every quoted string (how reprs and most libraries show values) blanked."""
    return _QUOTED.sub("'<redacted>'", text)


class RedactThirdPartyValues(logging.Filter):
    """Blank quoted values in records from other libraries before any handler formats them.

    pydicom quotes invalid element values in its warnings (``Invalid value for VR DS:
    '<value>'``), highdicom logs dataset reprs at DEBUG, and exception messages reach
    Celery's task log: any of these can hold a patient's name, ID or birth date.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in _OWN_LOGGERS:
            return True
        record.msg = redact_quoted(record.getMessage())
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and not key.startswith("_") and isinstance(value, str):
                setattr(record, key, redact_quoted(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = (
                    value if isinstance(value, (int, float, bool, type(None))) else str(value)
                )
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__  # type only: messages may hold PHI
        return json.dumps(entry)


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """Configure the root logger once per process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactThirdPartyValues())
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pydicom warnings can quote element values (possibly PHI): keep them out of the logs.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    # Python warnings (pydicom's among them) go through the handler and its redaction rather
    # than straight to stderr, where nothing would blank the values they quote.
    logging.captureWarnings(True)
