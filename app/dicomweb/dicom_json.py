"""DICOM JSON (PS3.18 Annex F) helpers on top of pydicom's ``Dataset.to_json_dict``.

Query results and the Store Instances Response are built as pydicom Datasets and serialised by
pydicom, so VR handling (PN as ``{"Alphabetic": ...}``, IS/DS as numbers, UR, sequences) follows
the library that reads them back rather than a hand-written encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from app.errors import BadRequest

# Top-level elements whose values are bulk data (PS3.18 §8.7.3.3.1): never inlined in metadata.
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
INLINE_LIMIT = 1024  # bytes: smaller binary values stay inline (e.g. a short private OB)

log = logging.getLogger(__name__)


def parse_tag(key: str) -> BaseTag:
    """A QIDO attribute name, given as a keyword (``PatientID``) or 8 hex digits (``00100020``)."""
    text = key.strip()
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        return Tag(int(text, 16))
    tag = tag_for_keyword(text)
    if tag is None:
        raise BadRequest("invalid_query", f"unknown attribute {text[:64]!r}")
    return Tag(tag)


def tag_hex(tag: int) -> str:
    """The DICOM JSON key of a tag: 8 upper-case hex digits."""
    return f"{tag:08X}"


def tag_name(tag: int) -> str:
    """A keyword when the tag has one, else its hex form (for messages and Warning headers)."""
    return keyword_for_tag(tag) or tag_hex(tag)


def vr_of(tag: int) -> str:
    """The dictionary VR of a tag ('UN' for private or unknown tags)."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def put(ds: Dataset, tag: int, value: Any, vr: str | None = None) -> None:
    """Set an attribute; ``None`` writes an empty (zero length) value, as QIDO Type 2 wants."""
    ds.add(DataElement(tag, vr or vr_of(tag), value))


def to_json(ds: Dataset) -> dict[str, Any]:
    """A Dataset as a DICOM JSON object (binary values inline as base64).

    Element by element, so that one value that is invalid for its VR (a Window Center of
    ``"N/A"`` from a broken modality: a DS must be a number, PS3.5 §6.2) costs only that value:
    the attribute is returned present but empty (PS3.18 §F.2.5) instead of failing the whole
    response. pydicom's own ``suppress_invalid_tags`` would drop the attribute and log the
    exception, whose message quotes the value — which may be patient data.
    """
    out: dict[str, Any] = {}
    for tag in ds.keys():
        key = tag_hex(tag)
        element: DataElement | None = None
        try:
            element = ds[tag]
            if element.VR == "SQ":
                items = [to_json(item) for item in element.value or []]
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
                continue
            out[key] = element.to_json_dict(
                bulk_data_element_handler=None, bulk_data_threshold=1 << 62
            )
        except Exception:  # any converter failure costs one value, never the response
            out[key] = {"vr": vr_of(tag) if element is None else str(element.VR or vr_of(tag))}
            log.warning("attribute %s has a value invalid for its VR; returned empty", key)
    return out


def metadata_json(ds: Dataset, bulk_uri: Callable[[int], str]) -> dict[str, Any]:
    """A stored instance as WADO-RS metadata: top-level bulk values become ``BulkDataURI``.

    ``ds`` must be read with deferred large values (``dcmread(..., defer_size=...)``) so that
    pixel data is never loaded to build metadata. Elements inside sequences are small in the
    objects medcad stores and stay inline.
    """
    bulk: dict[int, str] = {}
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if raw is None:
            continue
        vr = str(raw.VR or vr_of(tag))  # implicit VR files leave raw VRs unset
        if " or " in vr:  # e.g. Pixel Data "OB or OW": OW unless 8-bit (PS3.5 §8.2)
            vr = "OB" if int(ds.get("BitsAllocated", 16) or 16) <= 8 else "OW"
        if vr not in BULK_VRS:
            continue
        length = raw.length if isinstance(raw, RawDataElement) else len(raw.value or b"")
        if tag in PIXEL_TAGS or length > INLINE_LIMIT:
            bulk[int(tag)] = vr
            del ds[tag]
    correct_ambiguous_vr(ds, True)  # "US or SS" and friends need a concrete VR in JSON
    out = to_json(ds)
    for bulk_tag, vr in bulk.items():
        out[tag_hex(bulk_tag)] = {"vr": vr, "BulkDataURI": bulk_uri(bulk_tag)}
    return dict(sorted(out.items()))


def referenced_item(
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
    *,
    retrieve_url: str | None = None,
    failure_reason: int | None = None,
    warning_reason: int | None = None,
) -> Dataset:
    """One item of ReferencedSOPSequence or FailedSOPSequence (PS3.18 Table I.1-1)."""
    item = Dataset()
    if sop_class_uid:
        item.ReferencedSOPClassUID = sop_class_uid
    if sop_instance_uid:
        item.ReferencedSOPInstanceUID = sop_instance_uid
    if retrieve_url is not None:
        item.add(DataElement(0x00081190, "UR", retrieve_url))
    if failure_reason is not None:
        item.FailureReason = failure_reason
    if warning_reason is not None:
        item.WarningReason = warning_reason
    return item


def store_response(
    retrieve_url: str | None, referenced: Iterable[Dataset], failed: Iterable[Dataset]
) -> dict[str, Any]:
    """The Store Instances Response Module as DICOM JSON (PS3.18 Annex I).

    RetrieveURL is Type 2 (empty when the instances span several studies); the two sequences
    are Type 1C and present only when they have items.
    """
    ds = Dataset()
    ds.add(DataElement(0x00081190, "UR", retrieve_url or ""))
    failed_items = list(failed)
    referenced_items = list(referenced)
    if failed_items:
        ds.FailedSOPSequence = Sequence(failed_items)
    if referenced_items:
        ds.ReferencedSOPSequence = Sequence(referenced_items)
    return to_json(ds)
