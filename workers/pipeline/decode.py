"""Decoding: a DICOM data set → float32 frames in modality units, plus the geometry later
steps need.

Pure function of the data set: pydicom (with the pylibjpeg / pyjpegls / Pillow plugins it
finds) does the codec work; everything else is numpy. Policies:

* Grayscale (MONOCHROME1/2): the Modality LUT or Rescale Slope/Intercept is applied
  (PS3.3 C.11.1), per frame when an enhanced multi-frame object carries a Pixel Value
  Transformation functional group (PS3.3 C.7.6.16.2.9), so CT frames are real HU.
* MONOCHROME1 (PS3.3 C.7.6.3.1.2: minimum value is white) is inverted so that higher is
  always brighter: ``v' = lo + hi - v`` where ``lo, hi`` are the modality values of the
  smallest and largest storable pixel values. Values stay in the same range and units;
  a header window is mirrored the same way.
* Colour is reduced to ITU-R BT.601 luminance ``0.299 R + 0.587 G + 0.114 B``, in the
  stored sample range: for YBR_FULL / YBR_FULL_422 samples that is the Y component as
  decoded (PS3.3 C.7.6.3.1.2 defines Y with exactly these weights, so no round trip
  through clipped RGB); RGB samples, JPEG 2000 YBR_ICT / YBR_RCT (which the decoder
  returns as RGB after its inverse component transform) and PALETTE COLOR (after its
  lookup tables, PS3.3 C.7.9) are weighted.
* Default window: Window Center/Width from the header (or the first frame's Frame VOI
  LUT functional group) for grayscale; otherwise the 0.5th–99.5th percentile range.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.uid import UID

FloatArray = NDArray[np.float32]

DEFAULT_MAX_DECODED_BYTES: Final = 512 * 1024 * 1024
_BT601: Final = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PERCENTILES: Final = (0.5, 99.5)
_PERCENTILE_SAMPLES: Final = 1_000_000
# What pydicom may raise while converting a damaged value on access: optional attributes
# that fail to convert are treated as absent.
_VALUE_ERRORS: Final = (
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    OverflowError,
    NotImplementedError,
    EOFError,
    struct.error,
)


class DecodeError(Exception):
    """A data set whose pixels cannot be decoded; ``code`` is stable, ``detail`` human."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


SpacingSource = Literal["PixelSpacing", "ImagerPixelSpacing"]
Position = tuple[float, float, float]
Orientation = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class DecodedImage:
    """Decoded frames and the metadata the pipeline needs.

    Attributes
    ----------
    frames : float32, shape (F, H, W) = (Number of Frames, Rows, Columns), modality units
        (HU for CT); higher is brighter.
    modality : (0008,0060) Modality, or None.
    photometric_interpretation : as stored in the header (before any conversion).
    colour_policy : "bt601_luma" when colour samples were reduced to luminance, else None.
    units : "HU" for CT after rescale, the Rescale Type if given, else None.
    window : (center, width) in the units of ``frames``.
    window_source : "header" or "percentile".
    pixel_spacing : (row spacing, column spacing) in mm, PS3.3 10.7.1.3, or None.
    pixel_spacing_source : the attribute it came from ("PixelSpacing" also covers the
        Pixel Measures functional group; "ImagerPixelSpacing" is at the detector plane,
        not corrected for magnification).
    image_positions, image_orientations : per frame, PS3.3 C.7.6.2 (None where absent).
    slice_thickness : mm, or None.
    """

    frames: FloatArray
    modality: str | None
    photometric_interpretation: str
    colour_policy: Literal["bt601_luma"] | None
    units: str | None
    window: tuple[float, float]
    window_source: Literal["header", "percentile"]
    pixel_spacing: tuple[float, float] | None
    pixel_spacing_source: SpacingSource | None
    image_positions: tuple[Position | None, ...]
    image_orientations: tuple[Orientation | None, ...]
    slice_thickness: float | None


# --------------------------------------------------------------------------------------
# Attribute access that never raises on malformed values
# --------------------------------------------------------------------------------------


def _floats(
    item: Dataset | None, keyword: str, count: int | None = None
) -> tuple[float, ...] | None:
    """Finite float values of ``keyword`` (exactly ``count`` if given), else None."""
    if item is None:
        return None
    try:
        raw = item.get(keyword)
        if raw is None or raw == "":
            return None
        values = list(raw) if isinstance(raw, Sequence) and not isinstance(raw, str) else [raw]
        floats = tuple(float(v) for v in values)
    except _VALUE_ERRORS:
        return None
    if not floats or (count is not None and len(floats) != count):
        return None
    return floats if all(np.isfinite(floats)) else None


def _text(item: Dataset | None, keyword: str) -> str | None:
    if item is None:
        return None
    try:
        value = item.get(keyword)
    except _VALUE_ERRORS:
        return None
    text = str(value).strip() if value is not None else ""
    return text or None


def _present(ds: Dataset, keyword: str) -> bool:
    try:
        return bool(ds.get(keyword))
    except _VALUE_ERRORS:
        return False


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else default
    except _VALUE_ERRORS:
        return default


def _macro(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """First item of a functional group macro for ``frame`` (PS3.3 C.7.6.16).

    Per-frame values take precedence over shared ones, as the standard requires that a
    macro appear in one or the other.
    """
    for groups_keyword, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        try:
            groups = ds.get(groups_keyword)
            if groups is None or len(groups) <= index:
                continue
            macro = groups[index].get(sequence)
            if macro:
                first: Dataset = macro[0]
                return first
        except _VALUE_ERRORS:
            continue
    return None


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int


def _geometry(ds: Dataset, max_decoded_bytes: int) -> _Geometry:
    geometry = _Geometry(
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        frames=_int(ds, "NumberOfFrames", 1),
        samples=_int(ds, "SamplesPerPixel", 1),
        bits_allocated=_int(ds, "BitsAllocated", 0),
    )
    if min(geometry.rows, geometry.columns, geometry.frames, geometry.bits_allocated) < 1:
        raise DecodeError(
            "invalid_pixel_module",
            f"Rows {geometry.rows}, Columns {geometry.columns}, Number of Frames "
            f"{geometry.frames}, Bits Allocated {geometry.bits_allocated} must all be positive",
        )
    if geometry.samples not in (1, 3):
        raise DecodeError("invalid_pixel_module", f"Samples per Pixel {geometry.samples}")
    decoded = (
        geometry.rows
        * geometry.columns
        * geometry.frames
        * geometry.samples
        * max(1, geometry.bits_allocated // 8)
    )
    if decoded > max_decoded_bytes:
        raise DecodeError(
            "decoded_size_over_budget",
            f"{decoded} decoded bytes exceed the budget of {max_decoded_bytes}",
        )
    return geometry


def _decode_array(ds: Dataset) -> tuple[NDArray[Any], str]:
    """Decoded pixels as pydicom returns them, and their photometric interpretation."""
    if "PixelData" not in ds:
        raise DecodeError("no_pixel_data", "the data set has no (7FE0,0010) Pixel Data")
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not ts:
        raise DecodeError("missing_transfer_syntax", "the File Meta has no Transfer Syntax UID")
    try:
        decoder = get_decoder(UID(ts))
    except NotImplementedError:
        raise DecodeError(
            "unsupported_transfer_syntax", f"no decoder for Transfer Syntax {ts}"
        ) from None
    if not decoder.is_available:
        raise DecodeError(
            "unsupported_transfer_syntax", f"no installed plugin decodes {UID(ts).name}"
        )
    array, properties = _as_array(decoder, ds)
    photometric = str(properties.get("photometric_interpretation", ""))
    return array, photometric


def _as_array(decoder: Any, ds: Dataset) -> tuple[NDArray[Any], dict[str, Any]]:
    """Decode with each available plugin in turn; the first that succeeds wins.

    pydicom tries plugins itself, but only catches ``Exception``: the Rust-based plugins
    (pylibjpeg-rle, pylibjpeg-openjpeg) report corrupt input with a ``PanicException``
    that derives from ``BaseException``. Anything a codec raises, panics included, is a
    decode failure of this data set, not of the worker. ``raw=True`` keeps YBR samples
    as decoded; luminance is their Y component (module docstring).
    """
    plugins: tuple[str, ...] = tuple(decoder.available_plugins) or ("",)
    failures: list[str] = []
    for plugin in plugins:
        try:
            result: tuple[NDArray[Any], dict[str, Any]] = decoder.as_array(
                ds, raw=True, decoding_plugin=plugin
            )
            return result
        except MemoryError:
            raise DecodeError("decode_failed", "out of memory while decoding") from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # codec panics derive from BaseException
            failures.append(f"{plugin or 'native'}: {type(exc).__name__}: {str(exc)[:160]}")
    raise DecodeError("decode_failed", "; ".join(failures))


def _to_stack(array: NDArray[Any], geometry: _Geometry) -> NDArray[Any]:
    """Reshape to (F, H, W) or (F, H, W, 3), checking the declared geometry."""
    shape: tuple[int, ...] = (geometry.frames, geometry.rows, geometry.columns)
    if geometry.samples == 3:
        shape = (*shape, 3)
    if array.size != int(np.prod(shape)):
        raise DecodeError(
            "shape_mismatch",
            f"decoded {array.shape}, header says frames x rows x columns x samples = {shape}",
        )
    return array.reshape(shape)


def _luminance(rgb: NDArray[Any]) -> FloatArray:
    """ITU-R BT.601 luma of (..., 3) RGB samples, float32."""
    return np.tensordot(rgb.astype(np.float32, copy=False), _BT601, axes=([-1], [0])).astype(
        np.float32, copy=False
    )


def _colour_to_luminance(
    stack: NDArray[Any], ds: Dataset, stored_photometric: str, photometric: str
) -> FloatArray:
    if stored_photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(stack, ds)
        except _VALUE_ERRORS as exc:
            raise DecodeError("invalid_palette", f"palette lookup failed: {exc}") from None
        return _luminance(rgb)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        return np.ascontiguousarray(stack[..., 0], dtype=np.float32)
    if photometric == "RGB":
        return _luminance(stack)
    raise DecodeError(
        "unsupported_photometric",
        f"decoded colour samples are {photometric or 'unknown'}; expected RGB or YBR_FULL",
    )


def _rescale_per_frame(ds: Dataset, frames: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(slopes, intercepts), each (F,), from per-frame/shared groups or the top level."""
    slopes = np.ones(frames, dtype=np.float64)
    intercepts = np.zeros(frames, dtype=np.float64)
    top_slope = _floats(ds, "RescaleSlope", 1)
    top_intercept = _floats(ds, "RescaleIntercept", 1)
    for f in range(frames):
        macro = _macro(ds, f, "PixelValueTransformationSequence")
        slope = _floats(macro, "RescaleSlope", 1) or top_slope
        intercept = _floats(macro, "RescaleIntercept", 1) or top_intercept
        if slope is not None and intercept is not None:
            slopes[f], intercepts[f] = slope[0], intercept[0]
    return slopes, intercepts


def _stored_range(ds: Dataset) -> tuple[int, int]:
    """Smallest and largest storable pixel value (Bits Stored, Pixel Representation)."""
    bits = _int(ds, "BitsStored", _int(ds, "BitsAllocated", 16))
    if _int(ds, "PixelRepresentation", 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _grayscale(
    stack: NDArray[Any], ds: Dataset, geometry: _Geometry
) -> tuple[FloatArray, NDArray[np.float64], NDArray[np.float64]]:
    """Modality values (F, H, W) float32 and, per frame, the modality range (lo, hi)."""
    smin, smax = _stored_range(ds)
    if _present(ds, "ModalityLUTSequence"):
        try:
            values = apply_modality_lut(stack, ds).astype(np.float32)
            ends = apply_modality_lut(np.array([smin, smax]), ds).astype(np.float64)
        except _VALUE_ERRORS as exc:
            raise DecodeError("invalid_modality_lut", f"Modality LUT failed: {exc}") from None
        lo = np.full(geometry.frames, ends.min())
        hi = np.full(geometry.frames, ends.max())
        return values, lo, hi
    slopes, intercepts = _rescale_per_frame(ds, geometry.frames)
    values = stack.astype(np.float32)
    # overflow shows up as non-finite values, refused by the caller
    with np.errstate(over="ignore", invalid="ignore"):
        if np.any(slopes != 1.0) or np.any(intercepts != 0.0):
            # float32 result: exact for 16-bit stored values and integer coefficients
            values *= slopes.astype(np.float32)[:, None, None]
            values += intercepts.astype(np.float32)[:, None, None]
        a, b = slopes * smin + intercepts, slopes * smax + intercepts
    return values, np.minimum(a, b), np.maximum(a, b)


def _units(ds: Dataset, modality: str | None) -> str | None:
    rescale_type = _text(_macro(ds, 0, "PixelValueTransformationSequence"), "RescaleType")
    rescale_type = rescale_type or _text(ds, "RescaleType")
    if modality == "CT" and rescale_type in (None, "HU"):
        return "HU"
    return rescale_type


def _header_window(ds: Dataset) -> tuple[float, float] | None:
    for item in (_macro(ds, 0, "FrameVOILUTSequence"), ds):
        centers, widths = _floats(item, "WindowCenter"), _floats(item, "WindowWidth")
        if centers and widths and widths[0] > 0:
            return centers[0], widths[0]
    return None


def _percentile_window(frames: FloatArray) -> tuple[float, float]:
    flat = frames.reshape(-1)
    step = max(1, flat.size // _PERCENTILE_SAMPLES)
    low, high = np.percentile(flat[::step], _PERCENTILES)
    return float((low + high) / 2.0), float(max(high - low, 1.0))


def _positions(ds: Dataset, frames: int) -> tuple[Position | None, ...]:
    top = _floats(ds, "ImagePositionPatient", 3)
    out: list[Position | None] = []
    for f in range(frames):
        value = _floats(_macro(ds, f, "PlanePositionSequence"), "ImagePositionPatient", 3)
        value = value or (top if frames == 1 else None)
        out.append((value[0], value[1], value[2]) if value else None)
    return tuple(out)


def _orientations(ds: Dataset, frames: int) -> tuple[Orientation | None, ...]:
    top = _floats(ds, "ImageOrientationPatient", 6)
    out: list[Orientation | None] = []
    for f in range(frames):
        value = _floats(_macro(ds, f, "PlaneOrientationSequence"), "ImageOrientationPatient", 6)
        value = value or top
        out.append((value[0], value[1], value[2], value[3], value[4], value[5]) if value else None)
    return tuple(out)


def _spacing(ds: Dataset) -> tuple[tuple[float, float] | None, SpacingSource | None]:
    candidates: list[tuple[tuple[float, ...] | None, SpacingSource]] = [
        (_floats(_macro(ds, 0, "PixelMeasuresSequence"), "PixelSpacing", 2), "PixelSpacing"),
        (_floats(ds, "PixelSpacing", 2), "PixelSpacing"),
        (_floats(ds, "ImagerPixelSpacing", 2), "ImagerPixelSpacing"),
    ]
    for value, source in candidates:
        if value is not None and value[0] > 0 and value[1] > 0:
            return (value[0], value[1]), source
    return None, None


def _thickness(ds: Dataset) -> float | None:
    value = _floats(_macro(ds, 0, "PixelMeasuresSequence"), "SliceThickness", 1)
    value = value or _floats(ds, "SliceThickness", 1)
    return value[0] if value and value[0] > 0 else None


def decode_frames(
    ds: Dataset, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> DecodedImage:
    """Decode every frame of ``ds`` to float32 modality values.

    Parameters
    ----------
    ds : a data set read with its pixel data and File Meta (``pydicom.dcmread``).
    max_decoded_bytes : refuse before decoding when rows × columns × frames × samples ×
        bytes per sample exceeds this (the ingest budget, applied again in the worker).

    Returns
    -------
    DecodedImage whose ``frames`` are float32 (F, H, W), finite, higher = brighter (see
    the module docstring for the colour, MONOCHROME1 and window policies).

    Raises
    ------
    DecodeError with a specific code: ``no_pixel_data``, ``missing_transfer_syntax``,
    ``unsupported_transfer_syntax``, ``invalid_pixel_module``, ``decoded_size_over_budget``,
    ``decode_failed``, ``shape_mismatch``, ``unsupported_photometric``, ``invalid_palette``,
    ``invalid_modality_lut``, ``non_finite_pixels``.
    """
    geometry = _geometry(ds, max_decoded_bytes)
    stored_photometric = _text(ds, "PhotometricInterpretation") or ""
    array, photometric = _decode_array(ds)
    stack = _to_stack(array, geometry)
    modality = _text(ds, "Modality")
    colour_policy: Literal["bt601_luma"] | None = None
    window: tuple[float, float] | None = None
    units: str | None = None
    if geometry.samples == 3 or stored_photometric == "PALETTE COLOR":
        frames = _colour_to_luminance(stack, ds, stored_photometric, photometric)
        colour_policy = "bt601_luma"
    elif stored_photometric in ("MONOCHROME1", "MONOCHROME2"):
        frames, lo, hi = _grayscale(stack, ds, geometry)
        units = _units(ds, modality)
        window = _header_window(ds)
        if stored_photometric == "MONOCHROME1":
            # v' = lo + hi - v keeps the range; mirror the window centre the same way
            with np.errstate(over="ignore", invalid="ignore"):
                frames = (lo + hi).astype(np.float32)[:, None, None] - frames
            if window is not None:
                window = (float(lo[0] + hi[0] - window[0]), window[1])
    else:
        raise DecodeError(
            "unsupported_photometric",
            f"Photometric Interpretation {stored_photometric!r} is not supported",
        )
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    if not np.isfinite(frames).all():
        raise DecodeError("non_finite_pixels", "the modality transform produced non-finite values")
    window_source: Literal["header", "percentile"] = "header"
    if window is None:
        window, window_source = _percentile_window(frames), "percentile"
    spacing, spacing_source = _spacing(ds)
    return DecodedImage(
        frames=frames,
        modality=modality,
        photometric_interpretation=stored_photometric,
        colour_policy=colour_policy,
        units=units,
        window=window,
        window_source=window_source,
        pixel_spacing=spacing,
        pixel_spacing_source=spacing_source,
        image_positions=_positions(ds, geometry.frames),
        image_orientations=_orientations(ds, geometry.frames),
        slice_thickness=_thickness(ds),
    )
