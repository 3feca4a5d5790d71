"""Guards against oversized and slow requests, below the routes.

* Body size: a request declaring more than its route's cap gets 413 before one byte of the body
  is read; a body without a length (chunked) is counted as it arrives and refused at cap + 1.
  Upload routes are capped at ``max_upload_bytes``; every other route at
  ``max_request_body_bytes``. FastAPI reads a JSON body *before* it resolves the auth
  dependency, so without this cap an unauthenticated caller could make the server buffer a body
  of any size.
* Slow bodies: while a body is incomplete, each wait for its next chunk is bounded
  (``http_body_idle_timeout_seconds``); a stalled client gets 408 and the connection is closed.
* Slow headers (slowloris): uvicorn bounds the wait *between* requests on a keep-alive
  connection but not the wait for a request's headers, so a client that connects and never
  finishes its headers holds a connection (and a file descriptor) forever.
  :class:`ConfiguredHeaderDeadlineProtocol` gives each request's headers a deadline
  (``http_header_timeout_seconds``).

Behind a reverse proxy the same limits belong there too (nginx ``client_max_body_size``,
``client_body_timeout``, ``client_header_timeout``); these guards keep ``medcad serve`` safe
on its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.errors import MedcadError
from app.settings import get_settings

UPLOAD_PATH_PREFIXES = ("/api/v1/studies", "/dicomweb/studies")


class RequestRefused(MedcadError):
    """The request body broke a size or time limit (raised inside ``receive``)."""


def _declared_length(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return bytes(value).decode("latin-1")
    return None


def _refusal_for_declared_length(declared: str | None, limit: int) -> RequestRefused | None:
    if declared is None:
        return None
    if not declared.isdigit():
        return RequestRefused("bad_request", "Content-Length is not a number", status=400)
    if int(declared) > limit:
        return RequestRefused(
            "payload_too_large",
            f"body of {declared} bytes exceeds the limit of {limit}",
            status=413,
        )
    return None


async def _refuse(refusal: RequestRefused, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(
        {"error": refusal.code, "detail": refusal.detail},
        status_code=refusal.status,
        headers={"Connection": "close"},
    )
    await response(scope, receive, send)


class _GuardedExchange:
    """The ``receive``/``send`` pair of one request, with the body limits applied."""

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, *, limit: int, idle_timeout: float
    ) -> None:
        self.scope, self._receive, self._send = scope, receive, send
        self.limit, self.idle_timeout = limit, idle_timeout
        self.received = 0
        self.complete = False
        self.started = False
        self.refusal: RequestRefused | None = None

    async def receive(self) -> Message:
        if self.complete or self.refusal is not None:
            # after the body, waiting for a disconnect may legitimately take as long as the
            # response does: not bounded here
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), timeout=self.idle_timeout)
        except TimeoutError:
            self.refusal = RequestRefused(
                "request_timeout", f"no request body bytes for {self.idle_timeout:g} s", status=408
            )
            raise self.refusal from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.received > self.limit:
                self.refusal = RequestRefused(
                    "payload_too_large", f"body exceeds the limit of {self.limit} bytes", status=413
                )
                raise self.refusal
        return message

    async def send(self, message: Message) -> None:
        if self.refusal is not None:
            # Whatever the route made of the interrupted body (FastAPI turns it into a 400
            # "error parsing the body"), the caller learns the real reason, once.
            await self.refuse_once()
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def refuse_once(self) -> bool:
        """Send the refusal unless a response has started; True if it was sent now."""
        if self.started or self.refusal is None:
            return False
        self.started = True
        await _refuse(self.refusal, self.scope, self._receive, self._send)
        return True


class BodyGuardMiddleware:
    """Cap each request body and bound the wait for its next chunk."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_upload_bytes: int,
        idle_timeout: float,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.idle_timeout = idle_timeout

    def _limit(self, scope: Scope) -> int:
        if scope["method"] == "POST" and str(scope["path"]).startswith(UPLOAD_PATH_PREFIXES):
            return self.max_upload_bytes
        return self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        refusal = _refusal_for_declared_length(_declared_length(scope), limit)
        if refusal is not None:
            await _refuse(refusal, scope, receive, send)
            return
        exchange = _GuardedExchange(
            scope, receive, send, limit=limit, idle_timeout=self.idle_timeout
        )
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except RequestRefused:
            if not await exchange.refuse_once():
                raise


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the headers of each request.

    The deadline is armed when the connection opens and again when a response completes (the
    start of the next request on a keep-alive connection), and disarmed as soon as a request's
    headers have been parsed. A client still inside its headers at the deadline is disconnected.
    """

    header_timeout: float = 15.0
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_header_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        # armed first: completing a response may parse a pipelined request, which disarms it
        self._arm_header_deadline()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class ConfiguredHeaderDeadlineProtocol(HeaderDeadlineProtocol):
    """The deadline of ``MEDCAD_HTTP_HEADER_TIMEOUT_SECONDS``, importable by name.

    ``medcad serve`` names it to uvicorn by import string
    (``app.http_guard:ConfiguredHeaderDeadlineProtocol``), which each API process resolves on
    its own, so it reads the setting itself.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = get_settings().http_header_timeout_seconds
