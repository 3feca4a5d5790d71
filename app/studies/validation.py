"""Header-only validation of uploaded DICOM instances, and bounded ZIP member extraction.

Everything here works from the encoded bytes: no pixel data is decoded, and every length
read from the input is checked against the bytes actually present before it is trusted.
pydicom is lenient by design (it parses truncated files, swallows missing delimiters and
inflates Deflated datasets without a bound), so "pydicom read it" is not validation. The
checks, in order:

1. Container: a DICOM Part 10 file (128-byte preamble, ``DICM``, File Meta Information,
   PS3.10 §7.1) or a raw data set (a stream of data elements as exchanged over DIMSE,
   PS3.5 §7) recognised by its first tag being in group 0008. A File Meta group without
   its preamble is neither and is refused.
2. Transfer syntax: on the allow-list *and* decodable by the installed pydicom plugins.
   Deflated data sets (PS3.5 §A.5) are inflated with a bounded ``decompressobj``.
3. Structure: a bounded walk over every data element, sequence item and fragment, checking
   each declared length against the bytes present (truncation, hostile lengths, missing
   delimiters) and capping element count and nesting depth. pydicom then reads the same
   header and must agree on the values we use.
4. Identity: SOP Class/Instance, Study and Series Instance UIDs present and valid
   (PS3.5 §9.1: ≤ 64 characters, digits and dots, no leading zeros in components).
5. SOP Class: an image storage class we decode; known non-image objects (SEG, SR, PR,
   RT objects, waveforms, …) get their own code.
6. Image Pixel Module (PS3.3 §C.7.6.3): present, consistent and within geometry limits;
   decoded size rows × columns × frames × samples × bytes within budget.
7. Pixel data: native length equals the expected length (PS3.5 §8.1.1); encapsulated
   fragments (PS3.5 §A.4) are sane, offset tables point at fragments, the codec's own
   header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, RLE header) agrees with the DICOM
   header, and the decoded/compressed ratio is capped (codec bombs).

Policies
--------
* Part 10 files are stored with the 128-byte preamble zeroed (CVE-2019-11687: preamble
  polyglots); an executable or archive signature found there is reported in
  ``InspectedInstance.preamble_kind`` so the caller can raise a security audit event.
* Raw data sets (no File Meta Information) are stored wrapped in a Part 10 header whose
  Transfer Syntax UID is the encoding detected from the data (implicit VR little endian,
  explicit VR little or big endian); the data set bytes themselves are kept unchanged.
* A Part 10 file whose File Meta Information has no Transfer Syntax UID is rejected: it
  claims to be a conformant file and is not.

Error codes are snake case and stable; they reach API clients and metrics. Rejection
details never quote text attribute values (they may hold PHI); UIDs are quoted
shortened.
"""

from __future__ import annotations

import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from io import BytesIO
from typing import Final, Literal

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import TEXT_VR_DELIMS, VR

from app.errors import IngestRejected

MiB: Final = 1024 * 1024
GiB: Final = 1024 * MiB

# --------------------------------------------------------------------------------------
# Limits and result
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestLimits:
    """Budgets applied to one upload before anything is stored or decoded.

    The ratio caps apply only above their ``*_floor_bytes``: a small image that
    compresses extremely well (a blank frame) is harmless, what we stop is a small
    upload that expands into a large allocation.
    """

    max_decoded_bytes: int = 512 * MiB  # rows × columns × frames × samples × bytes
    max_frames: int = 4096
    max_rows: int = 16384
    max_columns: int = 16384
    max_inflated_bytes: int = 576 * MiB  # whole inflated Deflated data set
    max_inflation_ratio: float = 200.0
    inflation_ratio_floor_bytes: int = 8 * MiB
    max_codec_ratio: float = 1000.0  # decoded bytes / compressed fragment bytes
    codec_ratio_floor_bytes: int = 16 * MiB
    max_fragments: int = 65536
    max_elements: int = 250_000  # data elements + items walked (about 1 s of walking)
    # Every sequence item becomes a pydicom Dataset (tens of µs each) when the header is
    # read, here and again in the worker: this cap bounds that time to about 2 s. An
    # enhanced multi-frame object needs a few items per frame (functional groups).
    max_sequence_items: int = 32_768
    max_sequence_depth: int = 32
    max_zip_members: int = 10_000
    max_zip_member_bytes: int = 1 * GiB
    max_zip_total_bytes: int = 2 * GiB
    max_zip_member_ratio: float = 200.0
    zip_ratio_floor_bytes: int = 1 * MiB


Container = Literal["part10", "raw_dataset"]


@dataclass(frozen=True)
class InspectedInstance:
    """What the header of one accepted instance says.

    Fields that may carry PHI (patient and free-text descriptions) are excluded from
    ``repr`` so that logging the object cannot leak them; ``normalized_bytes`` is
    excluded because it is the whole file.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    transfer_syntax_uid: str
    modality: str | None
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    instance_number: int | None
    series_number: int | None
    image_position_patient: tuple[float, float, float] | None
    image_orientation_patient: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    decoded_bytes: int
    container: Container
    preamble_kind: str | None  # signature found in a non-zero preamble, e.g. "pe", "elf"
    study_date: str | None = field(default=None, repr=False)  # DA, YYYYMMDD
    study_time: str | None = field(default=None, repr=False)  # TM
    study_description: str | None = field(default=None, repr=False)
    series_description: str | None = field(default=None, repr=False)
    body_part_examined: str | None = field(default=None, repr=False)
    patient_id: str | None = field(default=None, repr=False)
    patient_name: str | None = field(default=None, repr=False)
    normalized_bytes: bytes = field(default=b"", repr=False)


# HTTP status per rejection code: 400 for input that is not what it claims to be, 422 for
# well-formed input we refuse by policy or budget, 413 for archives over the size caps.
REJECTION_STATUS: Final[dict[str, int]] = {
    "not_dicom": 400,
    "invalid_file_meta": 400,
    "truncated": 400,
    "malformed": 400,
    "dataset_too_complex": 422,
    "missing_uid": 400,
    "invalid_uid": 400,
    "unsupported_sop_class": 422,
    "non_image_sop_class": 422,
    "unsupported_transfer_syntax": 422,
    "no_pixel_data": 422,
    "invalid_pixel_module": 400,
    "absurd_geometry": 422,
    "unsupported_photometric": 422,
    "decoded_size_over_budget": 422,
    "pixel_length_mismatch": 400,
    "encapsulation_mismatch": 400,
    "invalid_fragments": 400,
    "invalid_offset_table": 400,
    "codec_header_mismatch": 400,
    "codec_bomb": 422,
    "deflate_bomb": 422,
    "invalid_zip": 400,
    "zip_bomb": 413,
    "zip_path_traversal": 400,
    "zip_symlink": 400,
    "zip_encrypted": 422,
    "zip_unsupported_compression": 422,
}


def _reject(code: str, detail: str) -> IngestRejected:
    return IngestRejected(code, detail, status=REJECTION_STATUS[code])


def _short(value: object, limit: int = 72) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_uid(text: str) -> str:
    """A UID for an error detail: quoted when it is digits and dots, else only described,
    so that free text placed in a UID field (possibly PHI) is never echoed or logged."""
    if text and len(text) <= 80 and all(ch in "0123456789." for ch in text):
        return repr(text)
    return f"of {len(text)} characters (not shown: it holds more than digits and dots)"


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# --------------------------------------------------------------------------------------
# Allow-lists
# --------------------------------------------------------------------------------------

_EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
_IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"
_DEFLATED: Final = "1.2.840.10008.1.2.1.99"
_RLE: Final = "1.2.840.10008.1.2.5"
_NATIVE_SYNTAXES: Final = frozenset({_IMPLICIT_LE, _EXPLICIT_LE, _EXPLICIT_BE, _DEFLATED})
_JPEG_SYNTAXES: Final = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    }
)
_J2K_SYNTAXES: Final = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
_CANDIDATE_SYNTAXES: Final = _NATIVE_SYNTAXES | _JPEG_SYNTAXES | _J2K_SYNTAXES | {_RLE}


@cache
def supported_transfer_syntaxes() -> frozenset[str]:
    """Transfer syntaxes we accept: the allow-list filtered by the installed decoders."""
    # imports codec plugins: only when first needed
    from pydicom.pixels.decoders.base import get_decoder

    supported = set()
    for uid in _CANDIDATE_SYNTAXES:
        try:
            if get_decoder(UID(uid)).is_available:
                supported.add(uid)
        except NotImplementedError:
            continue
    return frozenset(supported)


_IMAGE_STORAGE_PREFIX: Final = "1.2.840.10008.5.1.4.1.1."
# Image storage SOP classes (PS3.4 Annex B.5), by suffix after the prefix above.
_IMAGE_SOP_SUFFIXES: Final = frozenset(
    {
        "1",  # CR
        "1.1", "1.1.1", "1.2", "1.2.1", "1.3", "1.3.1",  # DX, MG, intra-oral
        "2", "2.1", "2.2",  # CT, Enhanced CT, Legacy Converted Enhanced CT
        "3", "3.1", "6", "6.1",  # US (retired and current), single and multi-frame
        "4", "4.1", "4.3", "4.4",  # MR, Enhanced MR, Enhanced MR Color, Legacy Converted
        "7", "7.1", "7.2", "7.3", "7.4",  # Secondary Capture, multi-frame SC
        "12.1", "12.1.1", "12.2", "12.2.1", "12.3",  # XA, enhanced XA, XRF, enhanced XRF
        "13.1.1", "13.1.2", "13.1.3", "13.1.4", "13.1.5",  # X-ray 3D, tomosynthesis
        "20", "5",  # NM (and retired NM)
        "128", "128.1", "130",  # PET, Legacy Converted Enhanced PET, Enhanced PET
        "481.1",  # RT Image
        "77.1.1", "77.1.2", "77.1.4", "77.1.5.1", "77.1.5.2",  # VL endoscopic/photo/ophth.
    }
)  # fmt: skip
# Objects that are not images: refused with their own code so the client knows why.
_NON_IMAGE_SOP_PREFIXES: Final = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, SEG, surface, fiducials
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT dose/structure set/plan/...
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.30",  # parametric map (float pixel data)
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
)

_MONOCHROME: Final = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"})
_COLOUR: Final = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})

# Non-zero preamble signatures worth a security event (CVE-2019-11687).
_PREAMBLE_SIGNATURES: Final = (
    (b"MZ", "pe"),
    (b"\x7fELF", "elf"),
    (b"\xca\xfe\xba\xbe", "mach_o"),
    (b"\xcf\xfa\xed\xfe", "mach_o"),
    (b"\xce\xfa\xed\xfe", "mach_o"),
    (b"\xfe\xed\xfa\xcf", "mach_o"),
    (b"\xfe\xed\xfa\xce", "mach_o"),
    (b"PK\x03\x04", "zip"),
    (b"%PDF", "pdf"),
    (b"#!", "script"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)

_UID_RE: Final = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_DATE_RE: Final = re.compile(r"[0-9]{8}")
_TIME_RE: Final = re.compile(r"[0-9]{2}(?:[0-9]{2}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?)?")
_CS_RE: Final = re.compile(r"[A-Z0-9_ ]{1,16}")
_IS_RE: Final = re.compile(r"[+-]?[0-9]{1,12}")
_DS_RE: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

# --------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------

_ITEM: Final = 0xFFFEE000
_ITEM_DELIMITER: Final = 0xFFFEE00D
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
_PIXEL_DATA: Final = 0x7FE00010
_FLOAT_PIXEL_DATA: Final = (0x7FE00008, 0x7FE00009)
_EXTENDED_OFFSET_TABLE: Final = 0x7FE00001
_EXTENDED_OFFSET_TABLE_LENGTHS: Final = 0x7FE00002
_TS_TAG: Final = 0x00020010
_SPECIFIC_CHARACTER_SET: Final = 0x00080005

_SOP_CLASS_UID: Final = 0x00080016
_SOP_INSTANCE_UID: Final = 0x00080018
_STUDY_INSTANCE_UID: Final = 0x0020000D
_SERIES_INSTANCE_UID: Final = 0x0020000E
_FRAME_OF_REFERENCE_UID: Final = 0x00200052
_ROWS: Final = 0x00280010
_COLUMNS: Final = 0x00280011
_SAMPLES_PER_PIXEL: Final = 0x00280002
_PHOTOMETRIC: Final = 0x00280004
_PLANAR_CONFIGURATION: Final = 0x00280006
_NUMBER_OF_FRAMES: Final = 0x00280008
_BITS_ALLOCATED: Final = 0x00280100
_BITS_STORED: Final = 0x00280101
_PIXEL_REPRESENTATION: Final = 0x00280103

# Values that pydicom's reading of the header must agree on with ours.
_CROSS_CHECKED_TAGS: Final = (
    _SOP_CLASS_UID,
    _SOP_INSTANCE_UID,
    _STUDY_INSTANCE_UID,
    _SERIES_INSTANCE_UID,
    _ROWS,
    _COLUMNS,
    _SAMPLES_PER_PIXEL,
    _PHOTOMETRIC,
    _NUMBER_OF_FRAMES,
    _BITS_ALLOCATED,
    _PIXEL_REPRESENTATION,
)

# Every VR pydicom knows (PS3.5 Table 6.2-1); an unknown one cannot be converted later.
_KNOWN_VRS: Final = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)

# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 §7.1.2).
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

# --------------------------------------------------------------------------------------
# Container: Part 10 file or raw data set
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Container:
    kind: Container
    dataset_offset: int  # where the data set (after any File Meta group) starts
    transfer_syntax: str | None  # from File Meta; None for a raw data set
    media_sop_class_uid: str | None
    media_sop_instance_uid: str | None
    preamble_kind: str | None


def _is_vr(two: bytes) -> bool:
    """Two upper-case ASCII letters: what pydicom accepts as an explicit VR."""
    return len(two) == 2 and 0x40 < two[0] < 0x5B and 0x40 < two[1] < 0x5B


def _preamble_kind(preamble: bytes) -> str | None:
    if not any(preamble):
        return None
    for signature, kind in _PREAMBLE_SIGNATURES:
        if preamble.startswith(signature):
            return kind
    return "unknown"


def _read_file_meta(data: bytes, start: int) -> tuple[int, dict[int, bytes]]:
    """Walk the File Meta group (PS3.10 §7.1: always explicit VR little endian).

    Returns the offset of the first byte after the group and the raw element values.
    """
    pos, values = start, dict[int, bytes]()
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        if len(values) > 64:
            raise _reject("invalid_file_meta", "File Meta Information has too many elements")
        group, element = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4 : pos + 6]
        if vr not in _KNOWN_VRS:
            raise _reject(
                "invalid_file_meta",
                f"File Meta element {_tag_str(group << 16 | element)} has no valid explicit VR",
            )
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                raise _reject("truncated", "data ends inside the File Meta Information")
            (length,) = struct.unpack_from("<L", data, pos + 8)
            value_pos = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value_pos = pos + 8
        if length == _UNDEFINED or value_pos + length > len(data):
            raise _reject("truncated", "data ends inside the File Meta Information")
        values[group << 16 | element] = data[value_pos : value_pos + length]
        pos = value_pos + length
    return pos, values


def _locate_dataset(data: bytes) -> _Container:
    if len(data) >= 132 and data[128:132] == b"DICM":
        end, meta = _read_file_meta(data, 132)
        return _container_from_meta("part10", end, meta, _preamble_kind(data[:128]))
    if data[:2] == b"\x02\x00" and _is_vr(data[4:6]):
        raise _reject(
            "not_dicom",
            "File Meta Information without the 128-byte preamble and DICM prefix (PS3.10 7.1)",
        )
    # A raw data set starts with a group 0008 element, little or big endian; anything
    # else is not something we can recognise as DICOM.
    if len(data) >= 8 and data[:2] in (b"\x08\x00", b"\x00\x08"):
        return _Container("raw_dataset", 0, None, None, None, None)
    raise _reject("not_dicom", "no DICM prefix at byte 128 and no recognisable data set")


def _container_from_meta(
    kind: Container, end: int, meta: dict[int, bytes], preamble_kind: str | None
) -> _Container:
    if _TS_TAG not in meta:
        raise _reject(
            "invalid_file_meta", "File Meta Information has no (0002,0010) Transfer Syntax UID"
        )
    ts = _clean_uid_bytes(meta[_TS_TAG])
    media_class, media_instance = meta.get(0x00020002), meta.get(0x00020003)
    return _Container(
        kind,
        end,
        ts,
        _clean_uid_bytes(media_class) if media_class is not None else None,
        _clean_uid_bytes(media_instance) if media_instance is not None else None,
        preamble_kind,
    )


def _clean_uid_bytes(raw: bytes) -> str:
    # UI values are padded to even length with NUL (PS3.5 §6.2); some writers use a space.
    return raw.rstrip(b"\x00 ").decode("latin-1")


# --------------------------------------------------------------------------------------
# Deflate (PS3.5 §A.5), bounded
# --------------------------------------------------------------------------------------


def _inflate(compressed: memoryview, limits: IngestLimits) -> bytes:
    """Inflate a raw-deflate data set without ever exceeding the inflation cap."""
    cap = min(
        limits.max_inflated_bytes,
        max(limits.inflation_ratio_floor_bytes, int(limits.max_inflation_ratio * len(compressed))),
    )
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    chunk = 1 * MiB
    try:
        for start in range(0, len(compressed), chunk):
            out += inflater.decompress(compressed[start : start + chunk], cap + 1 - len(out))
            # Output beyond max_length stays in unconsumed_tail: drain it under the cap.
            while inflater.unconsumed_tail and len(out) <= cap:
                out += inflater.decompress(inflater.unconsumed_tail, cap + 1 - len(out))
            if len(out) > cap:
                raise _reject(
                    "deflate_bomb",
                    f"Deflated data set of {len(compressed)} bytes inflates beyond the cap of "
                    f"{cap} bytes",
                )
        out += inflater.flush(cap + 1 - len(out))
    except zlib.error as exc:
        raise _reject("malformed", f"Deflated data set does not inflate: {exc}") from None
    if len(out) > cap:
        raise _reject("deflate_bomb", f"Deflated data set inflates beyond {cap} bytes")
    if not inflater.eof:
        raise _reject("truncated", "Deflated data set ends before the end of its deflate stream")
    return bytes(out)


# --------------------------------------------------------------------------------------
# Structural walk
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Element:
    vr: bytes | None  # None for implicit VR
    value_offset: int
    length: int | None  # None: undefined length


@dataclass
class _Structure:
    elements: dict[int, _Element]  # top-level data elements by tag
    fragments: list[tuple[int, int]] | None  # encapsulated Pixel Data items: (offset, length)


class _Walker:
    """Bounded walk over a data set: every length is checked against the buffer.

    Mirrors how pydicom frames elements (including its leniencies: an explicit-VR element
    whose VR bytes are not letters is read as implicit; VR UN with undefined length is a
    sequence in implicit VR, PS3.5 §6.2.2) so that the worker's reading matches ours.
    """

    def __init__(self, buf: bytes, little_endian: bool, limits: IngestLimits) -> None:
        self._buf = buf
        endian = "<" if little_endian else ">"
        self._tag = struct.Struct(f"{endian}HH").unpack_from
        self._u16 = struct.Struct(f"{endian}H").unpack_from
        self._u32 = struct.Struct(f"{endian}L").unpack_from
        self._limits = limits
        self._count = 0
        self._item_count = 0

    def walk(self, start: int, implicit: bool) -> _Structure:
        structure = _Structure(elements={}, fragments=None)
        self._dataset(start, len(self._buf), implicit, 0, structure)
        return structure

    def _tick(self) -> None:
        self._count += 1
        if self._count > self._limits.max_elements:
            raise _reject(
                "dataset_too_complex",
                f"data set has more than {self._limits.max_elements} elements and items",
            )

    def _header(self, pos: int, end: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """Read an element/item header at ``pos``: (tag, vr, length, value offset)."""
        if pos + 8 > end:
            raise _reject("truncated", f"data ends inside an element header at byte {pos}")
        group, element = self._tag(self._buf, pos)
        tag = group << 16 | element
        # Items and delimiters never carry a VR (PS3.5 §7.5).
        if implicit or group == 0xFFFE:
            return tag, None, self._u32(self._buf, pos + 4)[0], pos + 8
        vr = self._buf[pos + 4 : pos + 6]
        if not _is_vr(vr):
            return tag, None, self._u32(self._buf, pos + 4)[0], pos + 8
        if vr not in _KNOWN_VRS:
            raise _reject(
                "malformed", f"element {_tag_str(tag)} has an unknown VR {vr.decode('ascii')!r}"
            )
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise _reject("truncated", f"data ends inside an element header at byte {pos}")
            return tag, vr, self._u32(self._buf, pos + 8)[0], pos + 12
        return tag, vr, self._u16(self._buf, pos + 6)[0], pos + 8

    def _dataset(
        self,
        pos: int,
        end: int,
        implicit: bool,
        depth: int,
        top: _Structure | None,
        *,
        delimited: bool = False,
    ) -> int:
        """Walk data elements from ``pos`` to ``end``.

        ``top`` is set for the top-level data set. An item of undefined length
        (``delimited``) must end with an Item Delimitation Item before ``end``; the
        position after it is returned.
        """
        while pos < end:
            tag, vr, length, value_pos = self._header(pos, end, implicit)
            self._tick()
            if tag == _ITEM_DELIMITER and top is None:
                return value_pos  # pydicom ends any nested data set here
            if tag >> 16 == 0xFFFE:
                raise _reject("malformed", f"unexpected item tag {_tag_str(tag)} at byte {pos}")
            if length == _UNDEFINED:
                next_pos = self._undefined_length(tag, vr, value_pos, end, implicit, depth, top)
            else:
                if value_pos + length > end:
                    raise _reject(
                        "truncated",
                        f"element {_tag_str(tag)} declares {length} bytes at byte {value_pos} "
                        f"but only {max(end - value_pos, 0)} remain",
                    )
                if self._is_sequence(tag, vr, implicit):
                    self._items(value_pos, value_pos + length, implicit, depth + 1, defined=True)
                next_pos = value_pos + length
            if top is not None:
                if tag in top.elements:
                    raise _reject("malformed", f"element {_tag_str(tag)} appears twice")
                top.elements[tag] = _Element(
                    vr, value_pos, None if length == _UNDEFINED else length
                )
            pos = next_pos
        if delimited:
            raise _reject("truncated", "data ends inside a sequence item of undefined length")
        return pos

    def _is_sequence(self, tag: int, vr: bytes | None, implicit: bool) -> bool:
        if vr is not None:
            return vr == b"SQ"
        if not implicit:
            return False
        try:
            return bool(dictionary_VR(tag) == "SQ")
        except KeyError:
            return False

    def _undefined_length(
        self,
        tag: int,
        vr: bytes | None,
        pos: int,
        end: int,
        implicit: bool,
        depth: int,
        top: _Structure | None,
    ) -> int:
        if tag == _PIXEL_DATA and top is not None:
            top.fragments, after = self._fragments(pos, end, tag)
            return after
        if vr in (b"SQ", b"UN"):  # undefined-length UN is a sequence (PS3.5 6.2.2)
            return self._items(pos, end, vr == b"UN" or implicit, depth + 1, defined=False)
        if vr is None:
            # implicit VR: the dictionary decides; unknown (private) tags are sequences
            # when an item follows, as pydicom decides
            try:
                is_sequence = dictionary_VR(tag) == "SQ"
            except KeyError:
                is_sequence = self._starts_item(pos)
            if is_sequence:
                return self._items(pos, end, True, depth + 1, defined=False)
        # other undefined-length values (e.g. encapsulated icon pixel data) are fragments
        return self._fragments(pos, end, tag)[1]

    def _starts_item(self, pos: int) -> bool:
        if pos + 4 > len(self._buf):
            return False
        group, element = self._tag(self._buf, pos)
        return bool(group << 16 | element == _ITEM)

    def _items(self, pos: int, end: int, implicit: bool, depth: int, *, defined: bool) -> int:
        """Walk sequence items; a defined-length sequence ends at ``end``."""
        if depth > self._limits.max_sequence_depth:
            raise _reject(
                "dataset_too_complex",
                f"sequences nest deeper than {self._limits.max_sequence_depth} levels",
            )
        while not (defined and pos >= end):
            tag, _, length, value_pos = self._header(pos, end, True)
            self._tick()
            if tag == _SEQUENCE_DELIMITER and not defined:
                return value_pos
            if tag != _ITEM:
                raise _reject("malformed", f"expected a sequence item at byte {pos}")
            self._item_count += 1
            if self._item_count > self._limits.max_sequence_items:
                raise _reject(
                    "dataset_too_complex",
                    f"data set has more than {self._limits.max_sequence_items} sequence items",
                )
            if length == _UNDEFINED:
                pos = self._dataset(value_pos, end, implicit, depth, None, delimited=True)
                continue
            if value_pos + length > end:
                raise _reject(
                    "truncated",
                    f"sequence item declares {length} bytes at byte {value_pos} but only "
                    f"{max(end - value_pos, 0)} remain",
                )
            self._dataset(value_pos, value_pos + length, implicit, depth, None)
            pos = value_pos + length
        return pos

    def _fragments(self, pos: int, end: int, tag: int) -> tuple[list[tuple[int, int]], int]:
        """Walk encapsulated items (PS3.5 §A.4) to the Sequence Delimitation Item."""
        fragments: list[tuple[int, int]] = []
        while True:
            item_tag, _, length, value_pos = self._header(pos, end, True)
            self._tick()
            if item_tag == _SEQUENCE_DELIMITER:
                return fragments, value_pos
            if item_tag != _ITEM or length == _UNDEFINED:
                raise _reject(
                    "malformed", f"{_tag_str(tag)} holds a non-item at byte {pos} (PS3.5 A.4)"
                )
            if value_pos + length > end:
                raise _reject(
                    "truncated",
                    f"fragment of {_tag_str(tag)} declares {length} bytes at byte {value_pos} "
                    f"but only {max(end - value_pos, 0)} remain",
                )
            if len(fragments) > self._limits.max_fragments:
                raise _reject(
                    "invalid_fragments",
                    f"{_tag_str(tag)} has more than {self._limits.max_fragments} fragments",
                )
            fragments.append((value_pos, length))
            pos = value_pos + length


def _initial_encoding(buf: bytes, start: int, ts: str | None) -> tuple[bool, bool]:
    """(implicit VR, little endian) the way pydicom's reader settles them (PS3.5 §A)."""
    if ts is None:
        # Raw data set: explicit if the first element carries a valid VR; big endian
        # only shows as a byte-swapped group number (pydicom's heuristic, issue 258).
        group = int.from_bytes(buf[start : start + 2], "little")
        if _is_vr(buf[start + 4 : start + 6]):
            return False, group < 1024
        return True, True
    implicit = ts == _IMPLICIT_LE
    little = ts != _EXPLICIT_BE
    # pydicom trusts the data over the declared syntax when the first VR disagrees.
    first_vr = buf[start + 4 : start + 6]
    if len(first_vr) == 2 and _is_vr(first_vr) == implicit:
        implicit = not implicit
    return implicit, little


# --------------------------------------------------------------------------------------
# Values (read raw, so that pydicom never warns with a value in the message)
# --------------------------------------------------------------------------------------


class _Header:
    """Typed access to raw top-level values of the walked data set."""

    def __init__(self, buf: bytes, structure: _Structure, little_endian: bool) -> None:
        self._buf = buf
        self._elements = structure.elements
        self._little = little_endian
        self._encodings = self._character_sets()

    def _character_sets(self) -> list[str]:
        """Python codecs for (0008,0005); a damaged value falls back to the default
        repertoire (it only affects how descriptions are decoded, PS3.5 6.1.2.3)."""
        charset = self.ascii(_SPECIFIC_CHARACTER_SET)
        terms = [t.strip() for t in charset.split("\\")] if charset else []
        if not all(_CS_RE.fullmatch(t) or t == "" for t in terms):
            terms = []
        try:
            return convert_encodings(terms or None)
        except (LookupError, ValueError):
            return convert_encodings(None)

    def raw(self, tag: int) -> bytes | None:
        element = self._elements.get(tag)
        if element is None or element.length is None:
            return None
        return self._buf[element.value_offset : element.value_offset + element.length]

    def has(self, tag: int) -> bool:
        return tag in self._elements

    def ascii(self, tag: int) -> str | None:
        raw = self.raw(tag)
        if raw is None:
            return None
        try:
            text = raw.rstrip(b"\x00 ").decode("ascii")
        except UnicodeDecodeError:
            return None
        return text.lstrip(" ") or None

    def text(self, tag: int, *, limit: int = 64) -> str | None:
        raw = self.raw(tag)
        if raw is None:
            return None
        try:
            decoded = decode_bytes(raw, self._encodings, TEXT_VR_DELIMS)
        except (LookupError, ValueError):  # UnicodeError is a ValueError
            return None
        text = decoded.rstrip("\x00 ").strip()
        return text[:limit] or None

    def us(self, tag: int) -> int | None:
        raw = self.raw(tag)
        if raw is None or len(raw) != 2:
            return None
        return int.from_bytes(raw, "little" if self._little else "big")

    def integer(self, tag: int) -> int | None:
        """First value of an IS element, or None when absent or not an integer string."""
        text = self.ascii(tag)
        if text is None:
            return None
        first = text.split("\\")[0].strip()
        return int(first) if _IS_RE.fullmatch(first) else None

    def decimals(self, tag: int, count: int) -> tuple[float, ...] | None:
        """Exactly ``count`` finite DS values, or None."""
        text = self.ascii(tag)
        if text is None:
            return None
        parts = [p.strip() for p in text.split("\\")]
        if len(parts) != count or not all(_DS_RE.fullmatch(p) for p in parts):
            return None
        values = tuple(float(p) for p in parts)
        return values if all(abs(v) < 1e30 for v in values) else None

    def code_string(self, tag: int) -> str | None:
        text = self.ascii(tag)
        return text if text is not None and _CS_RE.fullmatch(text) else None


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def _check_uid(header: _Header, tag: int, name: str) -> str:
    raw = header.raw(tag)
    if raw is None or not raw.rstrip(b"\x00 "):
        raise _reject("missing_uid", f"{name} {_tag_str(tag)} is missing or empty")
    return _validate_uid(raw, name)


def _validate_uid(raw: bytes, name: str) -> str:
    value = raw.rstrip(b"\x00 ")
    text = value.decode("latin-1")
    if len(value) > 64 or not _UID_RE.fullmatch(text):
        raise _reject(
            "invalid_uid",
            f"{name} {_describe_uid(text)} is not a valid UID "
            "(at most 64 characters, digits and dots, no leading zeros; PS3.5 9.1)",
        )
    return text


def _check_sop_class(sop_class: str) -> None:
    if sop_class.startswith(_IMAGE_STORAGE_PREFIX):
        if sop_class[len(_IMAGE_STORAGE_PREFIX) :] in _IMAGE_SOP_SUFFIXES:
            return
    name = UID(sop_class).name
    if sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
        raise _reject(
            "non_image_sop_class",
            f"SOP Class {sop_class} ({name}) is not an image; medcad analyses image objects",
        )
    raise _reject(
        "unsupported_sop_class",
        f"SOP Class {_describe_uid(sop_class)} ({name}) is not an image storage class medcad "
        "decodes",
    )


def _check_transfer_syntax(ts: str) -> None:
    if ts not in supported_transfer_syntaxes():
        supported = ", ".join(sorted(supported_transfer_syntaxes()))
        known = UID(ts).name if _UID_RE.fullmatch(ts) else "not a valid UID"
        raise _reject(
            "unsupported_transfer_syntax",
            f"Transfer Syntax {_describe_uid(ts)} ({known}) is not supported; "
            f"supported: {supported}",
        )


@dataclass(frozen=True)
class _PixelModule:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded array: 1-bit data unpacks to one byte per pixel."""
        bytes_per_sample = max(1, self.bits_allocated // 8)
        return self.rows * self.columns * self.frames * self.samples * bytes_per_sample

    @property
    def native_length(self) -> int:
        """Expected native Pixel Data length in bytes before even padding (PS3.5 §8.1.1)."""
        samples_factor = self.samples
        if self.photometric == "YBR_FULL_422":
            samples_factor = 2  # two luminance samples share one CB and one CR (PS3.3 C.7.6.3.1.2)
        bits = self.rows * self.columns * self.frames * samples_factor * self.bits_allocated
        return (bits + 7) // 8


def _required_us(header: _Header, tag: int, name: str) -> int:
    value = header.us(tag)
    if value is None:
        raise _reject(
            "invalid_pixel_module", f"{name} {_tag_str(tag)} is missing or not a 2-byte US"
        )
    return value


def _check_pixel_module(header: _Header, limits: IngestLimits) -> _PixelModule:
    rows = _required_us(header, _ROWS, "Rows")
    columns = _required_us(header, _COLUMNS, "Columns")
    samples = _required_us(header, _SAMPLES_PER_PIXEL, "Samples per Pixel")
    bits_allocated = _required_us(header, _BITS_ALLOCATED, "Bits Allocated")
    bits_stored = _required_us(header, _BITS_STORED, "Bits Stored")
    representation = _required_us(header, _PIXEL_REPRESENTATION, "Pixel Representation")
    frames = 1
    if header.has(_NUMBER_OF_FRAMES) and header.ascii(_NUMBER_OF_FRAMES) is not None:
        parsed = header.integer(_NUMBER_OF_FRAMES)
        if parsed is None:
            raise _reject("absurd_geometry", "Number of Frames is not an integer string")
        frames = parsed
    photometric = header.code_string(_PHOTOMETRIC)
    if photometric is None:
        raise _reject("invalid_pixel_module", "Photometric Interpretation is missing or invalid")
    module = _PixelModule(
        rows, columns, frames, samples, bits_allocated, bits_stored, representation, photometric
    )
    _check_geometry(module, limits)
    _check_consistency(module, header)
    return module


def _check_geometry(module: _PixelModule, limits: IngestLimits) -> None:
    bounds = (
        ("Rows", module.rows, limits.max_rows),
        ("Columns", module.columns, limits.max_columns),
        ("Number of Frames", module.frames, limits.max_frames),
    )
    for name, value, limit in bounds:
        if not 1 <= value <= limit:
            raise _reject("absurd_geometry", f"{name} is {value}; allowed 1 to {limit}")
    if module.samples not in (1, 3):
        raise _reject("absurd_geometry", f"Samples per Pixel is {module.samples}; allowed 1 or 3")
    if module.bits_allocated not in (1, 8, 16, 32):
        raise _reject(
            "absurd_geometry",
            f"Bits Allocated is {module.bits_allocated}; allowed 1, 8, 16 or 32",
        )


def _check_consistency(module: _PixelModule, header: _Header) -> None:
    if not 1 <= module.bits_stored <= module.bits_allocated:
        raise _reject(
            "invalid_pixel_module",
            f"Bits Stored {module.bits_stored} is not within 1..Bits Allocated "
            f"({module.bits_allocated})",
        )
    if module.pixel_representation not in (0, 1):
        raise _reject(
            "invalid_pixel_module",
            f"Pixel Representation is {module.pixel_representation}; allowed 0 or 1",
        )
    if module.photometric not in _MONOCHROME | _COLOUR:
        raise _reject(
            "unsupported_photometric",
            f"Photometric Interpretation {module.photometric!r} is not supported; supported: "
            + ", ".join(sorted(_MONOCHROME | _COLOUR)),
        )
    expected_samples = 1 if module.photometric in _MONOCHROME else 3
    if module.samples != expected_samples:
        raise _reject(
            "invalid_pixel_module",
            f"Photometric Interpretation {module.photometric} needs Samples per Pixel "
            f"{expected_samples}, got {module.samples}",
        )
    planar = header.us(_PLANAR_CONFIGURATION)
    if module.samples == 3 and planar not in (None, 0, 1):
        raise _reject("invalid_pixel_module", f"Planar Configuration is {planar}; allowed 0 or 1")


def _check_budget(module: _PixelModule, limits: IngestLimits) -> None:
    if module.decoded_bytes > limits.max_decoded_bytes:
        raise _reject(
            "decoded_size_over_budget",
            f"decoded size {module.rows}x{module.columns}x{module.frames} frames x "
            f"{module.samples} samples x {max(1, module.bits_allocated // 8)} bytes = "
            f"{module.decoded_bytes} bytes exceeds the budget of {limits.max_decoded_bytes}",
        )


def _check_native_pixels(module: _PixelModule, element: _Element) -> None:
    if element.length is None:
        raise _reject(
            "encapsulation_mismatch",
            "Pixel Data is encapsulated but the transfer syntax is native",
        )
    expected = module.native_length
    padded = expected + (expected & 1)
    if element.length not in (expected, padded):
        raise _reject(
            "pixel_length_mismatch",
            f"Pixel Data has {element.length} bytes; Rows {module.rows} x Columns "
            f"{module.columns} x Frames {module.frames} x Samples {module.samples} x "
            f"Bits Allocated {module.bits_allocated} needs {padded}",
        )


# --------------------------------------------------------------------------------------
# Encapsulated pixel data
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CodecHeader:
    rows: int | None  # None: not given in the header (JPEG DNL)
    columns: int
    components: int


def _jpeg_header(buf: bytes, start: int, end: int) -> _CodecHeader | None:
    """Frame header of a JPEG (ISO/IEC 10918-1 B.2.2) or JPEG-LS (14495-1 C.2.2) stream."""
    if buf[start : start + 2] != b"\xff\xd8":
        return None
    pos, markers = start + 2, 0
    while pos + 4 <= end and markers < 256:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        markers += 1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", buf, pos + 2)
        is_sof = (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7
        if is_sof:
            if pos + 10 > end:
                return None
            rows, columns = struct.unpack_from(">HH", buf, pos + 5)
            return _CodecHeader(rows or None, columns, buf[pos + 9])
        pos += 2 + length
    return None


def _j2k_header(buf: bytes, start: int, end: int) -> _CodecHeader | None:
    """Image size from the SIZ marker segment (ISO/IEC 15444-1 A.5.1)."""
    window = buf[start : min(end, start + 65536)]  # JP2 boxes may precede the codestream
    at = window.find(b"\xff\x4f\xff\x51")  # SOC then SIZ; also finds it inside a JP2 box
    if at < 0 or at + 42 > len(window):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">LLLL", window, at + 8)
    (components,) = struct.unpack_from(">H", window, at + 40)
    return _CodecHeader(ysiz - yosiz, xsiz - xosiz, components)


def _check_rle_header(module: _PixelModule, buf: bytes, offset: int, length: int) -> None:
    """RLE header (PS3.5 §G.5): one segment per byte of each sample, offsets inside."""
    expected_segments = module.samples * max(1, module.bits_allocated // 8)
    if length < 64:
        raise _reject("codec_header_mismatch", "RLE fragment is shorter than its 64-byte header")
    header = struct.unpack_from("<16L", buf, offset)
    segments, offsets = header[0], header[1 : 1 + min(header[0], 15)]
    if segments != expected_segments or module.bits_allocated == 1:
        raise _reject(
            "codec_header_mismatch",
            f"RLE frame has {segments} segments; Samples per Pixel {module.samples} and Bits "
            f"Allocated {module.bits_allocated} need {expected_segments}",
        )
    if offsets[0] != 64 or list(offsets) != sorted(offsets) or offsets[-1] >= length:
        raise _reject("codec_header_mismatch", "RLE segment offsets point outside the fragment")


def _frame_starts(
    header: _Header, buf: bytes, fragments: list[tuple[int, int]], frames: int
) -> list[int]:
    """Index (into ``fragments[1:]``) of the first fragment of each frame, when knowable."""
    data_fragments = fragments[1:]
    if not data_fragments:
        raise _reject("invalid_fragments", "encapsulated Pixel Data has no fragments")
    if len(data_fragments) < frames:
        raise _reject(
            "invalid_fragments",
            f"{frames} frames in {len(data_fragments)} fragments; each frame needs at least "
            "one (PS3.5 A.4)",
        )
    # Item offsets relative to the first data fragment's item tag, as offset tables count.
    base = data_fragments[0][0] - 8
    starts = {offset - 8 - base: index for index, (offset, _) in enumerate(data_fragments)}
    table = _offset_table(header, buf, fragments[0], frames)
    if table is not None:
        if table[0] != 0 or table != sorted(table) or any(t not in starts for t in table):
            raise _reject(
                "invalid_offset_table", "an offset table entry does not point at a fragment"
            )
        return [starts[t] for t in table]
    if frames == 1 or len(data_fragments) == frames:
        return list(range(frames))
    return [0]  # fragments cannot be assigned to frames without a table: check the first


def _offset_table(
    header: _Header, buf: bytes, basic: tuple[int, int], frames: int
) -> list[int] | None:
    extended = header.raw(_EXTENDED_OFFSET_TABLE)
    if extended is not None:
        if basic[1] != 0 or len(extended) != 8 * frames:
            raise _reject(
                "invalid_offset_table",
                f"Extended Offset Table has {len(extended)} bytes for {frames} frames "
                "(8 per frame, with an empty Basic Offset Table)",
            )
        return list(struct.unpack(f"<{frames}Q", extended))
    offset, length = basic
    if length == 0:
        return None
    if length != 4 * frames:
        raise _reject(
            "invalid_offset_table",
            f"Basic Offset Table has {length} bytes for {frames} frames (4 per frame)",
        )
    return list(struct.unpack_from(f"<{frames}L", buf, offset))


def _check_encapsulated(
    module: _PixelModule,
    header: _Header,
    buf: bytes,
    fragments: list[tuple[int, int]],
    ts: str,
    limits: IngestLimits,
) -> None:
    starts = _frame_starts(header, buf, fragments, module.frames)
    data_fragments = fragments[1:]
    compressed = sum(length for _, length in data_fragments)
    decoded = module.decoded_bytes
    if decoded > limits.codec_ratio_floor_bytes and decoded > limits.max_codec_ratio * max(
        compressed, 1
    ):
        raise _reject(
            "codec_bomb",
            f"{compressed} compressed bytes claim to decode to {decoded} bytes "
            f"(ratio above {limits.max_codec_ratio:g})",
        )
    if ts == _RLE and len(data_fragments) != module.frames:
        raise _reject(
            "invalid_fragments",
            f"RLE needs exactly one fragment per frame (PS3.5 G.2); {module.frames} frames, "
            f"{len(data_fragments)} fragments",
        )
    for index in starts:
        offset, length = data_fragments[index]
        _check_codec_header(module, buf, offset, length, ts)


def _check_codec_header(
    module: _PixelModule, buf: bytes, offset: int, length: int, ts: str
) -> None:
    if ts == _RLE:
        _check_rle_header(module, buf, offset, length)
        return
    parse = _jpeg_header if ts in _JPEG_SYNTAXES else _j2k_header
    codec = parse(buf, offset, offset + length)
    if codec is None:
        raise _reject(
            "codec_header_mismatch",
            f"a frame does not start with a readable {UID(ts).name} header",
        )
    rows_ok = codec.rows is None or codec.rows == module.rows
    if not rows_ok or codec.columns != module.columns or codec.components != module.samples:
        raise _reject(
            "codec_header_mismatch",
            f"codec header says {codec.rows}x{codec.columns}x{codec.components}; DICOM header "
            f"says {module.rows}x{module.columns}x{module.samples}",
        )


# --------------------------------------------------------------------------------------
# Cross-check with pydicom
# --------------------------------------------------------------------------------------


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in (_PIXEL_DATA, *_FLOAT_PIXEL_DATA)


def _cross_check(buf: bytes, start: int, encoding: tuple[bool, bool], header: _Header) -> None:
    """Read the header with pydicom, as the worker will, and require the same values."""
    stream = BytesIO(buf)
    stream.seek(start)
    implicit, little = encoding
    try:
        dataset = read_dataset(
            stream, implicit, little, stop_when=_stop_at_pixels, defer_size=64 * 1024
        )
    except Exception as exc:  # any reader failure means a malformed file
        raise _reject(
            "malformed", f"the DICOM reader fails on this data set: {type(exc).__name__}"
        ) from None
    if tuple(dataset.original_encoding[:2]) != encoding:
        raise _reject("malformed", "the data set's encoding is ambiguous")
    for tag in _CROSS_CHECKED_TAGS:
        ours = header.raw(tag)
        theirs = _pydicom_raw(dataset, tag)
        if ours != theirs:
            raise _reject("malformed", f"element {_tag_str(tag)} is read inconsistently")


def _pydicom_raw(dataset: Dataset, tag: int) -> bytes | None:
    """The undecoded value pydicom read for ``tag`` (None if absent, deferred or a sequence)."""
    element = dataset.get_item(tag) if tag in dataset else None
    if isinstance(element, RawDataElement) and isinstance(element.value, bytes):
        return element.value
    return None


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def inspect_instance(data: bytes, *, limits: IngestLimits) -> InspectedInstance:
    """Validate one uploaded DICOM object from its header and encoded bytes.

    Parameters
    ----------
    data : the uploaded bytes (a Part 10 file or a raw data set).
    limits : the budgets to enforce.

    Returns
    -------
    InspectedInstance with the identifying and geometric attributes and the bytes to
    store (``normalized_bytes``: preamble zeroed, raw data sets wrapped in Part 10).

    Raises
    ------
    IngestRejected with a specific ``code`` (see ``REJECTION_STATUS``) for anything that
    is not a supported, well-formed image object within budget.
    """
    if not data:
        raise _reject("not_dicom", "empty upload")
    container = _locate_dataset(data)
    buf, start = data, container.dataset_offset
    ts = container.transfer_syntax
    if ts is not None:
        _check_transfer_syntax(ts)
        if ts == _DEFLATED:
            buf, start = _inflate(memoryview(data)[start:], limits), 0
    if start >= len(buf):
        raise _reject("truncated", "the data set is empty")
    encoding = _initial_encoding(buf, start, ts)
    structure = _Walker(buf, encoding[1], limits).walk(start, encoding[0])
    header = _Header(buf, structure, encoding[1])
    if ts is None:
        ts = _raw_dataset_syntax(encoding)
        _check_transfer_syntax(ts)
    inspected = _inspect_header(data, buf, structure, header, container, ts, limits)
    _cross_check(buf, start, encoding, header)
    return inspected


def _raw_dataset_syntax(encoding: tuple[bool, bool]) -> str:
    implicit, little = encoding
    if implicit:
        return _IMPLICIT_LE
    return _EXPLICIT_LE if little else _EXPLICIT_BE


def _inspect_header(
    data: bytes,
    buf: bytes,
    structure: _Structure,
    header: _Header,
    container: _Container,
    ts: str,
    limits: IngestLimits,
) -> InspectedInstance:
    media_class = container.media_sop_class_uid
    if header.raw(_SOP_CLASS_UID) is None and media_class is not None:
        # e.g. a DICOMDIR: the data set has no SOP Class UID, the File Meta names it
        if media_class.startswith(_NON_IMAGE_SOP_PREFIXES):
            _check_sop_class(media_class)
    sop_class = _check_uid(header, _SOP_CLASS_UID, "SOP Class UID")
    sop_instance = _check_uid(header, _SOP_INSTANCE_UID, "SOP Instance UID")
    study = _check_uid(header, _STUDY_INSTANCE_UID, "Study Instance UID")
    series = _check_uid(header, _SERIES_INSTANCE_UID, "Series Instance UID")
    frame_of_reference = header.raw(_FRAME_OF_REFERENCE_UID)
    frame_of_reference_uid = (
        _validate_uid(frame_of_reference, "Frame of Reference UID")
        if frame_of_reference is not None and frame_of_reference.rstrip(b"\x00 ")
        else None
    )
    if container.media_sop_instance_uid not in (None, "", sop_instance):
        _validate_uid(container.media_sop_instance_uid.encode("latin-1"), "Media SOP Instance UID")
    _check_sop_class(sop_class)
    pixel = structure.elements.get(_PIXEL_DATA)
    if pixel is None:
        raise _reject("no_pixel_data", "the object has no (7FE0,0010) Pixel Data")
    module = _check_pixel_module(header, limits)
    _check_budget(module, limits)
    if ts in _NATIVE_SYNTAXES:
        _check_native_pixels(module, pixel)
    else:
        if structure.fragments is None:
            raise _reject(
                "encapsulation_mismatch",
                f"Pixel Data is not encapsulated but the transfer syntax is {UID(ts).name}",
            )
        _check_encapsulated(module, header, buf, structure.fragments, ts, limits)
    return InspectedInstance(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        frame_of_reference_uid=frame_of_reference_uid,
        transfer_syntax_uid=ts,
        modality=header.code_string(0x00080060),
        rows=module.rows,
        columns=module.columns,
        frames=module.frames,
        samples_per_pixel=module.samples,
        bits_allocated=module.bits_allocated,
        bits_stored=module.bits_stored,
        pixel_representation=module.pixel_representation,
        photometric_interpretation=module.photometric,
        instance_number=header.integer(0x00200013),
        series_number=header.integer(0x00200011),
        image_position_patient=_triple(header.decimals(0x00200032, 3)),
        image_orientation_patient=_sextuple(header.decimals(0x00200037, 6)),
        pixel_spacing=_positive_pair(header.decimals(0x00280030, 2)),
        decoded_bytes=module.decoded_bytes,
        container=container.kind,
        preamble_kind=container.preamble_kind,
        study_date=_matching(header.ascii(0x00080020), _DATE_RE),
        study_time=_matching(header.ascii(0x00080030), _TIME_RE),
        study_description=header.text(0x00081030),
        series_description=header.text(0x0008103E),
        body_part_examined=header.code_string(0x00180015),
        patient_id=header.text(0x00100020),
        patient_name=header.text(0x00100010, limit=324),
        normalized_bytes=_normalize(data, container, ts, sop_class, sop_instance),
    )


def _matching(text: str | None, pattern: re.Pattern[str]) -> str | None:
    return text if text is not None and pattern.fullmatch(text) else None


def _triple(values: tuple[float, ...] | None) -> tuple[float, float, float] | None:
    return (values[0], values[1], values[2]) if values is not None else None


def _sextuple(
    values: tuple[float, ...] | None,
) -> tuple[float, float, float, float, float, float] | None:
    if values is None:
        return None
    return (values[0], values[1], values[2], values[3], values[4], values[5])


def _positive_pair(values: tuple[float, ...] | None) -> tuple[float, float] | None:
    if values is None or values[0] <= 0 or values[1] <= 0:
        return None
    return (values[0], values[1])


def _normalize(
    data: bytes, container: _Container, ts: str, sop_class: str, sop_instance: str
) -> bytes:
    """The bytes to store: zero preamble, and always a Part 10 file (module docstring)."""
    if container.kind == "part10":
        return data if not any(data[:128]) else bytes(128) + data[128:]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(ts)
    out = DicomBytesIO()
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + data


# --------------------------------------------------------------------------------------
# ZIP archives
# --------------------------------------------------------------------------------------

_ZIP_METHODS: Final = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_ZIP_EOCD: Final = b"PK\x05\x06"


def _is_junk(name: str) -> bool:
    """macOS archive residue: resource forks and Finder metadata, never DICOM."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base == ".DS_Store" or base.startswith("._")


def _is_unsafe_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return (
        not name  # an empty name also breaks ZipInfo.is_dir() (IndexError); found by fuzzing
        or name.startswith(("/", "\\"))
        or (len(name) > 1 and name[1] == ":")
        or any(part == ".." for part in parts)
        or any(ord(ch) < 0x20 for ch in name)
    )


def _declared_entry_count(data: bytes) -> int | None:
    """Entry count from the End of Central Directory record, before zipfile parses it."""
    at = data.rfind(_ZIP_EOCD, max(0, len(data) - 65536 - 22))
    if at < 0 or at + 22 > len(data):
        return None
    (count,) = struct.unpack_from("<H", data, at + 10)
    return None if count == 0xFFFF else int(count)  # 0xFFFF: ZIP64, counted after parsing


def _check_zip_entries(infos: list[zipfile.ZipInfo], size: int, limits: IngestLimits) -> None:
    total = 0
    for info in infos:
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _reject("zip_symlink", f"archive member {_short(info.filename)} is a symlink")
        if _is_unsafe_name(info.filename):
            raise _reject(
                "zip_path_traversal", f"archive member name {_short(info.filename)} is unsafe"
            )
        if info.is_dir() or _is_junk(info.filename):
            continue
        if info.flag_bits & 0x1:
            raise _reject("zip_encrypted", f"archive member {_short(info.filename)} is encrypted")
        if info.compress_type not in _ZIP_METHODS:
            raise _reject(
                "zip_unsupported_compression",
                f"archive member {_short(info.filename)} uses compression method "
                f"{info.compress_type}; only stored and deflated are accepted",
            )
        _check_zip_member_size(info, limits)
        total += info.file_size
        if total > limits.max_zip_total_bytes:
            raise _reject(
                "zip_bomb", f"archive expands beyond {limits.max_zip_total_bytes} bytes in total"
            )
    _check_zip_overlap(infos, size)


def _check_zip_member_size(info: zipfile.ZipInfo, limits: IngestLimits) -> None:
    if info.file_size > limits.max_zip_member_bytes:
        raise _reject(
            "zip_bomb",
            f"archive member {_short(info.filename)} declares {info.file_size} bytes "
            f"(limit {limits.max_zip_member_bytes})",
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > limits.zip_ratio_floor_bytes and ratio > limits.max_zip_member_ratio:
        raise _reject(
            "zip_bomb",
            f"archive member {_short(info.filename)} expands {ratio:.0f}x "
            f"(limit {limits.max_zip_member_ratio:g}x)",
        )


def _check_zip_overlap(infos: list[zipfile.ZipInfo], size: int) -> None:
    """Members must not share bytes: overlapping entries are how quoted-overlap bombs
    (CVE-2024-0450) amplify, and this Python's zipfile predates the upstream fix."""
    previous_end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < previous_end:
            raise _reject("zip_bomb", "archive members overlap (quoted-overlap zip bomb)")
        # 30-byte local header + name: the least a member occupies before its data
        previous_end = info.header_offset + 30 + len(info.orig_filename) + info.compress_size
        if previous_end > size:
            raise _reject("invalid_zip", "an archive member extends beyond the archive")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: IngestLimits) -> bytes:
    """Read one member in chunks, trusting neither its declared size nor its ratio."""
    cap = min(info.file_size, limits.max_zip_member_bytes)
    out = bytearray()
    with archive.open(info) as member:
        while chunk := member.read(1 * MiB):
            out += chunk
            if len(out) > cap:
                raise _reject(
                    "zip_bomb", f"archive member {_short(info.filename)} expands beyond its size"
                )
    return bytes(out)


def iter_zip_members(data: bytes, *, limits: IngestLimits) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, bytes)`` for each regular file in a ZIP upload.

    The central directory is checked first (entry count, symlinks, unsafe names,
    encryption, compression method, declared sizes and ratios, overlapping members),
    then every member is read under the size caps, and only then is the first member
    yielded: an archive is refused as a whole or accepted as a whole, never half
    ingested. Member names are returned as labels only: they are never used as paths.
    Directories and macOS residue (``__MACOSX/``, ``.DS_Store``, ``._*``) are skipped;
    nested archives are not opened (they are just members that are not DICOM).
    """
    yield from _read_zip_members(data, limits)


def _read_zip_members(data: bytes, limits: IngestLimits) -> list[tuple[str, bytes]]:
    declared = _declared_entry_count(data)
    if declared is not None and declared > limits.max_zip_members:
        raise _reject(
            "zip_bomb", f"archive has {declared} entries (limit {limits.max_zip_members})"
        )
    try:
        archive = zipfile.ZipFile(BytesIO(data))
    # NotImplementedError: a central directory asking for a newer zip version (fuzzing)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        ValueError,
        EOFError,
        NotImplementedError,
    ) as exc:
        raise _reject("invalid_zip", f"not a readable ZIP archive: {exc}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_zip_members:
            raise _reject(
                "zip_bomb", f"archive has {len(infos)} entries (limit {limits.max_zip_members})"
            )
        _check_zip_entries(infos, len(data), limits)
        members: list[tuple[str, bytes]] = []
        total = 0
        for info in infos:
            if info.is_dir() or _is_junk(info.filename):
                continue
            try:
                content = _read_member(archive, info, limits)
            except (
                zipfile.BadZipFile,
                zlib.error,
                EOFError,
                ValueError,
                OSError,
                NotImplementedError,
            ) as exc:
                raise _reject(
                    "invalid_zip", f"archive member {_short(info.filename)} is corrupt: {exc}"
                ) from None
            total += len(content)
            if total > limits.max_zip_total_bytes:
                raise _reject("zip_bomb", "archive expands beyond the total size cap")
            members.append((info.filename, content))
    return members


# Exposed for tests and the fuzz harness: the rejection codes this module can raise.
REJECTION_CODES: Final = frozenset(REJECTION_STATUS)

__all__ = [
    "REJECTION_CODES",
    "REJECTION_STATUS",
    "IngestLimits",
    "InspectedInstance",
    "inspect_instance",
    "iter_zip_members",
    "supported_transfer_syntaxes",
]
