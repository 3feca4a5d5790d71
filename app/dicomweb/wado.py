"""WADO-RS retrieval (PS3.18 §10.4): instances, metadata, bulk data and frames.

Resolution goes through the same views as QIDO-RS (:mod:`app.dicomweb.service`), so a study's
result objects (SEG, SR, Parametric Map) are retrieved with its source instances.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pydicom
from sqlalchemy.orm import Session

from app.dicomweb.dicom_json import PIXEL_TAGS, metadata_json, tag_hex
from app.dicomweb.query import QidoQuery
from app.dicomweb.service import DICOM_MEDIA_TYPE, InstanceView, Scope, Urls, find_instances
from app.dicomweb.transcode import deliver, delivery_syntax, to_explicit_little_endian
from app.errors import NotFound
from app.storage import BlobStore


def resolve_instances(*, session: Session, store: BlobStore, scope: Scope) -> list[InstanceView]:
    """Every instance (source and result) under a study, series or instance path; 404 if none."""
    views = find_instances(session=session, store=store, query=QidoQuery(), scope=scope)
    if not views:
        what = "instance" if scope.instance else "series" if scope.series else "study"
        uid = scope.instance or scope.series or scope.study or ""
        raise NotFound(detail=f"no {what} {uid[:64]!r}")
    return views


def delivery_plan(views: Sequence[InstanceView], requested: str | None) -> list[str]:
    """The transfer syntax of every instance (406 before anything is sent if one is not)."""
    return [delivery_syntax(v.transfer_syntax_uid, requested) for v in views]


def retrieve_parts(
    store: BlobStore, views: Sequence[InstanceView], syntaxes: Sequence[str]
) -> Iterator[tuple[str, bytes]]:
    """``(content type, PS3.10 bytes)`` per instance, transcoded lazily while streaming."""
    for view, syntax in zip(views, syntaxes, strict=True):
        data = deliver(store.get(view.blob_key), syntax)
        yield f"{DICOM_MEDIA_TYPE}; transfer-syntax={syntax}", data


def instance_metadata(
    *, store: BlobStore, views: Sequence[InstanceView], urls: Urls
) -> list[dict[str, Any]]:
    """WADO-RS metadata: each instance's header as DICOM JSON, bulk data by BulkDataURI."""
    out = []
    for view in views:
        url = urls.instance(
            view.study.study_instance_uid, view.series_instance_uid, view.sop_instance_uid
        )
        ds = pydicom.dcmread(store.path_for(view.blob_key), defer_size=256)
        out.append(metadata_json(ds, _bulk_uri_maker(url)))
    return out


def _bulk_uri_maker(instance_url: str) -> Callable[[int], str]:
    def bulk_uri(tag: int) -> str:
        return f"{instance_url}/bulk/{tag_hex(tag)}"

    return bulk_uri


def bulk_value(*, store: BlobStore, view: InstanceView, tag: int) -> bytes:
    """A top-level bulk data value, little endian and uncompressed (PS3.18 §10.4.1.1.5)."""
    ds = pydicom.dcmread(io.BytesIO(to_explicit_little_endian(store.get(view.blob_key))))
    if tag not in ds or not isinstance(ds[tag].value, bytes):
        raise NotFound(detail=f"instance has no bulk data element {tag_hex(tag)}")
    value: bytes = ds[tag].value
    return value


def frame_values(*, store: BlobStore, view: InstanceView, frames: Sequence[int]) -> list[bytes]:
    """Uncompressed frames (1-based numbers) as native little endian bytes (PS3.18 §8.7.3.5).

    Frames of 1-bit data (BINARY SEG) are packed per frame, least significant bit first
    (PS3.5 §8.1.1), starting at a byte boundary.
    """
    ds = pydicom.dcmread(io.BytesIO(to_explicit_little_endian(store.get(view.blob_key))))
    tag = next((t for t in sorted(PIXEL_TAGS, reverse=True) if t in ds), None)
    if tag is None:
        raise NotFound(detail=f"instance {view.sop_instance_uid[:64]} has no pixel data")
    pixels: bytes = ds[tag].value
    count = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = {0x7FE00008: 32, 0x7FE00009: 64}.get(tag, int(ds.get("BitsAllocated", 8) or 8))
    values_per_frame = int(ds.Rows) * int(ds.Columns) * samples
    out = []
    for number in frames:
        if not 1 <= number <= count:
            raise NotFound(detail=f"frame {number} out of range 1..{count}")
        if bits == 1:
            out.append(_bit_frame(pixels, number - 1, values_per_frame))
        else:
            size = values_per_frame * bits // 8
            out.append(pixels[(number - 1) * size : number * size])
    return out


def _bit_frame(pixels: bytes, index: int, values_per_frame: int) -> bytes:
    bits = np.unpackbits(np.frombuffer(pixels, np.uint8), bitorder="little")
    frame = bits[index * values_per_frame : (index + 1) * values_per_frame]
    return bytes(np.packbits(frame, bitorder="little").tobytes())
