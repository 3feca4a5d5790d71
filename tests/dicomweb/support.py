"""Helpers for DICOMweb tests: STOW bodies, multipart responses, live-server waits."""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Iterable, Iterator

import pydicom


def stow_body(
    files: Iterable[bytes], boundary: str, *, part_type: str = "application/dicom"
) -> bytes:
    """A multipart/related body, one part per file, CRLF framing (RFC 2046)."""
    out = b""
    for data in files:
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def stow_content_type(boundary: str, *, quoted: bool = True) -> str:
    value = f'"{boundary}"' if quoted else boundary
    return f'multipart/related; type="application/dicom"; boundary={value}'


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    """The body in fixed-size pieces (httpx sends a generator with chunked encoding)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def multipart_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """Parse a multipart response with the standard library (independent of medcad's parser)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert message.is_multipart(), content_type
    return [
        (part.get("Content-Type", ""), part.get_payload(decode=True))
        for part in message.iter_parts()
    ]


def datasets(content_type: str, body: bytes) -> list[pydicom.Dataset]:
    import io

    return [pydicom.dcmread(io.BytesIO(data)) for _, data in multipart_parts(content_type, body)]


def value(item: dict, tag: str) -> object:
    """The first value of a DICOM JSON attribute (None when absent or empty)."""
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None
