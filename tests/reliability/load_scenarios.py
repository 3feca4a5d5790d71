"""Load scenarios on the production-shaped deployment of ``queue_scenarios`` (``make proof`` only).

Catalogue ids (reliability note §5.4): L4 a burst of uploads against a bounded queue
(backpressure), L5 the read path under 32 concurrent clients. The load generator is Python
(httpx threads) on the same 2 cores as the server, so the latency figures are those of a
shared machine; targets are reported as met or not met, and the pass conditions are the
correctness ones (no 5xx, nothing lost).
"""

from __future__ import annotations

import random
import threading
import time

import httpx

from tests.reliability.harness import percentile, wait_terminal
from tests.reliability.outcome import Outcome, timed
from tests.reliability.queue_scenarios import SIZE, SLICES, ProdStack, _files


def _restart_api(ps: ProdStack, **env: str) -> None:
    ps.stack.kill_api()
    ps.stack.env.update(env)
    ps.stack.start_api()


def run_burst_backpressure(
    ps: ProdStack,
    *,
    uploads: int = 500,
    clients: int = 16,
    queue_limit: int = 40,
    timeout: float = 900,
) -> Outcome:
    """L4: ``uploads`` series sent as fast as ``clients`` closed-loop clients can, against an API
    whose queue limit is ``queue_limit`` jobs and 2 worker children: every answer is 202, or
    429/503 with Retry-After; no other error; every accepted job is done; the backlog drains
    at the workers' rate."""
    out = Outcome("L4", "burst against a bounded queue (backpressure)")
    previous = ps.stack.env.get("MEDCAD_MAX_QUEUE_DEPTH")
    _restart_api(ps, MEDCAD_MAX_QUEUE_DEPTH=str(queue_limit))
    answers: list[tuple[int, float, str | None]] = []
    ids: list[str] = []
    lock = threading.Lock()
    counter = iter(range(uploads))
    try:
        with timed(out):

            def client_loop() -> None:
                with ps.stack.client(timeout=60) as client:
                    while True:
                        with lock:
                            i = next(counter, None)
                        if i is None:
                            return
                        files = _files(10_000 + i)  # a new series (new UIDs) each time
                        t = time.monotonic()
                        try:
                            r = client.post("/api/v1/studies", files=files)
                            code, retry = r.status_code, r.headers.get("retry-after")
                        except httpx.HTTPError as exc:
                            code, retry = 0, type(exc).__name__
                        with lock:
                            answers.append((code, time.monotonic() - t, retry))
                            if code == 202:
                                ids.append(r.json()["jobs"][0]["id"])

            started = time.monotonic()
            threads = [threading.Thread(target=client_loop) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            burst_s = time.monotonic() - started
            backlog = sum(1 for r in ps.db.jobs(ids).values() if r.status in ("queued", "running"))
            drain_start = time.monotonic()
            rows = wait_terminal(ps.db, ids, timeout)
            drain_s = time.monotonic() - drain_start
    finally:
        if previous is None:
            ps.stack.env.pop("MEDCAD_MAX_QUEUE_DEPTH", None)
        else:
            ps.stack.env["MEDCAD_MAX_QUEUE_DEPTH"] = previous
        _restart_api(ps)
    codes = [a[0] for a in answers]
    refused = [a for a in answers if a[0] in (429, 503)]
    succeeded = sum(1 for r in rows.values() if r.status == "succeeded")
    capacity = succeeded / (burst_s + drain_s) if burst_s + drain_s else float("nan")
    out.figures.update(
        uploads=uploads,
        clients=clients,
        queue_limit=queue_limit,
        burst_seconds=round(burst_s, 1),
        offered_per_s=round(uploads / burst_s, 1),
        status_codes={str(c): codes.count(c) for c in sorted(set(codes))},
        refused_with_retry_after=sum(1 for a in refused if a[2]),
        upload_p99_ms=round(percentile([a[1] for a in answers], 99) * 1000),
        accepted=len(ids),
        backlog_at_burst_end=backlog,
        drain_seconds=round(drain_s, 1),
        jobs_succeeded=succeeded,
        jobs_failed=sum(1 for r in rows.values() if r.status == "failed"),
        jobs_per_s=round(capacity, 2),
        series=f"{SLICES} slices of {SIZE}×{SIZE}",
    )
    out.check("every answer 202, 429 or 503", set(codes) <= {202, 429, 503})
    out.check("the queue limit pushed back", len(refused) > 0)
    out.check(
        "every refusal has Retry-After", len(refused) == out.figures["refused_with_retry_after"]
    )
    out.check("every accepted job succeeded", succeeded == len(ids))
    f = out.figures
    out.summary = (
        f"{f['uploads']} uploads from {f['clients']} clients in {f['burst_seconds']} s "
        f"({f['offered_per_s']}/s), queue limit {f['queue_limit']}: {f['status_codes']}, every "
        f"refusal with Retry-After; {f['accepted']} accepted, all done ({f['jobs_failed']} "
        f"failed), backlog {f['backlog_at_burst_end']} drained in {f['drain_seconds']} s"
    )
    return out


def run_read_path_load(
    ps: ProdStack, *, seconds: float = 60, clients: int = 32, series: int = 4
) -> Outcome:
    """L5: ``clients`` closed-loop clients read job results and mask PNGs for ``seconds``."""
    out = Outcome("L5", "read path under concurrent clients")
    with ps.stack.client() as client:
        ids = ps.upload(client, series)
        wait_terminal(ps.db, ids, 300)
        urls = [f"/api/v1/jobs/{j}/results" for j in ids]
        for j in ids:
            body = client.get(f"/api/v1/jobs/{j}/results").json()
            urls += [m["url"] for m in body["masks"]] + [m["overlay_url"] for m in body["masks"]]
    samples: list[tuple[int, float]] = []
    lock = threading.Lock()
    with timed(out):
        stop_at = time.monotonic() + seconds

        def client_loop(k: int) -> None:
            rng = random.Random(k)
            local: list[tuple[int, float]] = []
            with ps.stack.client(timeout=30) as c:
                while time.monotonic() < stop_at:
                    url = rng.choice(urls)
                    t = time.monotonic()
                    try:
                        code = c.get(url).status_code
                    except httpx.HTTPError:
                        code = 0
                    local.append((code, time.monotonic() - t))
            with lock:
                samples.extend(local)

        started = time.monotonic()
        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    latencies = [s[1] for s in samples]
    errors = sum(1 for s in samples if s[0] != 200)
    p95 = percentile(latencies, 95) * 1000
    out.figures.update(
        clients=clients,
        seconds=round(elapsed, 1),
        urls=len(urls),
        requests=len(samples),
        requests_per_s=round(len(samples) / elapsed, 1),
        errors=errors,
        p50_ms=round(percentile(latencies, 50) * 1000),
        p95_ms=round(p95),
        p99_ms=round(percentile(latencies, 99) * 1000),
        p95_target_200ms="met" if p95 < 200 else "not met",
        generator="Python httpx threads on the same 2 cores",
    )
    out.check("0 errors", errors == 0 and len(samples) > 0)
    f = out.figures
    out.summary = (
        f"{f['clients']} clients × {f['seconds']} s over {f['urls']} result/mask URLs: "
        f"{f['requests_per_s']} req/s, p50 {f['p50_ms']} ms, p95 {f['p95_ms']} ms "
        f"(target 200 ms: {f['p95_target_200ms']}), p99 {f['p99_ms']} ms, {f['errors']} errors"
    )
    return out
