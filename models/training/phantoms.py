"""Seeded chest-CT phantoms with ground truth: HU volumes, label volumes and DICOM series.

Everything here is numpy/scipy/pydicom only (no torch): ``medcad demo-data`` calls it at run
time and the training, evaluation and test code share it.

A series is built slice by slice in patient coordinates (millimetres) and sampled on the
512 × 512 pixel grid of the series, so pixel spacing, slice thickness, patient size and
position all vary between series while the anatomy stays consistent. Axis order of every
volume is (Z, Y, X) = (slice, row, column); slice 0 is the most superior slice, and the image
plane follows the DICOM patient coordinate system (LPS, PS3.3 C.7.6.2.1.1): columns run
toward the patient's left, rows toward posterior, so the table is at the bottom of the image.

Labels: 0 background, 1 lung (the lung field, vessels inside it included), 2 nodule.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

LABEL_BACKGROUND = 0
LABEL_LUNG = 1
LABEL_NODULE = 2

IMAGE_SIZE = 512
HU_MIN = -1024
HU_MAX = 3071

NoduleKind = Literal["solid", "part-solid", "ground-glass"]
NoduleShape = Literal["spherical", "lobulated", "spiculated"]
NoduleLocation = Literal["isolated", "juxtavascular", "juxtapleural"]


@dataclass(frozen=True)
class Lesion:
    """One synthetic nodule.

    ``center_voxel`` is (z, y, x) in fractional voxel indices of the series; ``center_mm`` the
    same point in patient coordinates (x, y, z) in millimetres (LPS). ``slices`` is the
    inclusive index range of slices whose label volume contains this lesion (empty → (-1, -1)
    when the lesion falls between slices).
    """

    lesion_id: int
    center_voxel: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    diameter_mm: float
    kind: NoduleKind
    shape: NoduleShape
    location: NoduleLocation
    hu: float
    slices: tuple[int, int]
    voxels: int


@dataclass
class PhantomSeries:
    """A generated CT series with its ground truth.

    Attributes
    ----------
    hu : int16, shape (Z, 512, 512), Hounsfield units, axis order (slice, row, column).
    labels : uint8, same shape, 0 background / 1 lung / 2 nodule.
    lesion_map : uint16, same shape, 0 or ``Lesion.lesion_id`` for nodule voxels.
    pixel_spacing : (row spacing, column spacing) in mm, PS3.3 C.7.6.2.1.1 order.
    slice_thickness : mm; slices are contiguous (spacing between slices = thickness).
    origin : (x, y) patient position (mm) of the centre of the top-left pixel.
    z_positions : patient z (mm) of each slice, decreasing (slice 0 is most superior).
    lesions : the nodules, in ``lesion_id`` order.
    seed : the integer seed the series was generated from (when known).
    """

    hu: NDArray[np.int16]
    labels: NDArray[np.uint8]
    lesion_map: NDArray[np.uint16]
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    origin: tuple[float, float]
    z_positions: list[float]
    lesions: list[Lesion]
    seed: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])


# --------------------------------------------------------------------------------------------
# Small geometry helpers (all vectorised over a 2-D grid in mm)
# --------------------------------------------------------------------------------------------


def _superellipse(
    x: NDArray[np.float32],
    y: NDArray[np.float32],
    cx: float,
    cy: float,
    ax: float,
    ay: float,
    p: float = 2.0,
) -> NDArray[np.float32]:
    """Normalised superellipse radius: < 1 inside, 1 on the boundary."""
    u = np.abs((x - cx) / max(ax, 1e-3))
    v = np.abs((y - cy) / max(ay, 1e-3))
    if p == 2.0:
        return np.sqrt(u * u + v * v)
    return (u**p + v**p) ** (1.0 / p)


def _soft_inside(rho: NDArray[np.float32], scale_mm: float, edge_mm: float) -> NDArray[np.float32]:
    """Partial-volume occupancy of a shape given its normalised radius ``rho``.

    ``scale_mm`` converts the normalised distance to millimetres so that the edge has a
    physical width (the scanner's point spread) instead of one that grows with the shape.
    """
    d = (1.0 - rho) * np.float32(scale_mm) / np.float32(edge_mm)
    return np.clip(d + 0.5, 0.0, 1.0).astype(np.float32)


def _blend(img: NDArray[np.float32], occ: NDArray[np.float32], value: float) -> None:
    """In place: ``img = img·(1-occ) + value·occ``."""
    img += occ * (np.float32(value) - img)


# --------------------------------------------------------------------------------------------
# Anatomy parameters (one draw per series)
# --------------------------------------------------------------------------------------------


@dataclass
class _Anatomy:
    cx: float  # body centre in patient mm
    cy: float
    body_a: float  # lateral semi-axis mm
    body_b: float  # AP semi-axis mm
    fat: float  # subcutaneous fat thickness mm
    wall: float  # chest wall (muscle + ribs) inside the fat, mm
    med_half: float  # half width of the mediastinum at the lung level, mm
    lung_hu: float
    lung_gradient: float  # HU denser posteriorly (dependent lung)
    thorax_len: float  # apex → lung base, mm
    heart_shift: float
    rib_phase: float
    rib_period: float
    table_gap: float
    lobulation: list[tuple[int, float, float]]


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    size = rng.uniform(0.82, 1.18)
    body_a = 160.0 * size * rng.uniform(0.93, 1.07)
    body_b = 112.0 * size * rng.uniform(0.9, 1.1)
    return _Anatomy(
        cx=rng.uniform(-20, 20),
        cy=rng.uniform(-15, 15),
        body_a=body_a,
        body_b=body_b,
        fat=rng.uniform(5, 28) * size,
        wall=rng.uniform(12, 20),
        med_half=rng.uniform(18, 28),
        lung_hu=rng.uniform(-880, -820),
        lung_gradient=rng.uniform(20, 70),
        thorax_len=rng.uniform(240, 300) * size**0.5,
        heart_shift=rng.uniform(8, 25),
        rib_phase=rng.uniform(0, 2 * math.pi),
        rib_period=rng.uniform(28, 36),
        table_gap=rng.uniform(2, 18),
        lobulation=[
            (int(k), float(rng.uniform(0.0, 0.035)), float(rng.uniform(0, 2 * math.pi)))
            for k in (2, 3, 5)
        ],
    )


def _lung_scale(t: float) -> float:
    """Relative lung cross-section size at anatomical depth ``t`` (0 apex, 1 base)."""
    if t <= 0.0 or t >= 1.08:
        return 0.0
    return 0.3 + 0.7 * math.sin(0.5 * math.pi * min(t / 0.62, 1.0))


# --------------------------------------------------------------------------------------------
# Vessel tree
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    p0: tuple[float, float, float]  # (x, y, d) mm; d = depth below the lung apex
    p1: tuple[float, float, float]
    radius: float


def _grow_tree(
    rng: np.random.Generator,
    start: NDArray[np.float64],
    direction: NDArray[np.float64],
    radius: float,
    length: float,
    depth: int,
    out: list[_Segment],
) -> None:
    direction = direction / np.linalg.norm(direction)
    end = start + direction * length
    out.append(_Segment(tuple(start), tuple(end), radius))  # type: ignore[arg-type]
    if depth <= 0 or radius < 0.55:
        return
    for sign in (-1.0, 1.0):
        # Rotate about a random axis perpendicular to the branch: a bifurcation.
        perp = np.cross(direction, rng.normal(size=3))
        perp /= np.linalg.norm(perp) + 1e-9
        angle = math.radians(rng.uniform(18, 42))
        child = direction * math.cos(angle) + sign * perp * math.sin(angle)
        child[2] += rng.normal(0, 0.08)
        _grow_tree(
            rng,
            end,
            child,
            radius * rng.uniform(0.68, 0.8),
            length * rng.uniform(0.7, 0.88),
            depth - 1,
            out,
        )


def _vessel_tree(rng: np.random.Generator, an: _Anatomy) -> list[_Segment]:
    """Pulmonary vessels of both lungs, rooted at the hila, as 3-D cylinders."""
    segments: list[_Segment] = []
    hilum_d = an.thorax_len * rng.uniform(0.42, 0.52)
    for side in (-1.0, 1.0):  # -1: patient right (image left), +1: patient left
        hx = an.cx + side * (an.med_half + 8.0)
        hy = an.cy + rng.uniform(-5, 10)
        for main in range(4):
            # Main trunks toward the apex, the base, and two lateral directions.
            d = np.array(
                [
                    side * rng.uniform(0.3, 1.0),
                    rng.uniform(-0.7, 0.7),
                    [-1.0, 1.0, -0.25, 0.35][main] * rng.uniform(0.6, 1.2),
                ]
            )
            _grow_tree(
                rng,
                np.array([hx, hy, hilum_d + rng.uniform(-10, 10)]),
                d,
                radius=rng.uniform(3.2, 4.8),
                length=rng.uniform(28, 40),
                depth=7,
                out=segments,
            )
    return segments


# --------------------------------------------------------------------------------------------
# Nodules
# --------------------------------------------------------------------------------------------


@dataclass
class _NoduleSpec:
    center: NDArray[np.float64]  # (x, y, d) mm
    radius: float
    kind: NoduleKind
    shape: NoduleShape
    location: NoduleLocation
    hu: float
    core_fraction: float
    waves: NDArray[np.float64]  # (k, 3) lobulation wave vectors
    wave_amp: NDArray[np.float64]
    wave_phase: NDArray[np.float64]
    spikes: NDArray[np.float64]  # (s, 3) unit directions
    spike_len: NDArray[np.float64]


def _nodule_radius_field(
    spec: _NoduleSpec, dx: NDArray[np.float32], dy: NDArray[np.float32], dz: NDArray[np.float32]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(distance from centre, boundary radius in that direction), both in mm, broadcast."""
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + np.float32(1e-6)
    boundary = np.full(np.broadcast_shapes(dx.shape, dy.shape, dz.shape), spec.radius, np.float32)
    if spec.shape != "spherical":
        ux, uy, uz = dx / dist, dy / dist, dz / dist
        mod = np.zeros_like(boundary)
        for (wx, wy, wz), amp, ph in zip(spec.waves, spec.wave_amp, spec.wave_phase, strict=True):
            mod += np.float32(amp) * np.cos(ux * wx + uy * wy + uz * wz + ph)
        boundary = boundary * (1.0 + mod)
        if spec.shape == "spiculated":
            # Spicules: thin cones along fixed directions, reaching out to spike_len.
            for (sx, sy, sz), slen in zip(spec.spikes, spec.spike_len, strict=True):
                cosang = ux * sx + uy * sy + uz * sz
                sharp = np.clip((cosang - 0.96) / 0.04, 0.0, 1.0) ** 2
                boundary = np.maximum(boundary, np.float32(spec.radius + slen) * sharp)
    return dist, boundary.astype(np.float32)


def _draw_nodules(
    rng: np.random.Generator,
    an: _Anatomy,
    segments: Sequence[_Segment],
    d_range: tuple[float, float],
    n_nodules: int,
    size_range_mm: tuple[float, float],
) -> list[_NoduleSpec]:
    specs: list[_NoduleSpec] = []
    for _ in range(n_nodules):
        # Log-uniform diameters: small nodules are common, and the size bands stay balanced.
        diam = float(np.exp(rng.uniform(np.log(size_range_mm[0]), np.log(size_range_mm[1]))))
        r = diam / 2.0
        kind: NoduleKind = rng.choice(
            np.array(["solid", "part-solid", "ground-glass"]), p=[0.6, 0.2, 0.2]
        ).item()
        shape: NoduleShape = rng.choice(
            np.array(["spherical", "lobulated", "spiculated"]), p=[0.4, 0.35, 0.25]
        ).item()
        location: NoduleLocation = rng.choice(
            np.array(["isolated", "juxtavascular", "juxtapleural"]), p=[0.5, 0.25, 0.25]
        ).item()
        hu = {
            "solid": rng.uniform(-30, 60),
            "part-solid": rng.uniform(-620, -450),
            "ground-glass": rng.uniform(-680, -480),
        }[kind]
        n_waves = 3 if shape != "spherical" else 0
        n_spikes = int(rng.integers(5, 11)) if shape == "spiculated" else 0
        specs.append(
            _NoduleSpec(
                center=np.zeros(3),
                radius=r,
                kind=kind,
                shape=shape,
                location=location,
                hu=float(hu),
                core_fraction=float(rng.uniform(0.35, 0.6)) if kind == "part-solid" else 0.0,
                waves=rng.normal(0, 2.2, size=(n_waves, 3)),
                wave_amp=rng.uniform(0.06, 0.16, size=n_waves),
                wave_phase=rng.uniform(0, 2 * math.pi, size=n_waves),
                spikes=_unit_vectors(rng, n_spikes),
                spike_len=rng.uniform(0.6, 1.4, size=n_spikes) * r,
            )
        )
    _place_nodules(rng, an, segments, d_range, specs)
    return specs


def _unit_vectors(rng: np.random.Generator, n: int) -> NDArray[np.float64]:
    v = rng.normal(size=(n, 3))
    return np.asarray(v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-9), dtype=np.float64)


def _lung_geometry(an: _Anatomy, t: float, side: float) -> tuple[float, float, float, float]:
    """(centre x, centre y, semi-axis x, semi-axis y) of one lung at depth ``t``."""
    s = _lung_scale(t)
    inner_a = an.body_a - an.fat - an.wall
    inner_b = an.body_b - an.fat - an.wall
    ax = max((inner_a - an.med_half) / 2.0, 5.0) * (0.75 + 0.25 * s)
    ay = max(inner_b, 5.0) * s
    lx = an.cx + side * (an.med_half + ax + 0.0)
    ly = an.cy + 0.12 * inner_b * (1 - s)
    return lx, ly, ax * max(s, 0.35) ** 0.3, ay


def _inside_lung_point(an: _Anatomy, x: float, y: float, d: float) -> float:
    """Normalised lung radius of a point (< 1 inside the lung shape, ignoring cut-outs)."""
    t = d / an.thorax_len
    if _lung_scale(t) == 0.0:
        return 99.0
    side = -1.0 if x < an.cx else 1.0
    lx, ly, ax, ay = _lung_geometry(an, t, side)
    return float(
        _superellipse(np.float32(x), np.float32(y), lx, ly, ax, ay, 2.4)  # type: ignore[arg-type]
    )


def _place_nodules(
    rng: np.random.Generator,
    an: _Anatomy,
    segments: Sequence[_Segment],
    d_range: tuple[float, float],
    specs: list[_NoduleSpec],
) -> None:
    lo, hi = d_range
    for spec in specs:
        for _attempt in range(200):
            d = rng.uniform(lo + 0.2 * spec.radius, hi - 0.2 * spec.radius)
            t = d / an.thorax_len
            if not 0.12 < t < 0.92:
                continue
            side = rng.choice([-1.0, 1.0])
            lx, ly, ax, ay = _lung_geometry(an, t, side)
            ang = rng.uniform(0, 2 * math.pi)
            if spec.location == "juxtapleural":
                # Touching the pleura: centre about one radius inside the lateral/posterior wall.
                ang = rng.uniform(-0.5 * math.pi, 0.5 * math.pi)
                ang = ang if side > 0 else math.pi - ang
                frac = 1.0 - (spec.radius * rng.uniform(0.65, 0.95)) / max(min(ax, ay), 1.0)
                x, y = lx + ax * frac * math.cos(ang), ly + ay * frac * math.sin(ang)
            elif spec.location == "juxtavascular" and segments:
                seg = segments[int(rng.integers(len(segments)))]
                a = rng.uniform(0, 1)
                p = np.array(seg.p0) * (1 - a) + np.array(seg.p1) * a
                off = _unit_vectors(rng, 1)[0] * (spec.radius + seg.radius * 0.5)
                x, y, d = float(p[0] + off[0]), float(p[1] + off[1]), float(p[2] + off[2])
                if not lo <= d <= hi:
                    continue
            else:
                rr = math.sqrt(rng.uniform(0, 1)) * 0.8
                x, y = lx + ax * rr * math.cos(ang), ly + ay * rr * math.sin(ang)
            # Keep the nodule in the lung (away from the mediastinum and the other lung).
            rho = _inside_lung_point(an, x, y, d)
            margin = spec.radius / max(min(ax, ay), 1.0)
            limit = 1.0 if spec.location == "juxtapleural" else 1.0 - margin
            if rho > limit or abs(x - an.cx) < an.med_half + spec.radius + 10.0:
                continue
            if any(
                np.linalg.norm(np.array([x, y, d]) - o.center) < o.radius + spec.radius + 4
                for o in specs
                if o is not spec and o.center.any()
            ):
                continue
            spec.center = np.array([x, y, d])
            break
        else:  # no valid place found: leave the nodule out
            spec.radius = 0.0


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


def _as_rng(rng_or_seed: np.random.Generator | int | np.random.SeedSequence) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def generate_series(
    rng_or_seed: np.random.Generator | int | np.random.SeedSequence,
    n_slices: int = 40,
    *,
    n_nodules: int | None = None,
    size_range_mm: tuple[float, float] = (3.0, 30.0),
    slice_thickness: float | None = None,
    image_size: int = IMAGE_SIZE,
) -> PhantomSeries:
    """Generate one seeded chest-CT phantom series with ground truth.

    Parameters
    ----------
    rng_or_seed : a numpy Generator, an integer seed or a SeedSequence.
    n_slices : number of contiguous axial slices.
    n_nodules : nodules to place (default: 0–3, drawn; about one series in six has none).
    size_range_mm : diameter range of the nodules, drawn log-uniformly.
    slice_thickness : mm (default: drawn from 1.0–3.0 mm).
    image_size : rows = columns of each slice (512 for CT).

    Returns
    -------
    PhantomSeries with ``hu`` int16 (Z, N, N) in HU and ``labels`` uint8 (Z, N, N).
    """
    seed = int(rng_or_seed) if isinstance(rng_or_seed, int | np.integer) else None
    rng = _as_rng(rng_or_seed)
    an = _draw_anatomy(rng)
    st = float(slice_thickness or rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0]))
    # Reconstruction field of view: fits the patient with a margin, as a technologist would.
    fov = max(2 * an.body_a + rng.uniform(25, 80), rng.uniform(330, 420))
    ps = round(fov / image_size, 4)
    half = ps * (image_size - 1) / 2.0
    origin = (-half, -half - rng.uniform(-10, 25))
    coverage = n_slices * st
    d0 = rng.uniform(-0.05 * an.thorax_len, max(an.thorax_len - coverage, 0.0) + 5.0)
    depths = d0 + st * np.arange(n_slices)
    z_top = rng.uniform(-100, 100)
    z_positions = [float(z_top - st * k) for k in range(n_slices)]

    segments = _vessel_tree(rng, an)
    if n_nodules is None:
        n_nodules = int(rng.choice([0, 1, 1, 2, 2, 3]))
    specs = [
        s
        for s in _draw_nodules(
            rng, an, segments, (float(depths[0]), float(depths[-1])), n_nodules, size_range_mm
        )
        if s.radius > 0
    ]

    xs = (origin[0] + ps * np.arange(image_size)).astype(np.float32)
    ys = (origin[1] + ps * np.arange(image_size)).astype(np.float32)
    gx, gy = np.meshgrid(xs, ys)
    grid = _Grid(xs, ys, gx, gy)
    static, spine = _static_anatomy(an, grid)

    hu = np.empty((n_slices, image_size, image_size), np.float32)
    lung = np.zeros((n_slices, image_size, image_size), bool)
    tex = _texture_fields(rng, image_size)
    for k, d in enumerate(depths):
        hu[k], lung[k] = _slice_anatomy(an, float(d), grid, static, spine, tex)

    vessel = _rasterise_vessels(segments, xs, ys, depths)
    hu += np.where(lung, vessel, 0.0) * (np.float32(40.0) - hu)

    lesion_map = _rasterise_nodules(hu, specs, xs, ys, depths)
    # A nodule is labelled where it fills at least half a voxel and lies in the lung field:
    # the part of a juxtapleural nodule that merges with the chest wall cannot be told apart.
    lesion_map[~lung] = 0

    # Scanner: in-plane point spread, then correlated quantum noise.
    blur = rng.uniform(0.5, 0.9)
    ndimage.gaussian_filter(hu, sigma=(0, blur, blur), output=hu, truncate=3.0)
    sigma_noise = rng.uniform(10, 35)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    ndimage.gaussian_filter(noise, sigma=(0, 0.6, 0.6), output=noise, truncate=2.5)
    hu += noise * np.float32(sigma_noise / 0.45)

    labels = np.zeros(hu.shape, np.uint8)
    labels[lung] = LABEL_LUNG
    labels[lesion_map > 0] = LABEL_NODULE

    lesions = _lesion_records(specs, lesion_map, origin, ps, z_positions, depths, st)
    return PhantomSeries(
        hu=np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16),
        labels=labels,
        lesion_map=lesion_map,
        pixel_spacing=(ps, ps),
        slice_thickness=st,
        origin=(float(origin[0]), float(origin[1])),
        z_positions=z_positions,
        lesions=lesions,
        seed=seed,
        meta={
            "noise_hu": round(float(sigma_noise), 1),
            "blur_px": round(float(blur), 2),
            "body_axes_mm": [round(an.body_a, 1), round(an.body_b, 1)],
            "depth_range_mm": [round(float(depths[0]), 1), round(float(depths[-1]), 1)],
        },
    )


def _texture_fields(rng: np.random.Generator, n: int) -> list[NDArray[np.float32]]:
    """Three smooth random fields (unit std) mixed along z for lung parenchyma texture."""
    fields = []
    for _ in range(3):
        coarse = rng.standard_normal((24, 24)).astype(np.float32)
        f = ndimage.zoom(coarse, n / 24, order=1)[:n, :n]
        f /= f.std() + 1e-6
        fields.append(f.astype(np.float32))
    return fields


@dataclass
class _Grid:
    """The pixel grid of a series in patient mm: 1-D axes and their 2-D mesh."""

    xs: NDArray[np.float32]
    ys: NDArray[np.float32]
    gx: NDArray[np.float32]
    gy: NDArray[np.float32]

    def box(self, cx: float, cy: float, rx: float, ry: float) -> tuple[slice, slice] | None:
        """Row/column slices covering the rectangle centre ± radius (None if off-image)."""
        ix = np.searchsorted(self.xs, [cx - rx, cx + rx])
        iy = np.searchsorted(self.ys, [cy - ry, cy + ry])
        if ix[0] >= ix[1] or iy[0] >= iy[1]:
            return None
        return slice(int(iy[0]), int(iy[1])), slice(int(ix[0]), int(ix[1]))


def _blend_ellipse(
    img: NDArray[np.float32],
    grid: _Grid,
    cx: float,
    cy: float,
    ax: float,
    ay: float,
    value: float,
    edge: float = 0.6,
    angle: float = 0.0,
) -> None:
    """Blend a (rotated) ellipse of attenuation ``value`` into ``img``, touching only its box."""
    reach = max(ax, ay) + 2.0
    box = grid.box(cx, cy, reach, reach)
    if box is None:
        return
    x = grid.xs[box[1]][None, :] - np.float32(cx)
    y = grid.ys[box[0]][:, None] - np.float32(cy)
    if angle:
        c, s_ = math.cos(angle), math.sin(angle)
        x, y = x * c + y * s_, -x * s_ + y * c
    rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    _blend(img[box], _soft_inside(rho, min(ax, ay), edge), value)


def _static_anatomy(an: _Anatomy, grid: _Grid) -> tuple[NDArray[np.float32], tuple[float, float]]:
    """The part of every slice that does not change along z: table, body wall, spine."""
    gx, gy = grid.gx, grid.gy
    img = np.full(gx.shape, -1000.0, np.float32)
    # Table below the patient (posterior = larger y): a cradle of carbon fibre around foam.
    ty = an.cy + an.body_b + an.table_gap
    curve = ty - 0.0005 * (gx - an.cx) ** 2
    in_table = (gy > curve) & (gy < curve + 9.0) & (np.abs(gx - an.cx) < 220)
    img[in_table] = -250.0
    img[(np.abs(gy - curve) < 1.2) & in_table] = 250.0
    # Body with a lobulated outline, subcutaneous fat and muscle.
    theta = np.arctan2(gy - an.cy, gx - an.cx)
    wobble = 1.0 + sum(a * np.cos(kk * theta + ph) for kk, a, ph in an.lobulation)
    body_rho = _superellipse(gx, gy, an.cx, an.cy, an.body_a, an.body_b, 2.2) / wobble
    _blend(img, _soft_inside(body_rho, an.body_b, 0.8), -95.0)
    muscle_rho = (
        _superellipse(gx, gy, an.cx, an.cy, an.body_a - an.fat, an.body_b - an.fat, 2.2) / wobble
    )
    _blend(img, _soft_inside(muscle_rho, an.body_b, 0.8), 45.0)
    # Spine: vertebral body (cortex + cancellous bone), canal, posterior elements.
    sx, sy = an.cx, an.cy + an.body_b - an.fat - 38.0
    _blend_ellipse(img, grid, sx, sy - 6, 17.0, 14.0, 650.0)
    _blend_ellipse(img, grid, sx, sy - 6, 14.0, 11.5, 230.0)
    _blend_ellipse(img, grid, sx, sy + 16, 7.0, 7.0, 25.0)
    _blend_ellipse(img, grid, sx, sy + 30, 16.0, 6.0, 420.0)
    # Mediastinal fat.
    _blend_ellipse(img, grid, an.cx, an.cy - 10, an.med_half + 6, an.body_b * 0.55, -70.0, 0.8)
    return img, (sx, sy)


def _draw_ribs(img: NDArray[np.float32], an: _Anatomy, grid: _Grid, d: float) -> None:
    """Rib cross-sections in the chest wall and the sternum in front.

    Ribs run obliquely, so a given rib crosses the slice plane at an angle around the chest
    that drifts with z; a phase per rib makes them come and go between slices.
    """
    ra = an.body_a - an.fat - 0.45 * an.wall
    rb = an.body_b - an.fat - 0.45 * an.wall
    for j in range(18):
        theta = -math.pi / 2 + (j + 0.5) * 2 * math.pi / 18  # start anterior (−y)
        # Skip the spine behind and the sternum in front: they are drawn separately.
        if abs(math.sin(theta)) > 0.93:
            continue
        phase = math.sin(2 * math.pi * (d + 9.0 * math.cos(theta)) / an.rib_period + an.rib_phase)
        if phase < 0.1:
            continue
        x = an.cx + ra * math.cos(theta)
        y = an.cy + rb * math.sin(theta)
        tangent = math.atan2(rb * math.cos(theta), -ra * math.sin(theta))
        _blend_ellipse(img, grid, x, y, 8.0, 5.0, 650.0, 0.5, tangent)
        _blend_ellipse(img, grid, x, y, 5.5, 2.8, 260.0, 0.5, tangent)
    if math.sin(2 * math.pi * d / (2 * an.rib_period) + an.rib_phase) > -0.3:
        _blend_ellipse(img, grid, an.cx, an.cy - rb, 14.0, 5.0, 500.0, 0.5)


def _slice_anatomy(
    an: _Anatomy,
    d: float,
    grid: _Grid,
    static: NDArray[np.float32],
    spine: tuple[float, float],
    tex: list[NDArray[np.float32]],
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """HU image (without vessels/nodules/noise) and lung mask of one slice at depth ``d``."""
    t = d / an.thorax_len
    gx, gy = grid.gx, grid.gy
    img = static.copy()
    sx, sy = spine
    _draw_ribs(img, an, grid, d)
    # Great vessels, the heart lower down.
    if t < 0.55:
        _blend_ellipse(img, grid, an.cx + 8, an.cy - 22, 14, 14, 42.0)
    if 0.2 < t < 1.05:
        _blend_ellipse(img, grid, sx + 22, sy - 14, 12, 12, 42.0)
    heart_s = max(0.0, math.sin(math.pi * (t - 0.45) / 0.55)) if t > 0.45 else 0.0
    hx, hy = an.cx + an.heart_shift, an.cy - 8
    hax, hay = 52 * heart_s + 10, 42 * heart_s + 8
    if heart_s > 0:
        _blend_ellipse(img, grid, hx, hy, hax, hay, 38.0, 0.8, 0.35)
    # Airways: trachea to the carina, then the two main bronchi.
    if t < 0.36:
        _blend_ellipse(img, grid, an.cx, an.cy - 12, 9.5, 8.5, 40.0, 0.5)
        _blend_ellipse(img, grid, an.cx, an.cy - 12, 7.6, 6.8, -1000.0, 0.5)
    elif t < 0.46:
        off = (t - 0.36) / 0.1 * 22 + 6
        for side in (-1.0, 1.0):
            _blend_ellipse(img, grid, an.cx + side * off, an.cy - 12, 6.5, 6.0, 40.0, 0.5)
            _blend_ellipse(img, grid, an.cx + side * off, an.cy - 12, 4.9, 4.5, -1000.0, 0.5)

    lung = np.zeros(gx.shape, bool)
    if _lung_scale(t) == 0:
        return img, lung
    for side in (-1.0, 1.0):
        lx, ly, ax, ay = _lung_geometry(an, t, side)
        box = grid.box(lx, ly, ax * 1.1 + 2, ay * 1.1 + 2)
        if box is None:
            continue
        bx, by = gx[box], gy[box]
        ang = np.arctan2(by - ly, bx - lx)
        wob = 1.0 + 0.04 * np.cos(3 * ang + side) + 0.03 * np.cos(5 * ang + 1.3)
        inside = _superellipse(bx, by, lx, ly, ax, ay, 2.4) / wob < 1.0
        # Medial cut-outs: the mediastinum, the heart and the spine press on the lungs.
        inside &= np.abs(bx - an.cx) > an.med_half
        if heart_s > 0:
            c, s_ = math.cos(0.35), math.sin(0.35)
            u, v = bx - hx, by - hy
            inside &= ((u * c + v * s_) / hax) ** 2 + ((-u * s_ + v * c) / hay) ** 2 > 1.25
        inside &= _superellipse(bx, by, sx, sy + 4, 30.0, 34.0) > 1.0
        if t > 0.8:  # diaphragm dome rising from below: the lung becomes a crescent
            dome_r = min(ax, ay) * 1.35 * math.sqrt((t - 0.8) / 0.28)
            dome = _superellipse(bx, by, lx - side * 0.1 * ax, ly - 0.15 * ay, dome_r, dome_r)
            inside &= dome > 1.0
        lung[box] |= inside
    if lung.any():
        mix = 0.5 + 0.5 * math.sin(d / 37.0)
        texture = (tex[0] * mix + tex[1] * (1 - mix)) * 18.0 + tex[2] * 8.0
        posterior = (gy - an.cy) / an.body_b  # dependent lung is denser
        parenchyma = an.lung_hu + an.lung_gradient * posterior + texture
        img[lung] = parenchyma[lung]
    return img, lung


def _rasterise_vessels(
    segments: Sequence[_Segment],
    xs: NDArray[np.float32],
    ys: NDArray[np.float32],
    depths: NDArray[np.float64],
) -> NDArray[np.float32]:
    """Occupancy (0–1) of the vessel tree on the voxel grid, max-combined over segments."""
    ps = float(xs[1] - xs[0])
    st = float(depths[1] - depths[0]) if len(depths) > 1 else 1.0
    out = np.zeros((len(depths), len(ys), len(xs)), np.float32)
    for seg in segments:
        p0, p1, r = np.array(seg.p0), np.array(seg.p1), seg.radius
        lo, hi = np.minimum(p0, p1) - r - 1.0, np.maximum(p0, p1) + r + 1.0
        ix = np.searchsorted(xs, [lo[0], hi[0]])
        iy = np.searchsorted(ys, [lo[1], hi[1]])
        iz = np.searchsorted(depths, [lo[2], hi[2]])
        if ix[0] >= ix[1] or iy[0] >= iy[1] or iz[0] >= iz[1]:
            continue
        bx = xs[ix[0] : ix[1]][None, None, :] - np.float32(p0[0])
        by = ys[iy[0] : iy[1]][None, :, None] - np.float32(p0[1])
        bz = depths[iz[0] : iz[1]].astype(np.float32)[:, None, None] - np.float32(p0[2])
        u = (p1 - p0).astype(np.float32)
        uu = float(u @ u) + 1e-6
        tt = np.clip((bx * u[0] + by * u[1] + bz * u[2]) / uu, 0.0, 1.0)
        ddx, ddy, ddz = bx - tt * u[0], by - tt * u[1], bz - tt * u[2]
        dist = np.sqrt(ddx * ddx + ddy * ddy + ddz * ddz)
        # Through-plane, a thick slice averages the vessel: soften edges by slice thickness.
        edge = 0.5 * ps + 0.15 * st
        occ = np.clip((r - dist) / edge + 0.5, 0.0, 1.0)
        view = out[iz[0] : iz[1], iy[0] : iy[1], ix[0] : ix[1]]
        np.maximum(view, occ, out=view)
    return out


def _nodule_boxes(
    spec: _NoduleSpec,
    xs: NDArray[np.float32],
    ys: NDArray[np.float32],
    depths: NDArray[np.float64],
) -> tuple[tuple[slice, slice, slice], NDArray[np.float32], NDArray[np.float32]] | None:
    reach = spec.radius * (2.5 if spec.shape == "spiculated" else 1.4) + 1.0
    c = spec.center
    ix = np.searchsorted(xs, [c[0] - reach, c[0] + reach])
    iy = np.searchsorted(ys, [c[1] - reach, c[1] + reach])
    iz = np.searchsorted(depths, [c[2] - reach, c[2] + reach])
    if ix[0] >= ix[1] or iy[0] >= iy[1] or iz[0] >= iz[1]:
        return None
    dx = xs[ix[0] : ix[1]][None, None, :] - np.float32(c[0])
    dy = ys[iy[0] : iy[1]][None, :, None] - np.float32(c[1])
    dz = depths[iz[0] : iz[1]].astype(np.float32)[:, None, None] - np.float32(c[2])
    dist, boundary = _nodule_radius_field(spec, dx, dy, dz)
    box = (slice(iz[0], iz[1]), slice(iy[0], iy[1]), slice(ix[0], ix[1]))
    return box, dist, boundary


def _rasterise_nodules(
    hu: NDArray[np.float32],
    specs: Sequence[_NoduleSpec],
    xs: NDArray[np.float32],
    ys: NDArray[np.float32],
    depths: NDArray[np.float64],
) -> NDArray[np.uint16]:
    """Blend each nodule into ``hu`` (in place) and return the lesion-id map.

    Partial-volume occupancy ``o`` (0–1) mixes the nodule attenuation into the voxel; a voxel
    belongs to the nodule where ``o ≥ 0.5``. Part-solid nodules get a solid core; ground glass
    keeps some of the parenchymal texture underneath.
    """
    ps = float(xs[1] - xs[0])
    ids = np.zeros(hu.shape, np.uint16)
    for i, spec in enumerate(specs, start=1):
        got = _nodule_boxes(spec, xs, ys, depths)
        if got is None:
            continue
        box, dist, boundary = got
        o = np.clip((boundary - dist) / (0.6 * ps) + 0.5, 0.0, 1.0)
        h = hu[box]
        value = np.full(o.shape, spec.hu, np.float32)
        if spec.kind == "part-solid":
            core = np.clip((spec.core_fraction * boundary - dist) / (0.6 * ps) + 0.5, 0, 1)
            value += core * (np.float32(20.0) - value)
        if spec.kind != "solid":
            value += 0.15 * (h - value)
        hu[box] = h + o * (value - h)
        ids[box] = np.where(o >= 0.5, np.uint16(i), ids[box])
    return ids


def _lesion_records(
    specs: Sequence[_NoduleSpec],
    lesion_map: NDArray[np.uint16],
    origin: tuple[float, float],
    ps: float,
    z_positions: list[float],
    depths: NDArray[np.float64],
    st: float,
) -> list[Lesion]:
    out = []
    counts = np.bincount(lesion_map.ravel(), minlength=len(specs) + 1)
    for i, spec in enumerate(specs, start=1):
        zs = np.nonzero((lesion_map == i).any(axis=(1, 2)))[0] if counts[i] else np.array([])
        cz = (spec.center[2] - depths[0]) / st
        out.append(
            Lesion(
                lesion_id=i,
                center_voxel=(
                    round(float(cz), 3),
                    round(float((spec.center[1] - origin[1]) / ps), 3),
                    round(float((spec.center[0] - origin[0]) / ps), 3),
                ),
                center_mm=(
                    round(float(spec.center[0]), 2),
                    round(float(spec.center[1]), 2),
                    round(float(z_positions[0] - cz * st), 2),
                ),
                diameter_mm=round(2 * spec.radius, 2),
                kind=spec.kind,
                shape=spec.shape,
                location=spec.location,
                hu=round(spec.hu, 1),
                slices=(int(zs[0]), int(zs[-1])) if len(zs) else (-1, -1),
                voxels=int(counts[i]),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# DICOM output
# --------------------------------------------------------------------------------------------


def _uid(seed: int | None, *parts: object) -> str:
    from pydicom.uid import generate_uid

    if seed is None:
        return str(generate_uid())
    # Deterministic per (seed, role): regenerating the same demo data gives the same UIDs,
    # which the service recognises as an identical re-upload.
    return str(generate_uid(entropy_srcs=["medcad-phantom", str(seed), *map(str, parts)]))


def write_dicom_series(
    series: PhantomSeries,
    out_dir: str | Path,
    *,
    seed: int | None = None,
    series_number: int = 1,
) -> list[Path]:
    """Write a phantom as a CT Image Storage series (PS3.3 A.3) plus its ground truth.

    One Part-10 file per slice (``slice_0001.dcm`` …, Explicit VR Little Endian), with
    Image Plane attributes (PS3.3 C.7.6.2): Image Orientation (Patient) ``[1,0,0,0,1,0]``,
    Image Position (Patient) of the first transmitted pixel, Pixel Spacing as
    (row spacing, column spacing); CT Image attributes (PS3.3 C.8.2.1): stored values are
    HU + 1024 (unsigned), Rescale Intercept −1024, Rescale Slope 1, Rescale Type HU.
    Beside them: ``labels.npy`` (uint8 (Z, 512, 512), row k ↔ Instance Number k + 1) and
    ``lesions.json``.

    Returns the paths of the DICOM files, in slice order.
    """
    from pydicom.dataset import Dataset as _Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = series.seed if seed is None else seed
    study_uid = _uid(seed, "study")
    series_uid = _uid(seed, "series", series_number)
    frame_uid = _uid(seed, "frame-of-reference")
    date = (_dt.date(2024, 1, 1) + _dt.timedelta(days=(seed or 0) % 365)).strftime("%Y%m%d")
    stored = (series.hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
    rows, cols = series.hu.shape[1:]
    paths: list[Path] = []
    for k in range(series.n_slices):
        sop_uid = _uid(seed, "instance", series_number, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = _Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "medcad synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "SYNTHETIC PHANTOM CHEST CT - NOT A PATIENT"
        ds.SeriesDescription = "Synthetic phantom, lung kernel"
        ds.PatientName = f"PHANTOM^SYNTHETIC^{seed if seed is not None else 'X'}"
        ds.PatientID = f"PHANTOM-{seed if seed is not None else 'X'}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.PatientIdentityRemoved = "YES"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{series.slice_thickness:g}"
        ds.SpacingBetweenSlices = f"{series.slice_thickness:g}"
        ds.KVP = "120"
        ds.ConvolutionKernel = "LUNG"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [
            f"{series.origin[0]:.4f}",
            f"{series.origin[1]:.4f}",
            f"{series.z_positions[k]:.4f}",
        ]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{series.z_positions[k]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [f"{series.pixel_spacing[0]:.4f}", f"{series.pixel_spacing[1]:.4f}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = ["-600", "40"]
        ds.WindowWidth = ["1500", "400"]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        path = out / f"slice_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    np.save(out / "labels.npy", series.labels)
    (out / "lesions.json").write_text(json.dumps(_series_json(series, series_uid), indent=2))
    return paths


def _series_json(series: PhantomSeries, series_uid: str) -> dict[str, Any]:
    return {
        "series_instance_uid": series_uid,
        "seed": series.seed,
        "labels": {"0": "background", "1": "lung", "2": "nodule"},
        "labels_file": "labels.npy",
        "labels_order": "labels[k] is the slice with InstanceNumber k + 1 (slice_{k+1:04d}.dcm)",
        "pixel_spacing_mm": list(series.pixel_spacing),
        "slice_thickness_mm": series.slice_thickness,
        "n_slices": series.n_slices,
        "meta": series.meta,
        "lesions": [asdict(les) for les in series.lesions],
    }


def write_demo_data(
    out_dir: str | Path, n: int = 3, seed: int = 0, n_slices: int = 40
) -> list[Path]:
    """Write ``n`` phantom series as DICOM folders ``series_000`` … under ``out_dir``.

    Series ``i`` is generated from seed ``seed * 1000 + i``, so runs are reproducible and
    the same series is identical whatever ``n`` is. Returns the series folders.
    """
    root = Path(out_dir)
    folders = []
    for i in range(n):
        s = seed * 1000 + i
        series = generate_series(s, n_slices=n_slices)
        folder = root / f"series_{i:03d}"
        write_dicom_series(series, folder, seed=s)
        folders.append(folder)
    return folders
