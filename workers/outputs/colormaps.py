"""Perceptually ordered colormaps as 256-entry lookup tables, without matplotlib.

Saliency and uncertainty overlays must not use jet/rainbow: a colormap whose lightness is
not monotonic draws false boundaries (Borland & Taylor 2007, "Rainbow color map (still)
considered harmful"). medcad uses viridis and inferno (van der Walt & Smith, designed for
matplotlib 1.5/2.0, released CC0), whose lightness rises monotonically from the low to the
high end, so "brighter" always means "more".

The tables are rebuilt here from 33 control points of the published 256-entry tables
(entries 0, 8, 16, ..., 248 and 255, sRGB in [0, 1]) by piecewise-linear interpolation;
between control points the interpolated tables differ from the published ones by at most
about 2/255 per channel (largest near inferno's blue minimum), below what a display shows.
"""

from __future__ import annotations

from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray

ColormapName = Literal["viridis", "inferno"]
LUT_SIZE: Final = 256

# Indices into the published 256-entry tables at which the control points were sampled:
# every 8th entry, and the last one.
_KNOTS: Final = (*range(0, LUT_SIZE, 8), LUT_SIZE - 1)

_VIRIDIS_POINTS: Final = (
    (0.267004, 0.004874, 0.329415),
    (0.277018, 0.050344, 0.375715),
    (0.282327, 0.094955, 0.417331),
    (0.282884, 0.135920, 0.453427),
    (0.278826, 0.175490, 0.483397),
    (0.270595, 0.214069, 0.507052),
    (0.258965, 0.251537, 0.524736),
    (0.244972, 0.287675, 0.537260),
    (0.229739, 0.322361, 0.545706),
    (0.214298, 0.355619, 0.551184),
    (0.199430, 0.387607, 0.554642),
    (0.185556, 0.418570, 0.556753),
    (0.172719, 0.448791, 0.557885),
    (0.160665, 0.478540, 0.558115),
    (0.149039, 0.508051, 0.557250),
    (0.137770, 0.537492, 0.554906),
    (0.127568, 0.566949, 0.550556),
    (0.120565, 0.596422, 0.543611),
    (0.120638, 0.625828, 0.533488),
    (0.132268, 0.655014, 0.519661),
    (0.157851, 0.683765, 0.501686),
    (0.196571, 0.711827, 0.479221),
    (0.246070, 0.738910, 0.452024),
    (0.304148, 0.764704, 0.419943),
    (0.369214, 0.788888, 0.382914),
    (0.440137, 0.811138, 0.340967),
    (0.515992, 0.831158, 0.294279),
    (0.595839, 0.848717, 0.243329),
    (0.678489, 0.863742, 0.189503),
    (0.762373, 0.876424, 0.137064),
    (0.845561, 0.887322, 0.099702),
    (0.926106, 0.897330, 0.104071),
    (0.993248, 0.906157, 0.143936),
)

_INFERNO_POINTS: Final = (
    (0.001462, 0.000466, 0.013866),
    (0.013995, 0.011225, 0.071862),
    (0.042253, 0.028139, 0.141141),
    (0.081962, 0.043328, 0.215289),
    (0.129285, 0.047293, 0.290788),
    (0.183429, 0.040329, 0.354971),
    (0.238273, 0.036621, 0.396353),
    (0.290763, 0.045644, 0.418637),
    (0.341500, 0.062325, 0.429425),
    (0.391453, 0.080927, 0.433109),
    (0.441207, 0.099338, 0.431594),
    (0.491022, 0.117179, 0.425552),
    (0.540920, 0.134729, 0.415123),
    (0.590734, 0.152563, 0.400290),
    (0.640135, 0.171438, 0.381065),
    (0.688653, 0.192239, 0.357603),
    (0.735683, 0.215906, 0.330245),
    (0.780517, 0.243327, 0.299523),
    (0.822386, 0.275197, 0.266085),
    (0.860533, 0.311892, 0.230606),
    (0.894305, 0.353399, 0.193584),
    (0.923215, 0.399359, 0.155193),
    (0.946965, 0.449191, 0.115272),
    (0.965397, 0.502249, 0.073859),
    (0.978422, 0.557937, 0.034931),
    (0.985952, 0.615750, 0.025592),
    (0.987874, 0.675267, 0.065257),
    (0.984075, 0.736087, 0.129527),
    (0.974638, 0.797692, 0.206332),
    (0.960626, 0.859069, 0.298010),
    (0.947594, 0.917399, 0.410665),
    (0.954529, 0.965896, 0.540361),
    (0.988362, 0.998364, 0.644924),
)


def _build_lut(points: tuple[tuple[float, float, float], ...]) -> NDArray[np.uint8]:
    """Interpolate control points to a read-only (256, 3) uint8 sRGB table."""
    knots = np.asarray(_KNOTS, dtype=np.float64)
    rgb = np.asarray(points, dtype=np.float64)
    index = np.arange(LUT_SIZE, dtype=np.float64)
    channels = [np.interp(index, knots, rgb[:, c]) for c in range(3)]
    lut = np.rint(np.stack(channels, axis=1) * 255.0).clip(0, 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


VIRIDIS: Final = _build_lut(_VIRIDIS_POINTS)
INFERNO: Final = _build_lut(_INFERNO_POINTS)

_TABLES: Final = {"viridis": VIRIDIS, "inferno": INFERNO}


def get_colormap(name: str) -> NDArray[np.uint8]:
    """Return the lookup table of a colormap.

    Parameters
    ----------
    name : ``"viridis"`` or ``"inferno"``.

    Returns
    -------
    uint8, shape (256, 3), read-only; row ``i`` is the sRGB colour of the value ``i / 255``.

    Raises
    ------
    ValueError
        If ``name`` is not a known colormap.
    """
    try:
        return _TABLES[name]
    except KeyError:
        known = ", ".join(sorted(_TABLES))
        raise ValueError(f"unknown colormap {name!r}; known colormaps: {known}") from None


def apply_colormap(values01: NDArray[np.floating], name: str) -> NDArray[np.uint8]:
    """Map values in [0, 1] to sRGB colours.

    Parameters
    ----------
    values01 : float array of any shape; values are clipped to [0, 1] and NaN is mapped to 0.
    name : colormap name (see ``get_colormap``).

    Returns
    -------
    uint8 array of shape ``values01.shape + (3,)``.
    """
    lut = get_colormap(name)
    t = np.nan_to_num(np.asarray(values01, dtype=np.float64), nan=0.0)
    index = np.rint(np.clip(t, 0.0, 1.0) * (LUT_SIZE - 1)).astype(np.intp)
    out: NDArray[np.uint8] = lut[index]
    return out


def cie_lightness(rgb: NDArray[np.uint8]) -> NDArray[np.float64]:
    """CIE 1976 L* of sRGB colours (D65 white, IEC 61966-2-1 transfer function).

    Parameters
    ----------
    rgb : uint8, shape (..., 3), sRGB.

    Returns
    -------
    float64, shape (...), L* in [0, 100].
    """
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    # Relative luminance Y of linear sRGB (ITU-R BT.709 primaries, D65).
    y = linear @ np.array([0.2126, 0.7152, 0.0722])
    eps = (6.0 / 29.0) ** 3
    f = np.where(y > eps, np.cbrt(y), y / (3.0 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    lightness: NDArray[np.float64] = 116.0 * f - 16.0
    return lightness
