"""The streaming multipart/related parser: framing per RFC 2046, any chunking, bounded input."""

from __future__ import annotations

import asyncio
import os

import pytest

from app.dicomweb.multipart import (
    MultipartError,
    MultipartRelatedParser,
    encode_parts,
    parse_media_type,
    parse_stream,
    valid_boundary,
)
from app.errors import PayloadTooLarge
from tests.dicomweb.support import multipart_parts


def _parse(body: bytes, boundary: str, chunk: int | None = None) -> list[tuple[dict, bytes]]:
    parser = MultipartRelatedParser(boundary)
    if chunk is None:
        parser.feed(body)
    else:
        for start in range(0, len(body), chunk):
            parser.feed(body[start : start + chunk])
    return [(p.headers, p.read()) for p in parser.close()]


@pytest.mark.parametrize(
    ("header", "media", "params"),
    [
        (
            'multipart/related; type="application/dicom"; boundary="a b;c"',
            "multipart/related",
            {"type": "application/dicom", "boundary": "a b;c"},
        ),
        (
            "Multipart/Related; TYPE=application/dicom; boundary=0a1b-2c",
            "multipart/related",
            {"type": "application/dicom", "boundary": "0a1b-2c"},
        ),
        ('multipart/related;boundary="q\\"x"', "multipart/related", {"boundary": 'q"x'}),
        ("application/json", "application/json", {}),
    ],
)
def test_media_type_parameters_quoted_and_unquoted(header: str, media: str, params: dict) -> None:
    assert parse_media_type(header) == (media, params)


def test_boundary_validation() -> None:
    assert valid_boundary("b5f1a4c2-9f0e-4e0b-8d55-0b7c1e2f3a4d")
    # Orthanc 1.10: two UUIDs, 73 characters (over RFC 2046's 70, accepted on purpose)
    assert valid_boundary(
        "b5f1a4c2-9f0e-4e0b-8d55-0b7c1e2f3a4d-0c6d2b1a-7e3f-4a5b-9c8d-1e2f3a4b5c6d"
    )
    assert not valid_boundary("")
    assert not valid_boundary("x" * 257)
    assert not valid_boundary("ends with space ")
    assert not valid_boundary("bad\r\nline")


def test_every_chunk_split_gives_the_same_parts() -> None:
    # Payloads contain CR, LF, dashes and a near-miss of the delimiter.
    payloads = [b"\r\n--bound\r\n" + os.urandom(300), b"", b"--boundar" + b"\r" * 7]
    body = b"preamble text\r\n" + b"".join(
        b"--boundary\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n" % len(p)
        + p
        + b"\r\n"
        for p in payloads
    )
    body += b"--boundary-- \r\nepilogue ignored --boundary\r\n"
    expected = [
        ({"content-type": "application/dicom", "content-length": str(len(p))}, p) for p in payloads
    ]
    for chunk in (1, 2, 3, 7, 11, 64, len(body)):
        assert _parse(body, "boundary", chunk) == expected, chunk


def test_part_without_headers_and_transport_padding() -> None:
    body = b"--b  \t\r\n\r\nraw\r\n--b\r\nX-A: 1\r\n\r\nnext\r\n--b--"
    assert _parse(body, "b") == [({}, b"raw"), ({"x-a": "1"}, b"next")]


@pytest.mark.parametrize(
    "body",
    [
        b"--b\r\nContent-Type: application/dicom\r\n\r\nno close delimiter",
        b"--b\r\nContent-Type: application/dicom\r\n\r\ndata\r\n--b",  # truncated at the end
        b"no delimiter at all",
        b"--b\r\nBroken header line\r\n\r\ndata\r\n--b--",
        b"--bxyz\r\n\r\ndata\r\n--b--",  # the boundary is only a prefix of the line
    ],
)
def test_malformed_bodies_are_400(body: bytes) -> None:
    with pytest.raises(MultipartError) as info:
        _parse(body, "b")
    assert info.value.status == 400


def test_part_count_is_bounded() -> None:
    parser = MultipartRelatedParser("b", max_parts=2)
    with pytest.raises(PayloadTooLarge):
        parser.feed(b"--b\r\n\r\n1\r\n--b\r\n\r\n2\r\n--b\r\n\r\n3\r\n--b--")


def test_stream_is_counted_and_capped() -> None:
    async def body():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"x" * 1000

    with pytest.raises(PayloadTooLarge):
        asyncio.run(parse_stream(body(), "b", max_bytes=5000))


def test_large_part_spools_to_disk_and_reads_back() -> None:
    payload = os.urandom(6 * 1024 * 1024)  # over the in-memory spool threshold

    async def body():  # type: ignore[no-untyped-def]
        data = b"--b\r\n\r\n" + payload + b"\r\n--b--\r\n"
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    parts = asyncio.run(parse_stream(body(), "b", max_bytes=10 * 1024 * 1024))
    assert len(parts) == 1 and parts[0].size == len(payload)
    assert parts[0].body._rolled  # type: ignore[attr-defined]  # on disk, not in memory
    assert parts[0].read() == payload


def test_encoded_parts_parse_with_the_standard_library() -> None:
    payloads = [b"\x00\x01DICM" * 10, b"second"]
    body = b"".join(encode_parts((("application/dicom", p) for p in payloads), "zz-1"))
    parts = multipart_parts('multipart/related; type="application/dicom"; boundary=zz-1', body)
    assert [p for _, p in parts] == payloads
    assert _parse(body, "zz-1")[1][1] == b"second"
