"""Streaming ``multipart/related`` (RFC 2387) with an explicit boundary, in both directions.

STOW-RS bodies (PS3.18 §10.5.1) are ``multipart/related; type="application/dicom"``, which
Starlette's form parser does not read (it knows ``multipart/form-data`` only). Real senders
differ in framing: Orthanc streams with ``Transfer-Encoding: chunked``, no Content-Length and an
unquoted boundary; dicomweb-client quotes its boundary. This parser therefore takes the
boundary from the Content-Type header, consumes the body in whatever chunks arrive, and
spools each part to a temporary file so a large part never sits in one growing buffer.

Framing follows RFC 2046 §5.1.1: a delimiter is CRLF "--" boundary; the first one may start
the body (the CRLF belongs to it); text before it (preamble) and after the close delimiter
(epilogue) is ignored; transport padding (spaces, tabs) may follow a delimiter.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import IO

from app.errors import BadRequest, PayloadTooLarge

_CRLF = b"\r\n"
_SPOOL_BYTES = 4 * 1024 * 1024  # parts up to this size stay in memory
_MAX_HEADER_BYTES = 16 * 1024


class MultipartError(BadRequest):
    """The body is not a well-formed multipart message."""

    code = "malformed_multipart"


def parse_media_type(header: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type (or one Accept entry) into its lower-case type and parameters.

    Parameter names are lower-cased; values are unquoted (RFC 9110 §5.6.6 quoted-string, with
    backslash escapes). ``'multipart/related; type="application/dicom"; boundary=abc'`` gives
    ``("multipart/related", {"type": "application/dicom", "boundary": "abc"})``.
    """
    media, _, rest = header.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        start = i
        while i < n and rest[i] not in "=;":
            i += 1
        name = rest[start:i].strip().lower()
        if i >= n or rest[i] == ";":
            if name:
                params[name] = ""
            continue
        i += 1  # '='
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            i += 1  # closing quote
            value = "".join(chars)
        else:
            start = i
            while i < n and rest[i] != ";":
                i += 1
            value = rest[start:i].strip()
        if name:
            params[name] = value
    return media.strip().lower(), params


def valid_boundary(boundary: str) -> bool:
    """A usable boundary: RFC 2046 §5.1.1 characters, not ending in a space.

    RFC 2046 caps boundaries at 70 characters, but real senders exceed it (Orthanc 1.10 uses
    two UUIDs joined by a dash: 73), so only an upper bound against abuse is kept.
    """
    allowed = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")
    return 0 < len(boundary) <= 256 and not boundary.endswith(" ") and set(boundary) <= allowed


@dataclass
class BodyPart:
    """One part: its headers (names lower-cased) and its body, spooled to a temporary file."""

    headers: dict[str, str]
    body: IO[bytes] = field(repr=False)
    size: int = 0

    @property
    def content_type(self) -> str:
        """The part's media type without parameters ('' when it has no Content-Type)."""
        return parse_media_type(self.headers.get("content-type", ""))[0]

    def read(self) -> bytes:
        """The whole body."""
        self.body.seek(0)
        return self.body.read()

    def close(self) -> None:
        """Release the spool file."""
        self.body.close()


class _State(Enum):
    PREAMBLE = 1
    AFTER_DELIMITER = 2
    HEADERS = 3
    BODY = 4
    END = 5


class MultipartRelatedParser:
    """Incremental parser: ``feed()`` chunks of any size, then ``close()`` for the parts.

    ``max_parts`` bounds the number of parts (each costs a spool file and a database row).
    """

    def __init__(self, boundary: str, *, max_parts: int = 10_000) -> None:
        self._delimiter = _CRLF + b"--" + boundary.encode("latin-1")
        # The first delimiter may open the body without a CRLF: pretend one preceded it.
        self._buffer = bytearray(_CRLF)
        self._state = _State.PREAMBLE
        self._parts: list[BodyPart] = []
        self._current: BodyPart | None = None
        self._max_parts = max_parts

    def feed(self, chunk: bytes) -> None:
        """Consume the next chunk of the body."""
        if self._state is _State.END:
            return  # epilogue
        self._buffer += chunk
        while self._step():
            pass

    def close(self) -> list[BodyPart]:
        """Finish the body; every part must have been closed by a delimiter."""
        if self._state is not _State.END:
            self.discard()
            raise MultipartError(detail="the multipart body ends before its close delimiter")
        return self._parts

    def discard(self) -> None:
        """Release every spool file (on error)."""
        for part in self._parts:
            part.close()
        if self._current is not None:
            self._current.close()

    def _step(self) -> bool:
        """Advance as far as the buffer allows; False when more input is needed."""
        if self._state is _State.PREAMBLE:
            return self._find_delimiter(keep=False)
        if self._state is _State.BODY:
            return self._find_delimiter(keep=True)
        if self._state is _State.AFTER_DELIMITER:
            return self._after_delimiter()
        if self._state is _State.HEADERS:
            return self._headers()
        return False

    def _find_delimiter(self, *, keep: bool) -> bool:
        at = self._buffer.find(self._delimiter)
        if at < 0:
            # Keep a tail that could be the start of a delimiter split across chunks.
            safe = max(0, len(self._buffer) - len(self._delimiter) + 1)
            if keep and safe:
                self._write(self._buffer[:safe])
            del self._buffer[:safe]
            return False
        if keep:
            self._write(self._buffer[:at])
            assert self._current is not None
            self._current.body.seek(0)
            self._parts.append(self._current)
            self._current = None
        del self._buffer[: at + len(self._delimiter)]
        self._state = _State.AFTER_DELIMITER
        return True

    def _after_delimiter(self) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] == b"--":
            self._state = _State.END
            self._buffer.clear()
            return False
        end = self._buffer.find(_CRLF)
        if end < 0:
            if len(self._buffer) > 1024:
                raise MultipartError(detail="a boundary delimiter is not followed by CRLF")
            return False
        if self._buffer[:end].strip(b" \t"):
            # The "boundary" was only a prefix of a longer line: not a delimiter (RFC 2046).
            raise MultipartError(detail="a boundary delimiter is followed by other text")
        del self._buffer[: end + 2]
        self._state = _State.HEADERS
        return True

    def _headers(self) -> bool:
        if self._buffer[:2] == _CRLF:
            raw, consumed = b"", 2
        else:
            end = self._buffer.find(_CRLF + _CRLF)
            if end < 0:
                if len(self._buffer) > _MAX_HEADER_BYTES:
                    raise MultipartError(detail="a part's headers exceed 16 KiB")
                return False
            raw, consumed = bytes(self._buffer[:end]), end + 4
        del self._buffer[:consumed]
        if len(self._parts) >= self._max_parts:
            raise PayloadTooLarge(detail=f"the body has more than {self._max_parts} parts")
        self._current = BodyPart(
            headers=_parse_headers(raw),
            body=tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES),
        )
        self._state = _State.BODY
        return True

    def _write(self, data: bytearray | bytes) -> None:
        assert self._current is not None
        self._current.body.write(data)
        self._current.size += len(data)


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError(detail=f"a part header line has no colon: {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


async def parse_stream(
    chunks: AsyncIterable[bytes], boundary: str, *, max_bytes: int, max_parts: int = 10_000
) -> list[BodyPart]:
    """Parse a body as it arrives (Content-Length or chunked), 413 past ``max_bytes``."""
    parser = MultipartRelatedParser(boundary, max_parts=max_parts)
    total = 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLarge(detail=f"body exceeds the limit of {max_bytes} bytes")
            parser.feed(chunk)
    except BaseException:
        parser.discard()
        raise
    return parser.close()


# ---------------------------------------------------------------------------------------
# Writing (WADO-RS responses, STOW-RS requests when forwarding results)
# ---------------------------------------------------------------------------------------


def new_boundary() -> str:
    """A random boundary that cannot occur in the payload by chance."""
    return f"medcad-{secrets.token_hex(16)}"


def related_content_type(boundary: str, part_type: str) -> str:
    """``multipart/related; type="<part_type>"; boundary=<boundary>`` (PS3.18 §8.6.1.2)."""
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def encode_parts(
    parts: Iterable[tuple[str, bytes]], boundary: str, *, location: Iterable[str] | None = None
) -> Iterator[bytes]:
    """Yield a multipart/related body part by part: each ``(content_type, payload)``."""
    delimiter = b"--" + boundary.encode("latin-1")
    locations = iter(location) if location is not None else None
    for content_type, payload in parts:
        head = [delimiter, f"Content-Type: {content_type}".encode("latin-1")]
        if locations is not None:
            head.append(f"Content-Location: {next(locations)}".encode("latin-1"))
        head.append(f"Content-Length: {len(payload)}".encode("latin-1"))
        yield _CRLF.join(head) + _CRLF + _CRLF + payload + _CRLF
    yield delimiter + b"--" + _CRLF
