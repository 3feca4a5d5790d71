"""Connected-component clean-up of segmentations: the rule, its manifest section, its geometry."""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from app.registry.manifest import Manifest
from workers.analysis import analyze_series, structure_rules
from workers.pipeline import postprocess as pp
from workers.series import slice_spacing

NODULE, LUNG = 2, 1


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """Lung everywhere; a 3×3×3 confident nodule, a 1-voxel one and a 2×2×2 weak one."""
    labels = np.full((5, 16, 16), LUNG, np.uint8)
    prob = np.zeros(labels.shape, np.float32)
    labels[1:4, 2:5, 2:5] = NODULE
    prob[1:4, 2:5, 2:5] = 0.6
    prob[2, 3, 3] = 0.97  # the big one's peak
    labels[0, 12, 12] = NODULE
    prob[0, 12, 12] = 0.99  # tiny but confident
    labels[3:5, 10:12, 2:4] = NODULE
    prob[3:5, 10:12, 2:4] = 0.55  # medium but weak
    return labels, prob


def _nodules(labels: np.ndarray, prob: np.ndarray, **rule: Any) -> pp.ComponentMap:
    """``filter_components`` of the nodule label, removed voxels becoming lung."""
    return pp.filter_components(labels, prob, value=NODULE, replacement=LUNG, **rule)


def test_components_are_found_in_3d_and_scored_by_their_peak() -> None:
    labels, prob = _volume()
    result = _nodules(labels, prob, voxel_mm3=2.0)
    assert np.array_equal(result.labels, labels)  # no thresholds: nothing removed
    found = sorted((c.voxels, c.frames, round(c.max_probability, 2)) for c in result.components)
    assert found == [(1, (0, 0), 0.99), (8, (3, 4), 0.55), (27, (1, 3), 0.97)]
    assert all(c.kept for c in result.components)
    assert {c.volume_mm3 for c in result.components} == {2.0, 16.0, 54.0}
    assert set(np.unique(result.ids)) == {0, 1, 2, 3}


def test_components_know_their_centre_key_frame_and_equivalent_diameter() -> None:
    labels = np.zeros((4, 16, 16), np.uint8)
    labels[1, 4:6, 4:6] = NODULE  # 4 voxels on frame 1
    labels[2, 3:7, 3:9] = NODULE  # 24 on frame 2: the key frame
    labels[3, 4:6, 5:7] = NODULE  # 4 on frame 3
    (c,) = _nodules(labels, labels / 2.0, voxel_mm3=0.5).components
    assert c.key_frame == 2 and c.frames == (1, 3)
    f, r, col = c.centroid
    rows, cols, frames = np.nonzero(labels.transpose(1, 2, 0))
    assert (f, r, col) == pytest.approx((frames.mean(), rows.mean(), cols.mean()))
    assert c.equivalent_diameter_mm == pytest.approx((6 * 32 * 0.5 / np.pi) ** (1 / 3))
    unknown = _nodules(labels, labels / 2.0, voxel_mm3=None).components[0]
    assert unknown.equivalent_diameter_mm is None


def test_diagonal_neighbours_across_slices_are_one_component() -> None:
    labels = np.zeros((2, 4, 4), np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = NODULE
    result = pp.filter_components(labels, labels / 2.0, value=NODULE, replacement=0, voxel_mm3=1)
    assert [c.voxels for c in result.components] == [2]


def test_small_and_weak_components_become_the_replacement_label() -> None:
    labels, prob = _volume()
    result = _nodules(labels, prob, voxel_mm3=2.0, min_volume_mm3=10.0, min_probability=0.9)
    kept = [c for c in result.components if c.kept]
    assert [c.voxels for c in kept] == [27]
    assert int((result.labels == NODULE).sum()) == 27
    assert result.labels[0, 12, 12] == LUNG and result.labels[4, 11, 3] == LUNG
    assert int((result.labels == LUNG).sum()) == labels.size - 27  # nothing else changed
    assert (labels == NODULE).sum() == 36  # the input is not modified


def test_unknown_geometry_applies_only_the_probability_rule() -> None:
    labels, prob = _volume()
    result = _nodules(labels, prob, voxel_mm3=None, min_volume_mm3=1e6, min_probability=0.9)
    assert sorted(c.voxels for c in result.components if c.kept) == [1, 27]
    assert all(c.volume_mm3 is None for c in result.components)


def test_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match="must be equal"):
        pp.filter_components(
            np.zeros((2, 4, 4), np.uint8),
            np.zeros((2, 4, 5)),
            value=1,
            replacement=0,
            voxel_mm3=1.0,
        )


def test_segment_is_argmax_then_the_rules_in_order() -> None:
    labels, prob = _volume()
    probs = np.stack([np.zeros_like(prob), 1 - prob, prob], axis=1)  # (F, 3, H, W)
    probs[:, 1][labels == LUNG] = 0.9
    probs[:, 2][labels == LUNG] = 0.1
    plain = pp.segment(probs)
    assert np.array_equal(plain.labels, labels) and plain.components == {}
    rule = pp.StructureRule(value=NODULE, replacement=LUNG, min_volume_mm3=0.0, min_probability=0.9)
    cleaned = pp.segment(probs, [rule], voxel_mm3=1.0)
    assert int((cleaned.labels == NODULE).sum()) == 28  # the 27-voxel and the 1-voxel ones
    assert len(cleaned.components[NODULE].components) == 3


def test_resize_nearest_keeps_the_dtype_of_component_ids() -> None:
    ids = np.arange(4, dtype=np.int32).reshape(1, 2, 2) * 1000
    out = pp.resize_nearest(ids, (4, 4))
    assert out.dtype == np.int32 and out.shape == (1, 4, 4)
    assert out[0, 3, 3] == 3000 and out[0, 0, 1] == 0


def _segmenter(components: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "seg",
        "version": "1",
        "task": "segmentation",
        "sha256": "0" * 64,
        "inputs": [{"name": "x", "shape": ["N", 1, 16, 16]}],
        "outputs": [{"name": "y", "shape": ["N", 3, 16, 16], "role": "logits"}],
        "preprocessing": {"window": {"center": 0, "width": 100}, "size": [16, 16]},
        "labels": [
            {"value": 0, "name": "background"},
            {"value": 1, "name": "lung"},
            {"value": 2, "name": "nodule"},
        ],
        "saliency": {"methods": []},
        "components": components,
    }


def test_manifest_component_rules_name_existing_labels() -> None:
    rule = {"label": "nodule", "replace_with": "lung", "min_volume_mm3": 30, "min_probability": 0.7}
    manifest = Manifest.model_validate(_segmenter([rule]))
    assert structure_rules(manifest) == [pp.StructureRule(2, 1, 30.0, 0.7)]
    with pytest.raises(ValidationError, match="not a label"):
        Manifest.model_validate(_segmenter([dict(rule, label="tumour")]))
    with pytest.raises(ValidationError):
        Manifest.model_validate(_segmenter([dict(rule, min_probability=1.5)]))


def test_workers_serve_the_filtered_mask_with_physical_volumes() -> None:
    """Through analyze_series: the 8-voxel nodule (8 mm³ at 1 mm voxels) goes, 27 stays."""
    labels, prob = _volume()
    logits = np.stack(
        [
            np.full_like(prob, -9),
            np.where(labels == LUNG, 3.0, 0.0),
            np.where(labels == NODULE, 6.0, -3.0),
        ],
        axis=1,
    ).astype(np.float32)
    rule = {"label": "nodule", "replace_with": "lung", "min_volume_mm3": 10.0}
    manifest = Manifest.model_validate(_segmenter([rule]))

    def run(names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [logits[: len(feeds["x"])]]

    frames = np.zeros((5, 32, 32), np.float32)  # source 32×32: one grid voxel is 4 source pixels
    result = analyze_series(run, manifest, frames, max_forward_passes=0, voxel_mm3=0.25)
    seg = result.segmentation
    assert seg is not None
    kept = sorted(c.voxels for c in seg.components["nodule"] if c.kept)
    assert kept == [27]
    assert int((seg.labels == NODULE).sum()) == 27 * 4
    # the kept nodule is one lesion, its centre moved from the 16-grid to 32 source pixels
    (lesion,) = seg.lesions
    assert (lesion.structure, lesion.number, lesion.frames, lesion.key_frame) == (
        "nodule", 1, (1, 3), 1,
    )
    assert lesion.volume_mm3 == pytest.approx(27.0)  # 27 grid voxels of 4 × 0.25 mm³
    # grid pixels 2..4 (centre 3) cover source pixels 4..9 (centre 6.5)
    assert lesion.centroid == pytest.approx((2.0, 6.5, 6.5))
    assert lesion.max_probability == pytest.approx(
        np.exp(6.0) / (np.exp(6.0) + np.exp(0.0) + np.exp(-9.0))
    )
    no_geometry = analyze_series(run, manifest, frames, max_forward_passes=0)
    assert no_geometry.segmentation is not None
    assert int((no_geometry.segmentation.labels == NODULE).sum()) == 36 * 4


def _header(**values: Any) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def test_slice_spacing_from_positions_then_the_header() -> None:
    assert slice_spacing([0.0, 2.5, 5.0, 7.5], _header(SliceThickness="1")) == 2.5
    assert slice_spacing([7.5, 5.0, 0.0, 2.5], _header()) == 2.5  # order does not matter
    # a duplicate or unknown position: the header decides
    assert slice_spacing([0.0, 0.0], _header(SliceThickness="3")) == 3.0
    assert slice_spacing([None], _header(SpacingBetweenSlices="1.25", SliceThickness="3")) == 1.25
    assert slice_spacing([1.0], _header()) is None
    malformed = _header()  # as read from a file: converted (and failing) only when accessed
    malformed[0x00180050] = RawDataElement(Tag(0x00180050), "DS", 6, b"bogus ", 0, True, True)
    assert slice_spacing([1.0], malformed) is None


def test_structure_occlusion_explains_every_lesion_before_larger_cross_sections() -> None:
    """Budget for two frames: the big lesion's key frame, then the small lesion's — not the big
    lesion's other frames, though their nodule area is larger."""
    labels = np.full((5, 16, 16), LUNG, np.uint8)
    labels[0:3, 2:6, 2:6] = NODULE  # 16 pixels on each of frames 0–2
    labels[1, 2:7, 2:7] = NODULE  # frame 1 is its largest cross-section
    labels[4, 10:12, 10:12] = NODULE  # a second, small lesion on frame 4
    logits = np.stack(
        [np.full(labels.shape, -9.0), np.where(labels == LUNG, 3.0, 0.0),
         np.where(labels == NODULE, 6.0, -3.0)], axis=1,
    ).astype(np.float32)
    manifest = Manifest.model_validate(
        dict(
            _segmenter([{"label": "nodule", "replace_with": "lung"}]),
            saliency={"methods": ["occlusion"], "target_label": "nodule",
                      "occlusion_patch": 8, "occlusion_stride": 8},
        )
    )

    def run(names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(feeds["x"])
        return [logits[:n] if n == len(logits) else np.repeat(logits[1:2], n, axis=0)]

    frames = np.zeros((5, 16, 16), np.float32)
    one_frame = analyze_series(run, manifest, frames, max_forward_passes=5)
    assert one_frame.segmentation is not None
    assert [m.index for m in one_frame.segmentation.saliency] == [1]
    two_frames = analyze_series(run, manifest, frames, max_forward_passes=10)
    assert two_frames.segmentation is not None
    assert [m.index for m in two_frames.segmentation.saliency] == [1, 4]
    assert [(les.number, les.key_frame) for les in two_frames.segmentation.lesions] == [(1, 1), (2, 4)]
