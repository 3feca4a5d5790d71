"""Ingest load: sustained uploads/s of 0.5 MB CT instances against one API process.

``wrk`` (closed loop, N keep-alive connections on loopback) posts multipart uploads built by a
Lua script from one template instance; every request carries a new SOP Instance UID (and a
new Series Instance UID every 100 requests), because the service answers an identical
re-upload with "already stored" instead of storing it. Without ``wrk`` a threaded httpx
loader does the same, with more client overhead.
"""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom

from tests.helpers import wrk
from tests.perf.timing import percentile

SOP_PLACEHOLDER = "2.25.1" + "0" * 30  # 36 characters, rewritten per request
SERIES_PLACEHOLDER = "2.25.2" + "0" * 30
BOUNDARY = "medcadbenchboundary7d1c"

_LUA = r"""
local counter = 0
local pieces = nil

local function split_plain(s, pat)
  local out, start = {}, 1
  while true do
    local i, j = string.find(s, pat, start, true)
    if not i then table.insert(out, string.sub(s, start)); return out end
    table.insert(out, string.sub(s, start, i - 1))
    table.insert(out, false)
    start = j + 1
  end
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local body = f:read("*all")
  f:close()
  sop_ph, series_ph = args[2], args[3]
  -- split on the SOP placeholder, then each piece on the series placeholder
  pieces = {}
  for _, p in ipairs(split_plain(body, sop_ph)) do
    if p == false then table.insert(pieces, "SOP")
    else
      for _, q in ipairs(split_plain(p, series_ph)) do
        if q == false then table.insert(pieces, "SERIES") else table.insert(pieces, q) end
      end
    end
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. args[4]
  wrk.headers["Authorization"] = "Bearer " .. args[5]
end

function request()
  counter = counter + 1
  local sop = string.format("2.25.1%03d%027d", tid, counter)
  local series = string.format("2.25.2%03d%027d", tid, math.floor(counter / 100))
  local parts = {}
  for i, p in ipairs(pieces) do
    if p == "SOP" then parts[i] = sop elseif p == "SERIES" then parts[i] = series else parts[i] = p end
  end
  return wrk.format(nil, "/api/v1/studies", nil, table.concat(parts))
end
"""


def template_instance(source: Path) -> bytes:
    """A 0.5 MB CT instance whose Series/SOP Instance UIDs are the fixed-width placeholders."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = SOP_PLACEHOLDER
    ds.SeriesInstanceUID = SERIES_PLACEHOLDER
    ds.StudyInstanceUID = "2.25.3" + "0" * 30
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart_body(instance: bytes) -> bytes:
    """One ``files`` part holding ``instance``, with the fixed boundary."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="i.dcm"\r\n'
        "Content-Type: application/dicom\r\n\r\n"
    ).encode()
    return head + instance + f"\r\n--{BOUNDARY}--\r\n".encode()


def run_wrk(
    url: str, api_key: str, body: bytes, work: Path, *, seconds: int, connections: int
) -> dict[str, Any]:
    """Closed-loop load with wrk; latencies in ms, error rate over all requests."""
    work.mkdir(parents=True, exist_ok=True)
    body_path = work / "upload_body.bin"
    body_path.write_bytes(body)
    args = [str(body_path), SOP_PLACEHOLDER, SERIES_PLACEHOLDER, BOUNDARY, api_key]
    r = wrk.run_wrk(url, _LUA, args, work, seconds=seconds, connections=connections)
    r["uploads_per_s"] = r.pop("requests_per_s")
    r["error_rate"] = r["errors"] / max(1, r["requests"])
    r["mb_per_s"] = len(body) * r["uploads_per_s"] / 1e6
    return r


def run_python(
    url: str, api_key: str, instance: bytes, *, seconds: int, connections: int
) -> dict[str, Any]:
    """The same closed loop with ``connections`` threads of httpx (used without wrk)."""
    latencies: list[float] = []
    errors = [0]
    statuses: dict[str, int] = {}
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def loop(tid: int) -> None:
        n = 0
        with httpx.Client(headers={"Authorization": f"Bearer {api_key}"}, timeout=10) as c:
            while time.perf_counter() < stop:
                n += 1
                data = instance.replace(
                    SOP_PLACEHOLDER.encode(), f"2.25.1{tid:03d}{n:027d}".encode()
                ).replace(SERIES_PLACEHOLDER.encode(), f"2.25.2{tid:03d}{n // 100:027d}".encode())
                t0 = time.perf_counter()
                code = None
                try:
                    r = c.post(url, files=[("files", ("i.dcm", data, "application/dicom"))])
                    code = str(r.status_code)
                    ok = 200 <= r.status_code < 300
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if code is None:
                        socket_errors["read"] += 1
                    else:
                        statuses[code] = statuses.get(code, 0) + 1
                    latencies.append(time.perf_counter() - t0)
                    errors[0] += 0 if ok else 1

    t_start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i + 1,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    ms = [1e3 * x for x in latencies]
    return {
        "tool": "python-httpx",
        "connections": connections,
        "requests": len(ms),
        "uploads_per_s": len(ms) / elapsed,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "errors": errors[0],
        "non_2xx": errors[0],
        "error_rate": errors[0] / max(1, len(ms)),
        "mb_per_s": len(instance) * len(ms) / elapsed / 1e6,
        "statuses": statuses,
        "socket_errors": socket_errors,
        "error_sample": "",
    }


def run_ingest(
    url: str, api_key: str, source: Path, work: Path, *, seconds: int, connections: int
) -> dict[str, Any]:
    """wrk if installed, else the Python loader."""
    instance = template_instance(source)
    if shutil.which("wrk"):
        result = run_wrk(
            url, api_key, multipart_body(instance), work, seconds=seconds, connections=connections
        )
    else:
        result = run_python(url, api_key, instance, seconds=seconds, connections=connections)
    result["instance_bytes"] = len(instance)
    return result
