"""Shared pieces of the DICOM result builders."""

from __future__ import annotations

import re

import numpy as np
import pytest
from pydicom.sr.codedict import codes

from app.registry.manifest import Code, Label
from workers.outputs.dicom_common import (
    NOT_FOR_CLINICAL_USE,
    derived_uid,
    label_codes,
    new_uid,
    series_description,
    slice_normal,
    sort_by_position,
    source_frame_count,
)

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@pytest.mark.parametrize(
    ("model_name", "model_version"),
    [
        ("lung-unet", "1.0.0"),
        ("a-very-long-model-name-that-goes-on-and-on" * 2, "2026.11.25+build7"),
    ],
)
def test_series_description_always_carries_the_warning(model_name, model_version):
    text = series_description("SEG", model_name, model_version)
    assert text.endswith(NOT_FOR_CLINICAL_USE)
    assert text.startswith("SEG ")
    assert len(text) <= 64  # LO


def test_derived_uids_are_stable_valid_and_distinct():
    first = derived_uid("job-1", "lung-unet:1.0.0", "SEG")
    assert first == derived_uid("job-1", "lung-unet:1.0.0", "SEG")
    assert first != derived_uid("job-1", "lung-unet:1.0.0", "SR")
    assert first != derived_uid("job-2", "lung-unet:1.0.0", "SEG")
    for uid in (first, new_uid(), new_uid()):
        assert UID_PATTERN.match(uid) and len(uid) <= 64 and uid.startswith("2.25.")
    assert new_uid() != new_uid()


@pytest.mark.parametrize(
    ("orientation", "normal"),
    [
        ((1, 0, 0, 0, 1, 0), (0, 0, 1)),
        ((-1, 0, 0, 0, -1, 0), (0, 0, 1)),
        ((1, 0, 0, 0, -1, 0), (0, 0, -1)),
        ((1, 0, 0, 0, 0, -1), (0, 1, 0)),  # coronal
    ],
)
def test_slice_normal(orientation, normal):
    np.testing.assert_allclose(slice_normal(orientation), normal, atol=1e-12)


def test_slice_normal_rejects_degenerate_orientation():
    with pytest.raises(ValueError, match="parallel"):
        slice_normal((1, 0, 0, 1, 0, 0))


@pytest.mark.parametrize(
    ("orientation", "order"),
    [
        ((1, 0, 0, 0, 1, 0), [3, 0, 4, 1, 2]),
        ((-1, 0, 0, 0, -1, 0), [4, 0, 2, 1, 3]),
        ((1, 0, 0, 0, -1, 0), [2, 4, 0, 3, 1]),  # normal is -z: z decreases along it
        ((0.8, 0.6, 0, 0, 0, -1), [1, 3, 0, 4, 2]),
    ],
)
def test_sort_by_position_recovers_acquisition_order(ct_series_factory, orientation, order):
    uploaded = ct_series_factory(
        n=5, rows=8, columns=8, orientation=orientation, upload_order=order
    )
    ranked = sort_by_position(uploaded)
    # Acquisition order k was placed at origin + k * step * normal, so sorting along the
    # normal must give back k = 0, 1, 2, ...
    assert [order[i] for i in ranked] == [0, 1, 2, 3, 4]
    normal = slice_normal(orientation)
    distances = [float(np.dot(uploaded[i].ImagePositionPatient, normal)) for i in ranked]
    assert distances == sorted(distances)


def test_sort_by_position_rejects_mixed_orientations(ct_series_factory):
    a = ct_series_factory(n=2, rows=8, columns=8)
    b = ct_series_factory(n=2, rows=8, columns=8, orientation=(1, 0, 0, 0, 0, -1))
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        sort_by_position(a + b)


def test_label_codes_prefer_the_manifest_then_fall_back():
    coded = Label(
        value=1,
        name="lesion",
        category=Code(scheme="SCT", value="49755003", meaning="Morphologically Abnormal Structure"),
        type=Code(scheme="SCT", value="108369006", meaning="Neoplasm"),
    )
    category, prop_type = label_codes(coded)
    assert (category.value, prop_type.value) == ("49755003", "108369006")
    assert label_codes(Label(value=2, name="lung_nodule")) == (
        codes.SCT.MorphologicallyAbnormalStructure,
        codes.SCT.Nodule,
    )
    assert label_codes(Label(value=1, name="left-lung"))[1] == codes.SCT.Lung
    assert label_codes(Label(value=3, name="something")) == (codes.SCT.Tissue, codes.SCT.Tissue)


def test_source_frame_count(ct_series_factory, ct_small, enhanced_ct):
    assert source_frame_count(ct_series_factory(n=4, rows=8, columns=8)) == 4
    assert source_frame_count([ct_small]) == 1
    assert source_frame_count([enhanced_ct]) == int(enhanced_ct.NumberOfFrames)
    with pytest.raises(ValueError, match="only source"):
        source_frame_count([enhanced_ct, ct_small])
    with pytest.raises(ValueError, match="at least one"):
        source_frame_count([])
