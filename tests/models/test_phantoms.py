"""The phantom generator and its DICOM writer: real files, read back with pydicom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_rescale
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from models.training.phantoms import (
    LABEL_LUNG,
    LABEL_NODULE,
    generate_series,
    write_demo_data,
    write_dicom_series,
)


def test_generation_is_seeded_and_differs_between_seeds() -> None:
    a = generate_series(123, n_slices=6)
    b = generate_series(123, n_slices=6)
    c = generate_series(124, n_slices=6)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.hu, c.hu)


def test_series_has_realistic_hu_and_consistent_labels() -> None:
    s = generate_series(2024, n_slices=16, n_nodules=2, size_range_mm=(8.0, 14.0))
    assert s.hu.dtype == np.int16 and s.hu.shape == (16, 512, 512)
    assert s.labels.dtype == np.uint8 and s.labels.shape == s.hu.shape
    lung = s.labels == LABEL_LUNG
    assert -900 < float(np.median(s.hu[lung])) < -750
    assert float(np.median(s.hu[:, :8, :8])) < -950  # air in the corner
    assert s.hu.max() > 300  # bone
    visible = [les for les in s.lesions if les.voxels > 0]
    assert visible, "no nodule visible"
    for les in visible:
        first, last = les.slices
        assert 0 <= first <= last < s.n_slices
        assert 3.0 <= les.diameter_mm <= 30.0
        ids = s.lesion_map == les.lesion_id
        assert np.all(s.labels[ids] == LABEL_NODULE)
        # A nodule spans the slices a sphere of its size would cover.
        assert (
            last - first + 1
        ) * s.slice_thickness <= les.diameter_mm * 1.6 + 2 * s.slice_thickness
    assert np.array_equal(s.labels == LABEL_NODULE, s.lesion_map > 0)


def test_dicom_series_round_trips(tmp_path: Path) -> None:
    s = generate_series(99, n_slices=5, n_nodules=1)
    paths = write_dicom_series(s, tmp_path / "series", seed=99)
    assert len(paths) == 5
    uids = set()
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
        assert ds.PatientName.family_name == "PHANTOM"
        assert ds.InstanceNumber == k + 1
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert np.isclose(float(ds.ImagePositionPatient[2]), s.z_positions[k], atol=1e-3)
        assert np.allclose([float(v) for v in ds.PixelSpacing], s.pixel_spacing, atol=1e-4)
        assert float(ds.SliceThickness) == s.slice_thickness
        hu = apply_rescale(ds.pixel_array, ds)
        assert np.array_equal(hu.astype(np.int16), s.hu[k])
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == 5
    z = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in paths]
    assert np.allclose(np.diff(z), -s.slice_thickness)
    labels = np.load(tmp_path / "series" / "labels.npy")
    assert np.array_equal(labels, s.labels)
    meta = json.loads((tmp_path / "series" / "lesions.json").read_text())
    assert meta["series_instance_uid"] == pydicom.dcmread(paths[0]).SeriesInstanceUID
    assert len(meta["lesions"]) == len(s.lesions)


def test_demo_data_writes_one_folder_per_series(tmp_path: Path) -> None:
    folders = write_demo_data(tmp_path, n=2, seed=5, n_slices=3)
    assert [f.name for f in folders] == ["series_000", "series_001"]
    series_uids = {pydicom.dcmread(next(f.glob("*.dcm"))).SeriesInstanceUID for f in folders}
    assert len(series_uids) == 2
    for f in folders:
        assert len(list(f.glob("*.dcm"))) == 3
        assert (f / "labels.npy").exists() and (f / "lesions.json").exists()
