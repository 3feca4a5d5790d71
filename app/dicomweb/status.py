"""DICOM status codes for ingest outcomes, shared by STOW-RS and the C-STORE SCP.

STOW-RS Failure Reason values (PS3.18 Annex I, Table I.2-2) reuse the C-STORE status codes
(PS3.4 B.2.3), so one table serves both: the ingest service rejects a file with a stable snake
case code, and this module names the DICOM status a peer understands.
"""

from __future__ import annotations

from typing import Final

SUCCESS: Final = 0x0000
PROCESSING_FAILURE: Final = 0x0110  # PS3.7 C.4: general failure, also Study UID mismatch (§10.5)
DUPLICATE_SOP_INSTANCE: Final = 0x0111  # PS3.7 C.4: same SOP Instance UID, different content
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
OUT_OF_RESOURCES: Final = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
CANNOT_UNDERSTAND: Final = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED: Final = 0xC122

# Warning Reason values (PS3.18 Table I.2-1 = C-STORE warnings, PS3.4 B.2.3).
COERCION_OF_DATA_ELEMENTS: Final = 0xB000
ELEMENTS_DISCARDED: Final = 0xB006
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: Final = 0xB007

_BY_CODE: Final[dict[str, int]] = {
    # not DICOM, or not parseable: the peer sent something we cannot understand
    "not_dicom": CANNOT_UNDERSTAND,
    "invalid_file_meta": CANNOT_UNDERSTAND,
    "truncated": CANNOT_UNDERSTAND,
    "malformed": CANNOT_UNDERSTAND,
    "bad_part": CANNOT_UNDERSTAND,
    "missing_uid": CANNOT_UNDERSTAND,
    "invalid_uid": CANNOT_UNDERSTAND,
    "pixel_length_mismatch": CANNOT_UNDERSTAND,
    "encapsulation_mismatch": CANNOT_UNDERSTAND,
    "invalid_fragments": CANNOT_UNDERSTAND,
    "invalid_offset_table": CANNOT_UNDERSTAND,
    "codec_header_mismatch": CANNOT_UNDERSTAND,
    # well-formed, but not an object this service analyses
    "unsupported_sop_class": SOP_CLASS_NOT_SUPPORTED,
    "non_image_sop_class": SOP_CLASS_NOT_SUPPORTED,
    "unsupported_transfer_syntax": TRANSFER_SYNTAX_NOT_SUPPORTED,
    # the data set does not fit its own SOP class (image without a usable Image Pixel Module)
    "no_pixel_data": DATASET_DOES_NOT_MATCH_SOP_CLASS,
    "invalid_pixel_module": DATASET_DOES_NOT_MATCH_SOP_CLASS,
    "unsupported_photometric": DATASET_DOES_NOT_MATCH_SOP_CLASS,
    "absurd_geometry": DATASET_DOES_NOT_MATCH_SOP_CLASS,
    # over a budget: refused, out of resources
    "dataset_too_complex": OUT_OF_RESOURCES,
    "decoded_size_over_budget": OUT_OF_RESOURCES,
    "codec_bomb": OUT_OF_RESOURCES,
    "deflate_bomb": OUT_OF_RESOURCES,
    "insufficient_storage": OUT_OF_RESOURCES,
    "conflict": DUPLICATE_SOP_INSTANCE,
    "study_uid_mismatch": PROCESSING_FAILURE,
}

# Failures that mean "the request itself is malformed" (STOW-RS 400 when nothing is stored).
SYNTAX_FAILURES: Final = frozenset({CANNOT_UNDERSTAND})


def failure_status(code: str | None) -> int:
    """The DICOM failure status for an ingest rejection code (0x0110 when unknown)."""
    return _BY_CODE.get(code or "", PROCESSING_FAILURE)
