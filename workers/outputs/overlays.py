"""PNG renderings of images, masks and saliency maps for the API and the browser page.

Pure builders: arrays in, PNG bytes out (Pillow). The rules that make a saliency overlay
honest (see the saliency notes in the project's reference material):

* one fixed, model-specific scale ``[vmin, vmax]`` from the manifest — never per-image
  min-max, which would make every map look equally confident;
* transparent at or below ``vmin`` so anatomy stays readable, opacity rising with the value;
* a perceptually ordered colormap (viridis / inferno, ``colormaps.py``), never jet;
* a legend (colour bar with the scale and its units) in every downloadable composite;
* greyed out when the prediction it explains is negative (``suppressed``), so a negative
  case never shows a confident-looking map.

Arrays are row-major (H, W) = (Rows, Columns) of the frame they belong to (PS3.3 C.7.6.3.1).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from typing import Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from workers.outputs.colormaps import LUT_SIZE, get_colormap

RGB = tuple[int, int, int]

_BACKGROUND: Final = (17, 17, 17)
_TEXT: Final = (235, 235, 235)
_MIN_COMPOSITE_HEIGHT: Final = 256


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# PNG colour type (PS: ISO/IEC 15948 §6.1) by samples per pixel: grey, RGB, RGBA.
_PNG_COLOUR_TYPES: Final = {1: 0, 3: 2, 4: 6}
_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_array(pixels: NDArray[np.uint8]) -> bytes:
    """8-bit PNG of a (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 array.

    The per-frame overlays and label maps are written on every job, for every frame, so their
    encoder is the outputs stage's hot loop. Pillow's encoder tries all five PNG row filters on
    every row and deflates at level 6; on 512 x 512 RGBA saliency overlays that cost 15-80 ms
    per image. Rows here are stored unfiltered (filter type 0) and deflated at level 1: 4-8 ms,
    files within about 1.3x of Pillow's size, and the decoded pixels are the same.
    """
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"pixels must be uint8 (H, W[, C]), got {arr.dtype} {arr.shape}")
    height, width = arr.shape[:2]
    samples = 1 if arr.ndim == 2 else int(arr.shape[2])
    if samples not in _PNG_COLOUR_TYPES:
        raise ValueError(f"pixels need 1, 3 or 4 samples per pixel, got {samples}")
    raw = np.zeros((height, 1 + width * samples), dtype=np.uint8)  # column 0: filter type 0
    raw[:, 1:] = arr.reshape(height, width * samples)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPES[samples], 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))
        + _png_chunk(b"IEND", b"")
    )


def _grey_u8(image01: NDArray[np.floating]) -> NDArray[np.uint8]:
    """(H, W) float in [0, 1] (clipped; NaN -> 0) to uint8 grey levels."""
    img = np.asarray(image01, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image must be (H, W), got shape {img.shape}")
    img = np.nan_to_num(img, nan=0.0)
    out: NDArray[np.uint8] = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def _check_range(vmin: float, vmax: float) -> None:
    if not (np.isfinite(vmin) and np.isfinite(vmax) and vmax > vmin):
        raise ValueError(f"display range must be finite with vmax > vmin, got ({vmin}, {vmax})")


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ValueError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _format_value(value: float) -> str:
    return f"{value:.3g}"


def render_image(image01: NDArray[np.floating]) -> bytes:
    """8-bit greyscale PNG of a windowed image.

    Parameters
    ----------
    image01 : float, shape (H, W), display values in [0, 1] (after the VOI window,
        PS3.3 C.11.2; 0 = black). Values outside are clipped.

    Returns
    -------
    PNG bytes, mode "L", W x H.
    """
    return _png_array(_grey_u8(image01))


def render_label_png(labels: NDArray[np.integer]) -> bytes:
    """Lossless label map: 8-bit greyscale PNG whose pixel value is the label value.

    Parameters
    ----------
    labels : integer, shape (H, W), values 0..255 (0 = background).

    Returns
    -------
    PNG bytes, mode "L".
    """
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"label values must be within 0..255, got {arr.min()}..{arr.max()}")
    return _png_array(np.ascontiguousarray(arr, dtype=np.uint8))


def render_mask_overlay(
    image01: NDArray[np.floating],
    labels: NDArray[np.integer],
    colors: dict[int, RGB],
    alpha: float = 0.4,
    *,
    outline: bool = True,
) -> bytes:
    """RGB PNG of the grey image with labelled structures tinted and outlined.

    Parameters
    ----------
    image01 : float, shape (H, W), display values in [0, 1].
    labels : integer, shape (H, W); pixels whose value is a key of ``colors`` are drawn.
    colors : label value -> (r, g, b) 0..255 (the manifest's label colours).
    alpha : tint opacity inside structures, 0..1.
    outline : draw each structure's one-pixel inner border opaque, so small structures stay
        visible at low ``alpha``.

    Returns
    -------
    PNG bytes, mode "RGB".
    """
    grey = _grey_u8(image01)
    lab = np.asarray(labels)
    if lab.shape != grey.shape:
        raise ValueError(f"labels shape {lab.shape} does not match image {grey.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    out = np.repeat(grey[..., None], 3, axis=2).astype(np.float64)
    for value, color in colors.items():
        region = lab == value
        if not region.any():
            continue
        rgb = np.asarray(color, dtype=np.float64)
        out[region] = (1.0 - alpha) * out[region] + alpha * rgb
        if outline:
            border = region & ~_erode(region)
            out[border] = rgb
    return _png_array(np.rint(out).astype(np.uint8))


def _erode(region: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """4-neighbour binary erosion (pixels outside the image count as background)."""
    padded = np.pad(region, 1, constant_values=False)
    core: NDArray[np.bool_] = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    return core


def saliency_rgba(
    m: NDArray[np.floating],
    *,
    vmin: float,
    vmax: float,
    colormap: str = "inferno",
    alpha_max: float = 0.6,
    suppressed: bool = False,
) -> NDArray[np.uint8]:
    """Colour and opacity of a saliency map on a fixed scale.

    Parameters
    ----------
    m : float, shape (H, W), the map in its own units (e.g. CAM logit contribution).
    vmin, vmax : the model's fixed display range; values are scaled to t = (m - vmin) /
        (vmax - vmin) clipped to [0, 1].
    colormap : ``"inferno"`` or ``"viridis"``.
    alpha_max : opacity at and above ``vmax``; opacity is ``alpha_max * t``, so pixels at or
        below ``vmin`` (and NaN) are fully transparent.
    suppressed : render in grey (the colour's luminance) at half opacity — for maps that
        explain a negative prediction.

    Returns
    -------
    uint8, shape (H, W, 4), straight (non-premultiplied) RGBA.
    """
    _check_range(vmin, vmax)
    if not 0.0 <= alpha_max <= 1.0:
        raise ValueError(f"alpha_max must be within [0, 1], got {alpha_max}")
    sal = np.asarray(m)
    if sal.ndim != 2:
        raise ValueError(f"map must be (H, W), got shape {sal.shape}")
    # t = clip(nan_to_num((m - vmin) / (vmax - vmin)), 0, 1) in float64, computed in place: this
    # runs on every overlay of every job, and each temporary is a full-frame float64 array.
    t = np.subtract(sal, vmin, dtype=np.float64)
    t /= vmax - vmin
    np.nan_to_num(t, copy=False, nan=0.0)
    np.clip(t, 0.0, 1.0, out=t)
    scratch = np.multiply(t, LUT_SIZE - 1)
    # Colour by table lookup on packed RGBA words (one gather instead of three channel copies
    # and a concatenation); the grey of a suppressed map is a per-entry table too. Same values
    # as colouring each pixel, since a pixel's colour depends only on its table index.
    words = _packed_lut(colormap, suppressed)[np.rint(scratch, out=scratch).astype(np.intp)]
    np.multiply(t, alpha_max, out=scratch)  # opacity alpha_max * t, halved if suppressed
    if suppressed:
        scratch *= 0.5
    scratch *= 255.0
    words |= np.rint(scratch, out=scratch).astype("<u4") << 24
    out: NDArray[np.uint8] = np.ascontiguousarray(words).view(np.uint8).reshape(*sal.shape, 4)
    return out


@functools.cache
def _packed_lut(colormap: str, suppressed: bool) -> NDArray[np.uint32]:
    """The colormap as little-endian RGBA words with alpha 0; in grey (luminance) if suppressed."""
    rgb = get_colormap(colormap)
    if suppressed:
        luminance = rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])
        rgb = np.repeat(np.rint(luminance).astype(np.uint8)[:, None], 3, axis=1)
    rgba = np.zeros((LUT_SIZE, 4), dtype=np.uint8)
    rgba[:, :3] = rgb
    words: NDArray[np.uint32] = rgba.view("<u4").reshape(LUT_SIZE).copy()
    words.setflags(write=False)
    return words


def render_saliency_overlay(
    m: NDArray[np.floating],
    *,
    vmin: float,
    vmax: float,
    colormap: str = "inferno",
    alpha_max: float = 0.6,
    suppressed: bool = False,
) -> bytes:
    """Transparent RGBA PNG of a saliency map, to lay over the image in a viewer.

    Parameters are those of ``saliency_rgba``; the map should already be in the frame's
    geometry (see ``workers.pipeline.saliency.upsample_bilinear``).

    Returns
    -------
    PNG bytes, mode "RGBA", same W x H as the map.
    """
    rgba = saliency_rgba(
        m, vmin=vmin, vmax=vmax, colormap=colormap, alpha_max=alpha_max, suppressed=suppressed
    )
    return _png_array(rgba)


def _colorbar_image(
    vmin: float,
    vmax: float,
    colormap: str,
    label: str,
    *,
    height: int,
    suppressed: bool = False,
) -> Image.Image:
    """Vertical colour bar (high values on top) with tick values and a label."""
    _check_range(vmin, vmax)
    lut = get_colormap(colormap)
    font_size = max(10, min(16, height // 20))
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ticks = [vmax, (vmin + vmax) / 2.0, vmin]
    tick_text = [_format_value(v) for v in ticks]
    text_w = max(int(probe.textlength(t, font=font)) for t in tick_text)
    label_w = int(probe.textlength(label, font=font)) if label else 0
    pad, bar_w = 6, 16
    top = pad + (font_size + pad if label else 0)
    bar_h = max(16, height - top - pad)
    width = max(pad + bar_w + 4 + text_w + pad, label_w + 2 * pad)
    img = Image.new("RGB", (width, top + bar_h + pad), _BACKGROUND)
    values = np.linspace(1.0, 0.0, bar_h)
    colours = lut[np.rint(values * 255).astype(np.intp)]
    if suppressed:
        grey = np.rint(colours.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722]))
        colours = np.repeat(grey.astype(np.uint8)[:, None], 3, axis=1)
    bar = np.repeat(colours[:, None, :], bar_w, axis=1)
    img.paste(Image.fromarray(np.ascontiguousarray(bar), mode="RGB"), (pad, top))
    draw = ImageDraw.Draw(img)
    if label:
        draw.text((pad, pad), label, fill=_TEXT, font=font)
    for frac, text in zip((0.0, 0.5, 1.0), tick_text, strict=True):
        y = top + round(frac * (bar_h - 1))
        draw.line([(pad + bar_w, y), (pad + bar_w + 3, y)], fill=_TEXT)
        ty = min(max(y - font_size // 2, 0), img.height - font_size)
        draw.text((pad + bar_w + 5, ty), text, fill=_TEXT, font=font)
    return img


def render_colorbar(
    vmin: float, vmax: float, colormap: str = "inferno", label: str = "", *, height: int = 256
) -> bytes:
    """Legend for a saliency overlay: vertical colour bar with the fixed scale.

    Parameters
    ----------
    vmin, vmax : the display range (bottom and top of the bar).
    colormap : ``"inferno"`` or ``"viridis"``.
    label : what the values are, with units (e.g. ``"CAM (logit)"``); drawn above the bar.
    height : image height in pixels.

    Returns
    -------
    PNG bytes, mode "RGB", dark background.
    """
    return _png(_colorbar_image(vmin, vmax, colormap, label, height=height))


def render_saliency_composite(
    image01: NDArray[np.floating],
    m: NDArray[np.floating],
    *,
    vmin: float,
    vmax: float,
    colormap: str = "inferno",
    alpha_max: float = 0.6,
    suppressed: bool = False,
    label: str = "",
    caption: str = "",
) -> bytes:
    """Self-contained download: image, heat overlay, colour bar legend and a caption.

    Parameters
    ----------
    image01 : float, shape (H, W), display values in [0, 1].
    m : float, shape (H, W), the saliency map in the image's geometry.
    vmin, vmax, colormap, alpha_max, suppressed : see ``saliency_rgba``.
    label : colour bar label with units.
    caption : one line drawn above the image, e.g. ``"nodule p=0.93 · CAM · classifier 1.0.0"``
        (always show the probability beside a map).

    Returns
    -------
    PNG bytes, mode "RGB". Images shorter than 256 rows are enlarged by an integer factor
    with nearest-neighbour sampling (no invented detail) so the legend stays legible.
    """
    grey = _grey_u8(image01)
    sal = np.asarray(m, dtype=np.float64)
    if sal.shape != grey.shape:
        raise ValueError(f"map shape {sal.shape} does not match image {grey.shape}")
    rgba = saliency_rgba(
        sal, vmin=vmin, vmax=vmax, colormap=colormap, alpha_max=alpha_max, suppressed=suppressed
    ).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    blended = (1.0 - alpha) * grey[..., None].astype(np.float64) + alpha * rgba[..., :3]
    base = Image.fromarray(np.rint(blended).astype(np.uint8), mode="RGB")
    factor = max(1, -(-_MIN_COMPOSITE_HEIGHT // base.height))
    if factor > 1:
        base = base.resize((base.width * factor, base.height * factor), Image.Resampling.NEAREST)
    bar = _colorbar_image(vmin, vmax, colormap, label, height=base.height, suppressed=suppressed)
    font_size = 14
    caption_h = font_size + 10 if caption else 0
    canvas = Image.new(
        "RGB", (base.width + bar.width, caption_h + max(base.height, bar.height)), _BACKGROUND
    )
    canvas.paste(base, (0, caption_h))
    canvas.paste(bar, (base.width, caption_h))
    if caption:
        ImageDraw.Draw(canvas).text((6, 5), caption, fill=_TEXT, font=_font(font_size))
    return _png(canvas)


def render_label_overlay(
    labels: NDArray[np.integer], colors: dict[int, RGB], alpha: float = 0.5
) -> bytes:
    """Transparent RGBA PNG of labelled structures, to lay over the image in a viewer.

    Parameters
    ----------
    labels : integer, shape (H, W); pixels whose value is a key of ``colors`` are drawn.
    colors : label value -> (r, g, b) 0..255 (the manifest's label colours).
    alpha : opacity inside structures, 0..1; each structure's one-pixel inner border is opaque
        so small structures (a 3 mm nodule) stay visible.

    Returns
    -------
    PNG bytes, mode "RGBA", fully transparent where no label is drawn.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {lab.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    if lab.size == 0 or lab.min() < 0 or any(v < 0 for v in colors):
        return _png_array(_label_rgba_by_region(lab, colors, alpha))
    # One table lookup colours every label at once (RGBA packed in a little-endian word); a
    # drawn pixel is on its structure's inner border when a 4-neighbour holds another value
    # or lies outside the image, which is what eroding each label's region finds.
    size = max(int(lab.max()), *colors, 0) + 1
    table = np.zeros(size, dtype="<u4")
    drawn = np.zeros(size, dtype=bool)
    fill = round(alpha * 255)
    for value, (r, g, b) in colors.items():
        table[value] = r | g << 8 | b << 16 | fill << 24
        drawn[value] = True
    words = table[lab]
    interior = np.zeros(lab.shape, dtype=bool)
    core = lab[1:-1, 1:-1]
    interior[1:-1, 1:-1] = (
        (core == lab[:-2, 1:-1])
        & (core == lab[2:, 1:-1])
        & (core == lab[1:-1, :-2])
        & (core == lab[1:-1, 2:])
    )
    words[drawn[lab] & ~interior] |= np.uint32(0xFF000000)
    return _png_array(np.ascontiguousarray(words).view(np.uint8).reshape(*lab.shape, 4))


def _label_rgba_by_region(
    lab: NDArray[np.integer], colors: dict[int, RGB], alpha: float
) -> NDArray[np.uint8]:
    """``render_label_overlay``'s pixels one label at a time (any integer label values)."""
    out = np.zeros((*lab.shape, 4), dtype=np.uint8)
    for value, color in colors.items():
        region = lab == value
        if not region.any():
            continue
        out[region, :3] = color
        out[region, 3] = round(alpha * 255)
        out[region & ~_erode(region), 3] = 255
    return out
