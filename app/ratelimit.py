"""Per-key request rate limits: one token bucket per API key, 429 + ``Retry-After`` when empty.

A runaway client (a script polling in a tight loop, a retry storm) must not starve the others,
so each caller gets ``rate_limit_per_minute`` requests with bursts up to ``rate_limit_burst``.
The caller is identified by a hash of its bearer token — not by the key's public prefix, which
anyone may know and could then use to drain someone else's bucket — or, without a token, by its
address. Liveness, readiness, metrics and the static page are never limited: probes and the page
shell must answer even for a throttled client.

The buckets live in the API process: with several API processes behind a balancer each one
applies the limit on its own (an upper bound of ``processes × rate``), which is what a safety net
against runaway clients needs; a shared limit belongs in the reverse proxy (``limit_req``).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

EXEMPT_PATHS = frozenset(
    {"/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc"}
)
EXEMPT_PREFIXES = ("/static/", "/docs/")


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """Token buckets keyed by caller, refilled at ``rate_per_second`` up to ``burst``.

    At most ``max_buckets`` callers are remembered (least recently seen forgotten first), so a
    flood of made-up tokens cannot grow memory without bound; a forgotten caller simply starts
    again with a full bucket.
    """

    def __init__(
        self,
        *,
        rate_per_second: float,
        burst: int,
        max_buckets: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_second <= 0 or burst < 1:
            raise ValueError("rate_per_second must be > 0 and burst >= 1")
        self.rate = rate_per_second
        self.burst = float(burst)
        self.max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, caller: str) -> float:
        """Spend one token of ``caller``: 0.0 if allowed, else the seconds until one is back."""
        now = self._clock()
        bucket = self._buckets.pop(caller, None)
        if bucket is None:
            bucket = _Bucket(tokens=self.burst, updated=now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        self._buckets[caller] = bucket
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def caller_key(scope: Scope) -> str:
    """Who is calling, for rate limiting: a hash of the bearer token, else the peer address."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return "key:" + hashlib.sha256(token.strip()).hexdigest()[:32]
    client = scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"


def is_exempt(path: str) -> bool:
    """Probes, metrics, the page shell and the API docs are never limited."""
    return path in EXEMPT_PATHS or path.startswith(EXEMPT_PREFIXES)


class RateLimitMiddleware:
    """Answer 429 with ``Retry-After`` (whole seconds) when the caller's bucket is empty."""

    def __init__(self, app: ASGIApp, *, buckets: TokenBuckets) -> None:
        self.app = app
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        wait = self.buckets.take(caller_key(scope))
        if wait <= 0.0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        response = JSONResponse(
            {
                "error": "rate_limited",
                "detail": f"too many requests for this API key; retry in {retry_after} s",
            },
            status_code=429,
            headers={"Retry-After": str(retry_after), "Connection": "close"},
        )
        await response(scope, receive, send)
