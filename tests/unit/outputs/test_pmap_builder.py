"""Parametric Map builder: real-world value mapping, IOD validity and frame order."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.uid import ParametricMapStorage

from tests.helpers.dciodvfy import dciodvfy_errors, dciodvfy_report
from workers.outputs.dicom_common import NOT_FOR_CLINICAL_USE, encode
from workers.outputs.dicom_pmap import build_parametric_map

MODEL = {"model_name": "nodule-cls", "model_version": "0.3.1"}


def reread(dataset: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(encode(dataset)))


def saliency_maps(frames: int, rows: int, columns: int, seed: int = 3) -> np.ndarray:
    """float32 maps in [0, 1] whose every frame is different (a ramp plus noise)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, rows * columns, dtype=np.float32).reshape(rows, columns)
    maps = np.stack([np.roll(ramp, 5 * i, axis=1) for i in range(frames)])
    noise = rng.random(maps.shape, dtype=np.float32) * 0.01
    return np.clip(maps * 0.98 + noise, 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize(
    ("orientation", "order"),
    [
        ((1, 0, 0, 0, 1, 0), [0, 1, 2, 3, 4, 5]),
        ((-1, 0, 0, 0, -1, 0), [3, 5, 0, 2, 4, 1]),
    ],
    ids=["axial-sorted", "negative-cosines-unsorted"],
)
def test_pmap_frames_follow_their_source_slices(
    orientation, order, ct_series_factory, source_frames_of, frame_reference_of
):
    sources = ct_series_factory(n=6, orientation=orientation, upload_order=order)
    maps = saliency_maps(6, 64, 64)
    pm = reread(build_parametric_map(sources, maps, method="cam", value_range=(0.0, 1.0), **MODEL))

    table = source_frames_of(sources)
    pixels = pm.pixel_array.reshape(int(pm.NumberOfFrames), int(pm.Rows), int(pm.Columns))
    assert pixels.dtype == np.float32
    assert int(pm.NumberOfFrames) == len(sources)
    seen = set()
    for k, item in enumerate(pm.PerFrameFunctionalGroupsSequence):
        index, source_position = table[frame_reference_of(item)]
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            source_position,
            atol=1e-4,
        )
        np.testing.assert_array_equal(pixels[k], maps[index])
        seen.add(index)
    assert seen == set(range(len(sources)))
    iop = pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in iop], orientation, atol=1e-6)
    measures = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    np.testing.assert_allclose([float(v) for v in measures.PixelSpacing], sources[0].PixelSpacing)


def test_pmap_fields(ct_series_factory, identity, site_values):
    sources = ct_series_factory(
        n=6, orientation=(-1, 0, 0, 0, -1, 0), upload_order=[2, 0, 5, 1, 3, 4]
    )
    pm = reread(
        build_parametric_map(
            sources,
            saliency_maps(6, 64, 64),
            method="cam",
            value_range=(0.0, 1.0),
            series_number=31,
            **MODEL,
        )
    )

    assert pm.SOPClassUID == ParametricMapStorage
    assert pm.Manufacturer == "medcad"
    assert NOT_FOR_CLINICAL_USE in pm.SeriesDescription
    assert "cam" in pm.SeriesDescription and "nodule-cls" in pm.SeriesDescription
    assert pm.SeriesNumber == 31
    assert pm.StudyInstanceUID == sources[0].StudyInstanceUID
    assert pm.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert pm.BitsAllocated == 32 and "FloatPixelData" in pm
    assert pm.ContentDescription == NOT_FOR_CLINICAL_USE
    assert pm.ManufacturerModelName == "nodule-cls" and pm.SoftwareVersions == "0.3.1"
    for key, value in identity.items():
        assert str(pm[key].value) == value, key
    strings = [str(e.value) for e in pm.iterall() if e.VR in {"LO", "SH", "PN", "ST", "LT"}]
    for value in site_values:
        assert value not in strings

    shared = pm.SharedFunctionalGroupsSequence[0]
    (mapping,) = shared.RealWorldValueMappingSequence
    assert mapping.LUTLabel == "CAM"
    assert "nodule-cls 0.3.1" in mapping.LUTExplanation
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert mapping.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    assert float(mapping.DoubleFloatRealWorldValueFirstValueMapped) == 0.0
    assert float(mapping.DoubleFloatRealWorldValueLastValueMapped) == 1.0
    assert (float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)) == (
        1.0,
        0.0,
    )
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("130402", "DCM")
    assert quantity.CodeMeaning == "Class activation"
    voi = shared.FrameVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (0.5, 1.0)
    assert voi.WindowCenterWidthExplanation == "cam display range"

    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in pm.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}


@pytest.mark.parametrize(
    ("method", "code"),
    [("occlusion", "130404"), ("rise", "130404"), ("tta_std", "386136009"), ("entropy", None)],
)
def test_pmap_quantity_per_method(ct_series_factory, method, code):
    sources = ct_series_factory(n=2)
    pm = build_parametric_map(
        sources, saliency_maps(2, 64, 64), method=method, value_range=(0.0, 1.0), **MODEL
    )
    (mapping,) = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    assert mapping.LUTLabel == method.upper()
    if code is None:
        assert "QuantityDefinitionSequence" not in mapping
    else:
        assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == code


@pytest.mark.parametrize("source", ["generated", "ct_small", "enhanced_ct"])
def test_pmap_is_valid(source, ct_series_factory, ct_small, request):
    if source == "generated":
        sources = ct_series_factory(
            n=6, orientation=(-1, 0, 0, 0, -1, 0), upload_order=[5, 3, 1, 0, 2, 4]
        )
    elif source == "ct_small":
        sources = [ct_small]
    else:
        sources = [request.getfixturevalue("enhanced_ct")]
    frames = len(sources) if len(sources) > 1 else int(sources[0].get("NumberOfFrames", 1))
    maps = saliency_maps(frames, int(sources[0].Rows), int(sources[0].Columns))
    pm = build_parametric_map(sources, maps, method="occlusion", value_range=(0.0, 1.0), **MODEL)

    assert dciodvfy_errors(pm) == []
    assert dciodvfy_report(pm).splitlines()[0] == "ParametricMap"
    back = reread(pm)
    assert int(back.NumberOfFrames) == frames
    # float32 values survive the round trip bit for bit (as a set: frames may be reordered).
    stored = back.pixel_array.reshape(maps.shape)
    assert sorted(f.tobytes() for f in stored) == sorted(f.tobytes() for f in maps)


def test_pmap_of_multiframe_source_keeps_frame_order(
    enhanced_ct, source_frames_of, frame_reference_of
):
    frames = int(enhanced_ct.NumberOfFrames)
    maps = saliency_maps(frames, int(enhanced_ct.Rows), int(enhanced_ct.Columns))
    pm = reread(
        build_parametric_map([enhanced_ct], maps, method="cam", value_range=(0.0, 1.0), **MODEL)
    )
    table = source_frames_of([enhanced_ct])
    pixels = pm.pixel_array.reshape(frames, int(pm.Rows), int(pm.Columns))
    references = []
    for k, item in enumerate(pm.PerFrameFunctionalGroupsSequence):
        reference = frame_reference_of(item)
        index, position = table[reference]
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            position,
            atol=1e-4,
        )
        np.testing.assert_array_equal(pixels[k], maps[index])
        references.append(reference[1])
    assert sorted(references) == [1, 2]


@pytest.mark.parametrize(
    ("maps", "value_range", "message"),
    [
        (np.zeros((6, 64, 64), np.float64), (0.0, 1.0), "float32"),
        (np.zeros((5, 64, 64), np.float32), (0.0, 1.0), "shape"),
        (np.full((6, 64, 64), np.nan, np.float32), (0.0, 1.0), "NaN"),
        (np.zeros((6, 64, 64), np.float32), (1.0, 1.0), "low < high"),
    ],
)
def test_pmap_rejects_bad_input(ct_series_factory, maps, value_range, message):
    sources = ct_series_factory(n=6)
    with pytest.raises(ValueError, match=message):
        build_parametric_map(sources, maps, method="cam", value_range=value_range, **MODEL)
