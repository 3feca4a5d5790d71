"""Ingest load: sustained uploads/s of 0.5 MB CT instances against one API process.

``wrk`` (closed loop, N keep-alive connections on loopback) posts multipart uploads built by a
Lua script from one template instance; every request carries a new SOP Instance UID (and a
new Series Instance UID every 100 requests), because the service answers an identical
re-upload with "already stored" instead of storing it. Without ``wrk`` a threaded httpx
loader does the same, with more client overhead.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom

from tests.perf.timing import percentile

SOP_PLACEHOLDER = "2.25.1" + "0" * 30  # 36 characters, rewritten per request
SERIES_PLACEHOLDER = "2.25.2" + "0" * 30
BOUNDARY = "medcadbenchboundary7d1c"

_LUA = r"""
local counter = 0
local pieces = nil
local threads = {}
-- "tid" is a global set per thread by setup(), so two threads never make the same UID

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

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

statuses = {}

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status >= 300 and not first_error then first_error = string.sub(body, 1, 300) end
end

function done(summary, latency, requests)
  local e = summary.errors
  local counts, sample = {}, ""
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do counts[code] = (counts[code] or 0) + n end
    sample = sample .. (t:get("first_error") or "")
  end
  local parts = {}
  for code, n in pairs(counts) do table.insert(parts, string.format('"%d": %d', code, n)) end
  sample = string.gsub(string.gsub(sample, '[^%w ,.:;()_-]', ' '), '"', ' ')
  io.write('{"statuses": {' .. table.concat(parts, ", ") .. '}, "error_sample": "' .. sample .. '"}\n')
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, latency.max))
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
    body_path, script = work / "upload_body.bin", work / "upload.lua"
    body_path.write_bytes(body)
    script.write_text(_LUA)
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        str(body_path),
        SOP_PLACEHOLDER,
        SERIES_PLACEHOLDER,
        BOUNDARY,
        api_key,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    raw: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            raw.update(json.loads(line))
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    total = max(1, raw["requests"])
    return {
        "tool": "wrk",
        "connections": connections,
        "requests": raw["requests"],
        "uploads_per_s": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1e3,
        "p95_ms": raw["p95_us"] / 1e3,
        "p99_ms": raw["p99_us"] / 1e3,
        "max_ms": raw["max_us"] / 1e3,
        "errors": errors,
        "non_2xx": raw["status"],
        "error_rate": errors / total,
        "mb_per_s": len(body) * raw["requests"] / (raw["duration_us"] / 1e6) / 1e6,
        "statuses": raw.get("statuses", {}),
        "socket_errors": {k: raw[k] for k in ("connect", "read", "write", "timeout")},
        "error_sample": raw.get("error_sample", ""),
    }


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
