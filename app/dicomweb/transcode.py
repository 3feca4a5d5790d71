"""Transfer syntax of WADO-RS instances (PS3.18 §8.7.3.4–8.7.3.5).

The web default is Explicit VR Little Endian: Implicit VR and Big Endian must not be sent, so
instances received that way over C-STORE are re-encoded, and losslessly compressed ones are
decompressed. Data received lossy-compressed is sent as stored unless the client asks for
Explicit VR Little Endian by name (decoding it again gains nothing and multiplies its size).
``transfer-syntax=*`` asks for every instance as stored.
"""

from __future__ import annotations

import io
from typing import Final

import numpy as np
import pydicom
from pydicom.uid import UID

from app.errors import MedcadError

EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"
DEFLATED: Final = "1.2.840.10008.1.2.1.99"
NATIVE: Final = frozenset(
    {EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN, DEFLATED}
)
LOSSY: Final = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
_SWAP_WIDTH: Final = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class NotAcceptable(MedcadError):
    """None of the media types or transfer syntaxes the client accepts can be produced."""

    code = "not_acceptable"
    status = 406


def delivery_syntax(stored: str, requested: str | None) -> str:
    """The transfer syntax an instance is sent in.

    ``requested`` is ``None`` for the default, ``"*"`` for "as stored", or a UID. A UID other
    than the stored one or Explicit VR Little Endian cannot be produced (406).
    """
    if requested == "*" or requested == stored:
        return stored
    if requested is None:
        return stored if stored in LOSSY else EXPLICIT_VR_LITTLE_ENDIAN
    if requested == EXPLICIT_VR_LITTLE_ENDIAN:
        return EXPLICIT_VR_LITTLE_ENDIAN
    raise NotAcceptable(
        detail=f"transfer syntax {requested[:64]} is not available (stored as {stored})"
    )


def stored_syntax(data: bytes) -> str:
    """The Transfer Syntax UID in a Part 10 file's meta information."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=[0x00020010])
    return str(ds.file_meta.TransferSyntaxUID)


def to_explicit_little_endian(data: bytes) -> bytes:
    """Re-encode a stored Part 10 file as Explicit VR Little Endian, keeping its identity.

    Compressed pixel data is decoded (SOP Instance UID kept: a lossless transcoding is the
    same instance, PS3.5 §8.2); Big Endian binary values are byte-swapped.
    """
    ds = pydicom.dcmread(io.BytesIO(data))
    stored = str(ds.file_meta.TransferSyntaxUID)
    if stored == EXPLICIT_VR_LITTLE_ENDIAN:
        return data
    if stored not in NATIVE:
        ds.decompress(generate_instance_uid=False)
    elif stored == EXPLICIT_VR_BIG_ENDIAN:
        _swap_binary_values(ds)
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    buffer = io.BytesIO()
    # dcmwrite (not save_as) allows the Big → Little Endian change; the swap is done above.
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _swap_binary_values(ds: pydicom.Dataset) -> None:
    """Byte-swap top-level OW/OF/OL/OD/OV values read from a Big Endian data set.

    pydicom converts numeric VRs (US, SS, FL, ...) itself; "other" binary VRs are kept as the
    raw bytes that were read, in the source byte order (PS3.5 §7.3).
    """
    for elem in ds:
        width = _SWAP_WIDTH.get(str(elem.VR))
        if str(elem.VR) == "OB or OW" or elem.tag == 0x7FE00010:
            bits = int(ds.get("BitsAllocated", 8) or 8)
            width = 2 if bits == 16 else 4 if bits == 32 else None
        if width and isinstance(elem.value, bytes) and len(elem.value) % width == 0:
            elem.value = np.frombuffer(elem.value, f">u{width}").astype(f"<u{width}").tobytes()
            if elem.tag == 0x7FE00010:
                elem.VR = "OW"


def deliver(data: bytes, target: str) -> bytes:
    """The stored bytes in ``target`` (from :func:`delivery_syntax`)."""
    if target == EXPLICIT_VR_LITTLE_ENDIAN:
        return to_explicit_little_endian(data)
    return data
