"""Test-only crash injector for the poison-message test (Q7); never on a production path.

Put on ``PYTHONPATH`` of a test worker only. When that process opens a blob whose key is listed
in the file named by ``MEDCAD_TEST_POISON_KEYS``, the process ends at once with
``os._exit(137)`` — what an OOM kill or a segfaulting decoder does to a pool child, reproduced
for one chosen input without touching medcad's code. A Python audit hook (PEP 578) sees the
``open`` of the blob before any byte is decoded.
"""

from __future__ import annotations

import os
import re
import sys

_KEY = re.compile(r"[0-9a-f]{64}")
_LIST = os.environ.get("MEDCAD_TEST_POISON_KEYS", "")
_cache: dict[str, object] = {"mtime": None, "keys": frozenset()}


def _poison_keys() -> frozenset[str]:
    try:
        mtime = os.stat(_LIST).st_mtime_ns
    except OSError:
        return frozenset()
    if mtime != _cache["mtime"]:
        with open(_LIST, encoding="ascii") as handle:
            _cache["keys"] = frozenset(line.strip() for line in handle if line.strip())
        _cache["mtime"] = mtime
    keys = _cache["keys"]
    assert isinstance(keys, frozenset)
    return keys


def _hook(event: str, args: tuple[object, ...]) -> None:
    if event != "open" or not args or not isinstance(args[0], str):
        return
    name = os.path.basename(args[0])
    if len(name) == 64 and _KEY.fullmatch(name) and name in _poison_keys():
        os._exit(137)


if _LIST:
    sys.addaudithook(_hook)
