"""DICOM Segmentation builder: content, IOD validity (dciodvfy) and geometry round trip."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import SegmentationStorage

from tests.helpers.dciodvfy import dciodvfy_errors, dciodvfy_report
from workers.outputs.dicom_common import NOT_FOR_CLINICAL_USE, encode
from workers.outputs.dicom_seg import build_segmentation

MODEL = {"model_name": "lung-unet", "model_version": "1.2.0"}

# (orientation, upload order) of the generated 7-slice series used in the geometry tests.
GEOMETRIES = {
    "axial-sorted": ((1, 0, 0, 0, 1, 0), [0, 1, 2, 3, 4, 5, 6]),
    "negative-cosines-unsorted": ((-1, 0, 0, 0, -1, 0), [4, 0, 6, 2, 5, 1, 3]),
    "normal-minus-z-reversed": ((1, 0, 0, 0, -1, 0), [6, 5, 4, 3, 2, 1, 0]),
    "oblique-unsorted": ((0.8, 0.6, 0, 0, 0, -1), [2, 6, 0, 3, 1, 5, 4]),
}


def reread(dataset: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(encode(dataset)))


def all_string_values(dataset: pydicom.Dataset) -> list[str]:
    values: list[str] = []
    for element in dataset.iterall():
        if element.VR in {"LO", "SH", "PN", "ST", "LT", "UT"} and element.value is not None:
            raw = element.value if element.VM > 1 else [element.value]
            values.extend(str(v) for v in raw)
    return values


def assert_matches_sources(
    seg: pydicom.Dataset,
    sources: list[pydicom.Dataset],
    label_maps: np.ndarray,
    segment_values: dict[int, int],
    source_frames_of,
    frame_reference_of,
) -> None:
    """Every SEG frame sits on, and holds the mask of, the source frame it references."""
    table = source_frames_of(sources)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    shared = seg.SharedFunctionalGroupsSequence[0]
    source_iop = (
        sources[0].ImageOrientationPatient
        if "ImageOrientationPatient" in sources[0]
        else sources[0]
        .SharedFunctionalGroupsSequence[0]
        .PlaneOrientationSequence[0]
        .ImageOrientationPatient
    )
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in source_iop],
        atol=1e-6,
    )
    seen = set()
    for k, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        index, source_position = table[frame_reference_of(item)]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, source_position, atol=1e-4)
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        expected = label_maps[index] == segment_values[segment]
        np.testing.assert_array_equal(pixels[k].astype(bool), expected)
        seen.add((index, segment))
    nonempty = {
        (i, s)
        for s, v in segment_values.items()
        for i in range(len(label_maps))
        if np.any(label_maps[i] == v)
    }
    assert seen == nonempty


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_seg_frames_land_on_the_slices_they_reference(
    name, ct_series_factory, labels, label_maps_factory, source_frames_of, frame_reference_of
):
    orientation, order = GEOMETRIES[name]
    sources = ct_series_factory(orientation=orientation, upload_order=order)
    label_maps = label_maps_factory((len(sources), 64, 64))
    seg = reread(build_segmentation(sources, label_maps, labels, series_number=50, **MODEL))

    assert_matches_sources(
        seg, sources, label_maps, {1: 1, 2: 2}, source_frames_of, frame_reference_of
    )
    # Frames of one segment run along the slice normal, as 3D readers expect.
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    for segment in (1, 2):
        distances = [
            float(
                np.dot(
                    np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float), normal
                )
            )
            for item in seg.PerFrameFunctionalGroupsSequence
            if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == segment
        ]
        assert distances in (sorted(distances), sorted(distances, reverse=True))
        assert len(set(distances)) == len(distances)
    # A second, independent reader agrees: highdicom's per-source-instance lookup.
    reader = hd.seg.Segmentation.from_dataset(seg)
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    volume = reader.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    np.testing.assert_array_equal(volume[..., 0].astype(bool), label_maps == 1)
    np.testing.assert_array_equal(volume[..., 1].astype(bool), label_maps == 2)


def test_seg_fields(ct_series_factory, labels, label_maps_factory, identity, site_values):
    sources = ct_series_factory(
        orientation=(-1, 0, 0, 0, -1, 0), upload_order=[3, 1, 6, 0, 2, 5, 4]
    )
    label_maps = label_maps_factory((7, 64, 64))
    seg = reread(
        build_segmentation(
            sources, label_maps, labels, series_number=77, instance_number=3, **MODEL
        )
    )

    assert seg.SOPClassUID == SegmentationStorage
    assert seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.Manufacturer == "medcad"
    assert NOT_FOR_CLINICAL_USE in seg.SeriesDescription
    assert "lung-unet" in seg.SeriesDescription and "1.2.0" in seg.SeriesDescription
    assert (seg.SeriesNumber, seg.InstanceNumber) == (77, 3)
    # New series in the source study.
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    for key, value in identity.items():
        assert str(seg[key].value) == value, key
    # Identity of the patient and study only: nothing about the site or its staff.
    strings = all_string_values(seg)
    for value in site_values:
        assert value not in strings

    segments = seg.SegmentSequence
    assert [int(s.SegmentNumber) for s in segments] == [1, 2]
    assert [s.SegmentLabel for s in segments] == ["lung", "nodule"]
    lung, nodule = segments
    assert (
        lung.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        lung.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
    ) == ("39607008", "SCT")
    assert lung.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    # No codes in the manifest: SNOMED CT fallbacks.
    assert nodule.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"  # Nodule
    assert nodule.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    for segment in segments:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == "lung-unet"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "lung-unet"
        assert algorithm.AlgorithmVersion == "1.2.0"
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        assert family.CodeMeaning == "Artificial Intelligence"
    assert "RecommendedDisplayCIELabValue" in lung

    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID


def test_seg_ct_small_is_valid(ct_small, labels):
    label_maps = np.zeros((1, ct_small.Rows, ct_small.Columns), np.uint8)
    label_maps[0, 20:90, 15:60] = 1
    label_maps[0, 40:48, 70:80] = 2
    seg = build_segmentation([ct_small], label_maps, labels, **MODEL)

    assert dciodvfy_errors(seg) == []
    assert dciodvfy_report(seg).splitlines()[0] == "Segmentation"
    back = reread(seg)
    assert int(back.NumberOfFrames) == 2
    assert back.PatientID == ct_small.PatientID
    assert "JFK IMAGING CENTER" not in all_string_values(back)


@pytest.mark.parametrize("name", ["axial-sorted", "negative-cosines-unsorted"])
def test_seg_of_generated_series_is_valid(name, ct_series_factory, labels, label_maps_factory):
    orientation, order = GEOMETRIES[name]
    sources = ct_series_factory(orientation=orientation, upload_order=order)
    seg = build_segmentation(sources, label_maps_factory((7, 64, 64)), labels, **MODEL)
    assert dciodvfy_errors(seg) == []


def test_seg_of_multiframe_source(enhanced_ct, labels, source_frames_of, frame_reference_of):
    frames = int(enhanced_ct.NumberOfFrames)
    label_maps = np.zeros((frames, enhanced_ct.Rows, enhanced_ct.Columns), np.uint8)
    label_maps[0, 100:300, 120:260] = 1
    label_maps[1, 200:240, 200:230] = 2
    label_maps[1, 10:50, 10:50] = 1
    seg = build_segmentation([enhanced_ct], label_maps, labels, **MODEL)

    assert dciodvfy_errors(seg) == []
    back = reread(seg)
    assert_matches_sources(
        back, [enhanced_ct], label_maps, {1: 1, 2: 2}, source_frames_of, frame_reference_of
    )
    references = {frame_reference_of(item) for item in back.PerFrameFunctionalGroupsSequence}
    assert references == {
        (str(enhanced_ct.SOPInstanceUID), 1),
        (str(enhanced_ct.SOPInstanceUID), 2),
    }


def test_seg_absent_segment_is_described_without_frames(
    ct_series, labels, label_maps_factory, source_frames_of, frame_reference_of
):
    label_maps = label_maps_factory((7, 64, 64))
    label_maps[label_maps == 2] = 0  # no nodule anywhere
    seg = build_segmentation(ct_series, label_maps, labels, **MODEL)

    assert dciodvfy_errors(seg) == []
    back = reread(seg)
    assert [s.SegmentLabel for s in back.SegmentSequence] == ["lung", "nodule"]
    numbers = {
        int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for item in back.PerFrameFunctionalGroupsSequence
    }
    assert numbers == {1}
    assert int(back.NumberOfFrames) == int(np.sum(np.any(label_maps == 1, axis=(1, 2))))
    assert_matches_sources(
        back, ct_series, label_maps, {1: 1, 2: 2}, source_frames_of, frame_reference_of
    )


def test_seg_all_background_keeps_one_empty_frame_per_segment(
    ct_series_factory, labels, source_frames_of, frame_reference_of
):
    orientation, order = GEOMETRIES["negative-cosines-unsorted"]
    sources = ct_series_factory(orientation=orientation, upload_order=order)
    label_maps = np.zeros((7, 64, 64), np.uint8)
    seg = build_segmentation(sources, label_maps, labels, **MODEL)

    assert dciodvfy_errors(seg) == []
    back = reread(seg)
    assert int(back.NumberOfFrames) == 2
    assert not np.any(back.pixel_array)
    assert [s.SegmentLabel for s in back.SegmentSequence] == ["lung", "nodule"]
    # The frames sit on the first slice in acquisition order, i.e. along the normal.
    first_slice = str(sources[order.index(0)].SOPInstanceUID)
    table = source_frames_of(sources)
    for item in back.PerFrameFunctionalGroupsSequence:
        reference = frame_reference_of(item)
        assert reference == (first_slice, None)
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            table[reference][1],
            atol=1e-4,
        )
    # Every slice is still referenced as a source.
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in back.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}


def test_seg_non_contiguous_label_values(ct_series, label_maps_factory, labels):
    # Label values 0, 3, 7: segments are renumbered 1, 2 in value order.
    relabelled = [
        labels[0],
        labels[1].model_copy(update={"value": 3}),
        labels[2].model_copy(update={"value": 7}),
    ]
    base = label_maps_factory((7, 64, 64))
    label_maps = np.select([base == 1, base == 2], [3, 7], 0).astype(np.uint8)
    back = reread(build_segmentation(ct_series, label_maps, relabelled, **MODEL))
    reader = hd.seg.Segmentation.from_dataset(back)
    uids = [str(ds.SOPInstanceUID) for ds in ct_series]
    volume = reader.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    np.testing.assert_array_equal(volume[..., 0].astype(bool), label_maps == 3)
    np.testing.assert_array_equal(volume[..., 1].astype(bool), label_maps == 7)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.astype(np.int64), "uint8"),
        (lambda m: m[:-1], "shape"),
        (lambda m: m[:, :32], "shape"),
        (lambda m: np.where(m == 2, 5, m).astype(np.uint8), r"\[5\]"),
    ],
)
def test_seg_rejects_inconsistent_label_maps(
    ct_series, labels, label_maps_factory, mutate, message
):
    label_maps = mutate(label_maps_factory((7, 64, 64)))
    with pytest.raises(ValueError, match=message):
        build_segmentation(ct_series, label_maps, labels, **MODEL)


def test_seg_rejects_sources_from_two_series(ct_series_factory, labels):
    mixed = ct_series_factory(n=3) + ct_series_factory(n=3)
    with pytest.raises(ValueError, match="2 series"):
        build_segmentation(mixed, np.zeros((6, 64, 64), np.uint8), labels, **MODEL)
