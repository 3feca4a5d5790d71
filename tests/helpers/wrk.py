"""Closed-loop HTTP load with ``wrk``: a C load generator that leaves the CPU to the server.

A scenario supplies the Lua that builds its requests (``init`` and ``request``); this module
adds the part every scenario shares — per-thread ids, status counting, a JSON summary from
``done`` — runs ``wrk`` and parses what it printed. Latencies come back in milliseconds.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

REPORT_LUA = r"""
local threads = {}
-- "tid" is a global set per thread by setup(): request builders use it to stay distinct

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
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


def run_wrk(
    url: str,
    request_lua: str,
    script_args: list[str],
    work: Path,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
) -> dict[str, Any]:
    """Run ``wrk`` with ``request_lua`` + the shared report; the parsed summary.

    Returns requests, requests_per_s, p50/p95/p99/max_ms, statuses (code → count), errors
    (socket errors + non-2xx/3xx), socket_errors and an error_sample from the first bad body.
    """
    work.mkdir(parents=True, exist_ok=True)
    script = work / "load.lua"
    script.write_text(request_lua + REPORT_LUA)
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        *script_args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    raw: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            raw.update(json.loads(line))
    socket = {k: int(raw[k]) for k in ("connect", "read", "write", "timeout")}
    errors = sum(socket.values()) + int(raw["status"])
    duration = raw["duration_us"] / 1e6
    return {
        "tool": "wrk",
        "connections": connections,
        "requests": int(raw["requests"]),
        "requests_per_s": raw["requests"] / duration,
        "duration_s": duration,
        "bytes": int(raw["bytes"]),
        "p50_ms": raw["p50_us"] / 1e3,
        "p95_ms": raw["p95_us"] / 1e3,
        "p99_ms": raw["p99_us"] / 1e3,
        "max_ms": raw["max_us"] / 1e3,
        "errors": errors,
        "non_2xx": int(raw["status"]),
        "statuses": raw.get("statuses", {}),
        "socket_errors": socket,
        "error_sample": raw.get("error_sample", ""),
    }
