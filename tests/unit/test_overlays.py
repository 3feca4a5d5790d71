"""PNG renderings decoded back with Pillow, and the colormaps they use."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from workers.outputs import overlays as O
from workers.outputs.colormaps import INFERNO, VIRIDIS, apply_colormap, cie_lightness, get_colormap

H, W = 48, 80  # deliberately not square: catches (H, W) / (W, H) mix-ups


def _decode(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


def _image01() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (0.2 + 0.6 * xx / (W - 1) + 0.0 * yy).astype(np.float32)


def _blob(peak: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (peak * np.exp(-((yy - 20) ** 2 + (xx - 50) ** 2) / 40.0)).astype(np.float32)


# ---------------------------------------------------------------------- colormaps
@pytest.mark.parametrize("lut", [VIRIDIS, INFERNO], ids=["viridis", "inferno"])
def test_colormap_lightness_rises_monotonically(lut: np.ndarray) -> None:
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    lightness = cie_lightness(lut)
    # uint8 rounding can cost a few hundredths of L*; a visible step is about 1.
    assert np.diff(lightness).min() > -0.1
    assert lightness[-1] - lightness[0] > 70


def test_cie_lightness_reference_values() -> None:
    grey = np.array([[0, 0, 0], [119, 119, 119], [255, 255, 255]], np.uint8)
    np.testing.assert_allclose(cie_lightness(grey), [0.0, 50.0, 100.0], atol=0.3)


def test_colormaps_match_the_published_end_and_middle_colours() -> None:
    # 0, 0.5, 1 of the published tables: viridis #440154 #21918c #fde725,
    # inferno #000004 #bc3754 #fcffa4
    np.testing.assert_array_equal(
        VIRIDIS[[0, 128, 255]], [[68, 1, 84], [33, 145, 140], [253, 231, 37]]
    )
    np.testing.assert_array_equal(
        INFERNO[[0, 128, 255]], [[0, 0, 4], [188, 55, 84], [252, 255, 164]]
    )


def test_colormap_is_not_jet_like() -> None:
    """Jet's lightness peaks mid-scale (cyan/yellow) and falls again toward red."""
    jet_like = np.array([[0, 0, 143], [0, 255, 255], [255, 255, 0], [128, 0, 0]], np.uint8)
    assert np.diff(cie_lightness(jet_like)).min() < -10  # the check would catch a rainbow
    for name in ("viridis", "inferno"):
        samples = apply_colormap(np.linspace(0, 1, 4), name)
        assert np.diff(cie_lightness(samples)).min() > 5


def test_apply_colormap_clips_and_rejects_unknown_names() -> None:
    out = apply_colormap(np.array([[-1.0, 0.0, 1.0, 2.0, np.nan]]), "inferno")
    assert out.shape == (1, 5, 3)
    np.testing.assert_array_equal(out[0, 0], INFERNO[0])
    np.testing.assert_array_equal(out[0, 3], INFERNO[255])
    np.testing.assert_array_equal(out[0, 4], INFERNO[0])
    with pytest.raises(ValueError, match="unknown colormap 'jet'"):
        get_colormap("jet")
    assert not VIRIDIS.flags.writeable


# ------------------------------------------------------------------------- images
def test_render_image_is_8bit_grey_of_the_right_size() -> None:
    img = _decode(O.render_image(_image01()))
    assert img.mode == "L" and img.size == (W, H)
    arr = np.asarray(img)
    assert arr[0, 0] == round(0.2 * 255) and arr[0, -1] == round(0.8 * 255)


def test_label_png_round_trips_label_values() -> None:
    labels = np.zeros((H, W), np.uint8)
    labels[5:10, 5:30] = 1
    labels[30:40, 60:70] = 7
    img = _decode(O.render_label_png(labels))
    assert img.mode == "L" and img.size == (W, H)
    np.testing.assert_array_equal(np.asarray(img), labels)
    with pytest.raises(ValueError, match=r"0\.\.255"):
        O.render_label_png(np.full((2, 2), 300))


def test_mask_overlay_tints_only_labelled_pixels() -> None:
    image = _image01()
    labels = np.zeros((H, W), np.uint8)
    labels[10:30, 10:40] = 2
    labels[35:45, 60:75] = 3  # no colour given: not drawn
    png = O.render_mask_overlay(image, labels, {2: (255, 0, 0)}, alpha=0.5, outline=True)
    rgb = np.asarray(_decode(png))
    assert rgb.shape == (H, W, 3)
    grey = np.asarray(_decode(O.render_image(image)))
    untouched = labels != 2
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c][untouched], grey[untouched])
    inner = rgb[15, 20].astype(int)
    g = int(grey[15, 20])
    assert abs(inner[0] - round(0.5 * g + 127.5)) <= 1 and abs(inner[1] - round(0.5 * g)) <= 1
    np.testing.assert_array_equal(rgb[10, 20], [255, 0, 0])  # outline is opaque
    with pytest.raises(ValueError, match="does not match"):
        O.render_mask_overlay(image, labels[:-1], {2: (255, 0, 0)})


# ----------------------------------------------------------------------- saliency
def test_saliency_overlay_is_rgba_and_transparent_at_or_below_vmin() -> None:
    m = _blob(2.0) - 0.5  # negative far from the blob
    img = _decode(O.render_saliency_overlay(m, vmin=0.0, vmax=2.0, colormap="inferno"))
    assert img.mode == "RGBA" and img.size == (W, H)
    rgba = np.asarray(img)
    assert (rgba[..., 3][m <= 0.0] == 0).all()
    assert (rgba[..., 3][m > 0.1] > 0).all()
    peak = np.unravel_index(np.argmax(m), m.shape)
    assert rgba[peak][3] == pytest.approx(round(0.6 * 255 * (m[peak] / 2.0)), abs=1)


def test_fixed_scale_renders_weak_and_strong_maps_differently() -> None:
    """Per-image min-max would make these two identical; a fixed scale must not."""
    strong = O.saliency_rgba(_blob(2.0), vmin=0.0, vmax=2.0, colormap="viridis")
    weak = O.saliency_rgba(_blob(0.5), vmin=0.0, vmax=2.0, colormap="viridis")
    peak = (20, 50)
    assert weak[peak][3] < strong[peak][3] / 2
    assert cie_lightness(weak[peak][:3]) < cie_lightness(strong[peak][:3]) - 20
    # and the weak map rendered on its own maximum would have looked like the strong one
    self_scaled = O.saliency_rgba(_blob(0.5), vmin=0.0, vmax=0.5, colormap="viridis")
    np.testing.assert_array_equal(self_scaled, strong)
    png_strong = O.render_saliency_overlay(_blob(2.0), vmin=0.0, vmax=2.0)
    png_weak = O.render_saliency_overlay(_blob(0.5), vmin=0.0, vmax=2.0)
    assert png_strong != png_weak


def test_suppressed_overlay_is_grey_and_fainter() -> None:
    m = _blob(2.0)
    normal = O.saliency_rgba(m, vmin=0.0, vmax=2.0)
    grey = np.asarray(_decode(O.render_saliency_overlay(m, vmin=0.0, vmax=2.0, suppressed=True)))
    visible = grey[..., 3] > 0
    assert visible.any()
    assert (grey[..., 0][visible] == grey[..., 1][visible]).all()
    assert (grey[..., 1][visible] == grey[..., 2][visible]).all()
    assert (grey[..., 3] <= normal[..., 3]).all() and grey[..., 3].max() < normal[..., 3].max()


def test_overlay_rejects_a_degenerate_scale() -> None:
    with pytest.raises(ValueError, match="vmax > vmin"):
        O.render_saliency_overlay(_blob(1.0), vmin=1.0, vmax=1.0)


def test_colorbar_has_high_values_on_top() -> None:
    img = _decode(O.render_colorbar(0.0, 2.5, "inferno", "CAM (logit)", height=200))
    assert img.mode == "RGB" and img.height == 200 and img.width > 16
    rgb = np.asarray(img)
    column = rgb[:, 6 + 8]  # middle of the bar
    lightness = cie_lightness(column)
    top, bottom = lightness[40], lightness[-10]
    assert top > bottom + 50


def test_composite_has_image_heat_legend_and_caption() -> None:
    image = _image01()
    m = _blob(2.0)
    plain = np.asarray(
        _decode(O.render_saliency_composite(image, np.zeros_like(m), vmin=0, vmax=2))
    )
    png = O.render_saliency_composite(
        image, m, vmin=0.0, vmax=2.0, label="CAM (logit)", caption="nodule p=0.91 - CAM"
    )
    img = _decode(png)
    assert img.mode == "RGB"
    factor = 256 // H + 1  # 48 rows are enlarged to at least 256
    assert img.height >= H * factor and img.width > W * factor  # legend to the right
    arr = np.asarray(img)
    caption_h = arr.shape[0] - plain.shape[0]
    assert caption_h > 0
    y, x = caption_h + 20 * factor + factor // 2, 50 * factor + factor // 2
    heat, base = arr[y, x].astype(int), plain[20 * factor + factor // 2, x].astype(int)
    assert np.abs(heat - base).sum() > 60  # the heat shows where the map is high
    far_y, far_x = caption_h + 45 * factor, 5 * factor
    np.testing.assert_array_equal(arr[far_y, far_x], plain[45 * factor, far_x])
