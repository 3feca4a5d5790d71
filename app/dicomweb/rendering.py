"""Rendered WADO-RS representations (PS3.18 §8.3.5, §10.4.1.1.3): one frame as JPEG or PNG.

Consumer-ready images, not diagnostic data: the Modality LUT and a VOI window are applied
(PS3.3 C.11.1, C.11.2), MONOCHROME1 is inverted, colour stays colour. Result objects render too:
a Segmentation frame as its segment mask (PS3.3 C.8.20.2: BINARY 0/1, FRACTIONAL
0..MaximumFractionalValue) and a Parametric Map frame over its real-world value range.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Final

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array

from app.dicomweb.dicom_json import PIXEL_TAGS
from app.dicomweb.transcode import NotAcceptable
from app.errors import BadRequest, NotFound

SEG_SOP_CLASS: Final = "1.2.840.10008.5.1.4.1.1.66.4"
PMAP_SOP_CLASS: Final = "1.2.840.10008.5.1.4.1.1.30"
RENDERED_TYPES: Final = ("image/jpeg", "image/png")


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center, width and LINEAR or SIGMOID."""

    center: float
    width: float
    function: str = "LINEAR"


def parse_window(value: str | None) -> Window | None:
    """The ``window=center,width[,function]`` query parameter (PS3.18 §8.3.5.1.4)."""
    if value is None or value == "":
        return None
    parts = [p.strip() for p in value.split(",")]
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError) as exc:
        raise BadRequest("invalid_window", f"window must be center,width: {value[:40]!r}") from exc
    function = parts[2].upper() if len(parts) > 2 and parts[2] else "LINEAR"
    if width <= 0 or function not in ("LINEAR", "SIGMOID"):
        raise BadRequest("invalid_window", f"window width must be > 0: {value[:40]!r}")
    return Window(center, width, function)


def choose_media_type(accept: str | None) -> str:
    """JPEG (the default, PS3.18 §8.7.4) or PNG, by the Accept header; 406 otherwise."""
    if not accept:
        return "image/jpeg"
    ranked: list[tuple[float, int, str]] = []
    for index, entry in enumerate(accept.split(",")):
        media, _, params = entry.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, val = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(val)
                except ValueError:
                    quality = 0.0
        ranked.append((-quality, index, media.strip().lower()))
    for neg_quality, _, media in sorted(ranked):
        if neg_quality >= 0:
            continue
        if media in RENDERED_TYPES:
            return media
        if media in ("*/*", "image/*"):
            return "image/jpeg"
    raise NotAcceptable(
        detail=f"rendered media types are image/jpeg and image/png, not {accept[:80]!r}"
    )


def _apply_window(values: NDArray[np.float64], window: Window) -> NDArray[np.uint8]:
    """PS3.3 C.11.2.1.2: LINEAR maps [c - w/2, c + w/2] to the output range; SIGMOID too."""
    if window.function == "SIGMOID":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - window.center) / window.width))
    else:
        out = ((values - (window.center - 0.5)) / (window.width - 1 or 1) + 0.5) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def _default_window(ds: pydicom.Dataset, values: NDArray[np.float64]) -> Window:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if w > 0:
            return Window(c, w)
    except (TypeError, ValueError):
        pass
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return Window((lo + hi) / 2, max(hi - lo, 1.0))


def _frame(ds: pydicom.Dataset, data: bytes, frame: int) -> NDArray[np.generic]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < frames:
        raise NotFound(detail=f"frame {frame + 1} out of range 1..{frames}")
    try:
        return pixel_array(io.BytesIO(data), index=frame if frames > 1 else None)
    except Exception as exc:  # a codec failure is the stored object's problem, not a 500
        raise BadRequest(
            "undecodable", f"the instance cannot be decoded: {type(exc).__name__}", status=422
        ) from exc


def _grey_or_colour(
    ds: pydicom.Dataset, pixels: NDArray[np.generic], window: Window | None
) -> Image.Image:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == SEG_SOP_CLASS:
        maximum = 1.0
        if str(ds.get("SegmentationType", "")) == "FRACTIONAL":
            maximum = float(ds.get("MaximumFractionalValue", 255) or 255)
        scaled = np.clip(pixels.astype(np.float64) / maximum, 0, 1) * 255.0
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    if pixels.ndim == 3:  # colour (pydicom returns RGB for YBR data)
        return Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    if sop_class == PMAP_SOP_CLASS:
        values = pixels.astype(np.float64)  # identity real-world value mapping in medcad's maps
    else:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    grey = _apply_window(values, window or _default_window(ds, values))
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, mode="L")


def render_frame(data: bytes, *, frame: int, media_type: str, window: Window | None) -> bytes:
    """Frame ``frame`` (0-based) of a stored instance as ``media_type`` bytes."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if not any(tag in ds for tag in PIXEL_TAGS):
        raise NotAcceptable(
            detail=f"SOP class {ds.get('SOPClassUID', '?')} has no rendered representation"
        )
    image = _grey_or_colour(ds, _frame(ds, data, frame), window)
    buffer = io.BytesIO()
    if media_type == "image/png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
