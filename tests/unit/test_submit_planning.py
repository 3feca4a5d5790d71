"""``medcad submit`` before the network: scanning real DICOM files, the state file, resume
planning and batching. The files are written with pydicom, so the headers are real."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from app.submit import (
    DICOMDIR_SOP_CLASS,
    STATE_NAME,
    FileRecord,
    LocalFile,
    SeriesRecord,
    StateMismatch,
    SubmitState,
    iter_paths,
    load_state,
    plan_uploads,
    save_state,
    scan,
    sha256_of,
    split_batches,
    upload_names,
)

PATIENT_NAME = "Doe^Jane"


def write_ct(
    path: Path,
    *,
    study: str,
    series: str,
    number: int,
    size: int = 16,
    sop_class: str = CTImageStorage,
) -> str:
    """Write a small CT image (int16 HU) and return its SOP Instance UID."""
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "P-0001"
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.full((size, size), number, dtype="<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, object]:
    """Two studies, three series, spread over nested folders, plus things that are not images."""
    root = tmp_path / "export"
    study_a, study_b = generate_uid(), generate_uid()
    series = {name: generate_uid() for name in ("a1", "a2", "b1")}
    sops: dict[str, set[str]] = {name: set() for name in series}
    for i in range(3):
        sops["a1"].add(
            write_ct(root / "A" / "s1" / f"IM{i:04d}", study=study_a, series=series["a1"], number=i)
        )
        # Same base names in another folder: upload names must still be unique.
        sops["a2"].add(
            write_ct(root / "A" / "s2" / f"IM{i:04d}", study=study_a, series=series["a2"], number=i)
        )
    for i in range(2):
        sops["b1"].add(
            write_ct(root / "B" / f"{i}.dcm", study=study_b, series=series["b1"], number=i)
        )
    # Two files of one series in different folders.
    sops["b1"].add(
        write_ct(root / "B" / "more" / "late.dcm", study=study_b, series=series["b1"], number=9)
    )
    (root / "notes.txt").write_text("not an image\n")
    (root / "A" / "mask.npy").write_bytes(b"\x93NUMPY fake")
    write_ct(
        root / "DICOMDIR",
        study=study_a,
        series=generate_uid(),
        number=0,
        sop_class=DICOMDIR_SOP_CLASS,
    )
    with zipfile.ZipFile(root / "extra.zip", "w") as zf:
        zf.write(root / "B" / "0.dcm", "member.dcm")
    return {"root": root, "series": series, "sops": sops, "studies": (study_a, study_b)}


def test_scan_groups_real_files_by_series(tree: dict[str, object]) -> None:
    root = tree["root"]
    assert isinstance(root, Path)
    series: dict[str, str] = tree["series"]  # type: ignore[assignment]
    sops: dict[str, set[str]] = tree["sops"]  # type: ignore[assignment]

    found = scan([root])

    dicom = [f for f in found.files if f.kind == "dicom"]
    by_series: dict[str | None, set[str | None]] = {}
    for item in dicom:
        by_series.setdefault(item.series_instance_uid, set()).add(item.sop_instance_uid)
    assert by_series == {series[name]: sops[name] for name in series}
    for item in dicom:
        assert item.sha256 == sha256_of(item.path)
        assert item.size == item.path.stat().st_size
    zips = [f for f in found.files if f.kind == "zip"]
    assert [z.display for z in zips] == ["export/extra.zip"]
    skipped = {s.display: s.reason for s in found.skipped}
    assert set(skipped) == {"export/notes.txt", "export/A/mask.npy", "export/DICOMDIR"}
    assert "DICOMDIR" in skipped["export/DICOMDIR"]
    assert "DICM" in skipped["export/notes.txt"]
    # Nothing the scan keeps could carry the patient's name or ID.
    kept = repr(found)
    assert PATIENT_NAME not in kept and "P-0001" not in kept

    groups = plan_uploads(found.files, SubmitState(server="http://x"), max_batch_bytes=1 << 30)
    keys = [g.key for g in groups]
    assert sorted(k for k in keys if not k.startswith("zip:")) == sorted(series.values())
    b1 = next(g for g in groups if g.key == series["b1"])
    assert len(b1.batches) == 1
    assert {f.sop_instance_uid for f in b1.batches[0]} == sops["b1"]
    assert b1.study_instance_uid == tree["studies"][1]  # type: ignore[index]
    zip_group = next(g for g in groups if g.key.startswith("zip:"))
    assert zip_group.series_instance_uid is None and len(zip_group.batches) == 1


def test_walk_excludes_state_and_output_and_yields_each_file_once(tmp_path: Path) -> None:
    root = tmp_path / "data"
    study, series = generate_uid(), generate_uid()
    write_ct(root / "one.dcm", study=study, series=series, number=1)
    write_ct(root / "results" / "x.dcm", study=study, series=series, number=2)
    (root / STATE_NAME).write_text("{}")
    (root / f"{STATE_NAME}.abc.part").write_text("{}")

    walked = list(
        iter_paths([root, root / "one.dcm"], exclude=[root / STATE_NAME, root / "results"])
    )

    assert [display for _, display in walked] == ["data/one.dcm"]


def test_state_round_trip_and_refusal_of_another_run(tmp_path: Path) -> None:
    path = tmp_path / STATE_NAME
    state = SubmitState(server="http://127.0.0.1:8000", models=["unet", "classifier"])
    state.files["/data/a.dcm"] = FileRecord(
        sha256="ab" * 32, size=10, outcome="stored", sent=1, series_uids=["1.2.3"]
    )
    state.files["/data/b.zip"] = FileRecord(
        sha256="cd" * 32,
        size=20,
        outcome="rejected",
        sent=2,
        error="partly_rejected",
        detail="1 of 2 members rejected",
        series_uids=["1.2.4"],
        member_counts={"1.2.4": {"stored": 1, "rejected": 1}},
        members_rejected=[{"filename": "x.dcm", "error": "rejected", "detail": "no pixels"}],
    )
    state.series["1.2.3"] = SeriesRecord(
        study_instance_uid="1.2", job_ids=["j1", "j2"], final_job_ids=["j2"]
    )

    save_state(path, state)
    loaded = load_state(path, server="http://127.0.0.1:8000/", models=["classifier", "unet"])

    assert loaded == state
    assert json.loads(path.read_text())["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [STATE_NAME]  # no temporary file left
    with pytest.raises(StateMismatch, match="records uploads to"):
        load_state(path, server="http://elsewhere:8000", models=["unet", "classifier"])
    with pytest.raises(StateMismatch, match="models"):
        load_state(path, server="http://127.0.0.1:8000", models=None)
    fresh = load_state(tmp_path / "absent.json", server="http://s", models=None)
    assert fresh.files == {} and fresh.series == {}


def test_resume_plan_sends_only_what_the_server_does_not_hold(tmp_path: Path) -> None:
    root = tmp_path / "series"
    study, series = generate_uid(), generate_uid()
    for i in range(6):
        write_ct(root / f"{i}.dcm", study=study, series=series, number=i)
    files = sorted(scan([root]).files, key=lambda f: f.display)
    state = SubmitState(server="http://s")
    state.files[files[0].key] = FileRecord(files[0].sha256, files[0].size, "stored", 1)
    state.files[files[1].key] = FileRecord(files[1].sha256, files[1].size, "duplicate", 1)
    # Sent but no answer recorded (the run was killed): must be sent again.
    state.files[files[2].key] = FileRecord(files[2].sha256, files[2].size, "pending", 1)
    state.files[files[3].key] = FileRecord(
        files[3].sha256, files[3].size, "failed", 1, error="connection_error"
    )
    # Recorded as stored, but the file changed since: must be sent again.
    state.files[files[4].key] = FileRecord("00" * 32, files[4].size, "stored", 1)

    (group,) = plan_uploads(files, state, max_batch_bytes=1 << 30)

    sent = [f.display for batch in group.batches for f in batch]
    assert sent == [f.display for f in files[2:]]
    assert [f.display for f in group.done] == [f.display for f in files[:2]]

    # The same bytes stored under another path (folder moved or copied) are not sent again.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "again.dcm").write_bytes(files[0].path.read_bytes())
    (moved,) = scan([copy]).files
    (moved_group,) = plan_uploads([moved], state, max_batch_bytes=1 << 30)
    assert moved_group.batches == () and moved_group.done == (moved,)

    # Once everything is recorded as stored, nothing is left to send but the group remains
    # (its jobs are still waited for and downloaded).
    for item in files:
        state.files[item.key] = FileRecord(item.sha256, item.size, "stored", 1)
    (done_group,) = plan_uploads(files, state, max_batch_bytes=1 << 30)
    assert done_group.batches == () and len(done_group.done) == len(files)


def test_big_series_split_into_batches_under_the_size_limit(tmp_path: Path) -> None:
    root = tmp_path / "big"
    study, series = generate_uid(), generate_uid()
    for i in range(7):
        write_ct(root / f"{i:02d}.dcm", study=study, series=series, number=i, size=64)
    files = sorted(scan([root]).files, key=lambda f: f.display)
    # Generated UIDs differ in length by a byte or two, so the files nearly share one size.
    sizes = [f.size for f in files]
    assert max(sizes) - min(sizes) < min(sizes) // 100
    limit = int(2.5 * max(sizes))

    (group,) = plan_uploads(files, SubmitState(server="http://s"), max_batch_bytes=limit)

    assert [len(b) for b in group.batches] == [2, 2, 2, 1]
    assert all(sum(f.size for f in b) <= limit for b in group.batches)
    assert [f for b in group.batches for f in b] == files  # order kept, nothing lost


def test_a_file_over_the_limit_travels_alone() -> None:
    def item(name: str, size: int) -> LocalFile:
        return LocalFile(Path("/d", name), name, size, name * 4, "dicom", "1", "2", name)

    files = [item("a", 10), item("b", 500), item("c", 10), item("d", 10)]

    batches = split_batches(files, max_bytes=100)

    assert [[f.display for f in b] for b in batches] == [["a"], ["b"], ["c", "d"]]


def test_upload_names_are_unique_within_a_request(tree: dict[str, object]) -> None:
    root = tree["root"]
    assert isinstance(root, Path)
    files = [f for f in scan([root]).files if f.path.name.startswith("IM")]
    assert len({f.path.name for f in files}) < len(files)  # the fixture has clashing names

    names = upload_names(files)

    assert len(set(names)) == len(names)
    assert all(name.endswith(f.path.name) for name, f in zip(names, files, strict=True))
