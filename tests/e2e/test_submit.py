"""``medcad submit`` against a live ``medcad serve`` (API + embedded worker).

Every test runs the real console script in a subprocess. The shipped-model tests use a copy of
the demo series whose UIDs are brand new, so the uploads are new to the shared server whatever
ran before them; the 20-series resume test has a server of its own with the tiny fixture models,
so that the server's counters start at zero and the models cost next to nothing.
"""

from __future__ import annotations

import csv
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from app.client import Client, Results
from tests.helpers.services import MedcadProcesses, medcad_deployment

# Three demo series through the shipped models on two cores; 20 small series through tiny models.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MEDCAD = Path(sys.executable).with_name("medcad")
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
WAIT_SECONDS = 600


def fresh_copy(src: Path, dest: Path) -> tuple[dict[str, list[Path]], int, str]:
    """Copy ``src`` giving every study, series, instance and frame of reference a new UID and
    the patient a recognisable name; other files are copied as they are.

    Returns the DICOM files by new Series Instance UID, how many non-DICOM files were copied,
    and the patient name written (it must never be printed).
    """
    patient = f"SUBMIT^PRIVATE^{uuid.uuid4().hex[:8].upper()}"
    new_uid: dict[str, str] = {}
    series: dict[str, list[Path]] = {}
    others = 0
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            target.write_bytes(path.read_bytes())
            others += 1
            continue
        for keyword in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "FrameOfReferenceUID",
        ):
            if keyword in ds:
                old = str(ds.data_element(keyword).value)
                setattr(ds, keyword, new_uid.setdefault(old, generate_uid()))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = patient
        ds.PatientID = patient.replace("^", "-")
        ds.save_as(target, enforce_file_format=True)
        series.setdefault(str(ds.SeriesInstanceUID), []).append(target)
    assert series, f"no DICOM files under {src}"
    return series, others, patient


def submit_command(server: Any, paths: list[Path], *extra: str) -> list[str]:
    assert MEDCAD.exists(), f"the medcad console script is not installed beside {sys.executable}"
    return [
        str(MEDCAD),
        "submit",
        *map(str, paths),
        "--server",
        server.url,
        "--api-key",
        server.api_key,
        *extra,
    ]


def read_summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def jobs_of_series(client: Client, series_uid: str) -> list[Any]:
    return list(client.jobs(series_instance_uid=series_uid))


def check_result_tree(root: Path, results: Results) -> Counter[str]:
    """Every output the results name is on disk where the tree layout says, and readable;
    nothing else is there. Returns how many outputs of each kind were checked."""
    geometry = {i.sop_instance_uid: (i.rows, i.columns) for i in results.series.instances}
    expected = {root / "results.json"}
    kinds: Counter[str] = Counter()
    for mask in results.masks:
        png = root / "masks" / mask.model / f"{mask.sop_instance_uid}_{mask.frame}.png"
        with Image.open(png) as img:
            rows, cols = geometry[mask.sop_instance_uid]
            assert img.size == (cols, rows) and img.mode in ("L", "P")
            assert set(np.unique(np.asarray(img))) <= {0} | {lab.value for lab in mask.labels}
        expected.add(png)
        if mask.overlay_url:
            overlay = png.with_name(f"{png.stem}_overlay.png")
            with Image.open(overlay) as img:
                assert img.mode == "RGBA"
            expected.add(overlay)
        kinds["mask"] += 1
    for sal in results.saliency:
        npy = root / "saliency" / sal.model / sal.method / f"{sal.sop_instance_uid}_{sal.frame}.npy"
        heat = np.load(npy)
        assert heat.dtype == np.float16 and heat.shape == geometry[sal.sop_instance_uid]
        expected.add(npy)
        if sal.overlay_url:
            overlay = npy.with_name(f"{npy.stem}_overlay.png")
            with Image.open(overlay) as img:
                assert img.mode == "RGBA"
            expected.add(overlay)
        kinds["saliency"] += 1
    for kind, refs, sop_class in (
        ("seg", results.dicom.seg, SEG_STORAGE),
        ("sr", results.dicom.sr, COMPREHENSIVE_3D_SR),
        ("pmap", results.dicom.pmap, PARAMETRIC_MAP),
    ):
        for ref in refs:
            # as the client names files: characters outside [A-Za-z0-9._-] become "_"
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(
                p for p in (kind, ref.model, ref.method) if p
            ))
            ds = pydicom.dcmread(root / "dicom" / f"{name}.dcm")
            assert ds.SOPClassUID == sop_class
            assert ds.StudyInstanceUID == results.series.study_instance_uid
            expected.add(root / "dicom" / f"{name}.dcm")
            kinds[kind] += 1
    assert {p for p in root.rglob("*") if p.is_file()} == expected
    return kinds


def test_submit_waits_and_downloads_every_result(
    medcad_server: Any, demo_data_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "export"
    series, others, patient = fresh_copy(demo_data_dir, data)
    # One series travels as a zip (sent as it is; the server expands it).
    zipped = sorted(series[sorted(series)[-1]])
    with zipfile.ZipFile(data / "zipped-series.zip", "w") as archive:
        for path in zipped:
            archive.write(path, f"slices/{path.name}")
            path.unlink()
    out = tmp_path / "results"

    run = subprocess.run(
        submit_command(
            medcad_server,
            [data],
            "--wait",
            "--out",
            str(out),
            "--concurrency",
            "2",
            "--wait-timeout",
            str(WAIT_SECONDS),
        ),
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS + 120,
    )

    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed
    assert patient not in printed and patient.replace("^", "-") not in printed
    assert f"skipped (not DICOM): {others}" in printed
    rows = read_summary(out)
    assert sorted(r["series_instance_uid"] for r in rows) == sorted(series)
    totals: Counter[str] = Counter()
    with Client(medcad_server.url, medcad_server.api_key) as client:
        for row in rows:
            uid = row["series_instance_uid"]
            assert row["status"] == "succeeded", row
            assert int(row["files"]) == int(row["stored"]) == len(series[uid])
            (job,) = jobs_of_series(client, uid)
            assert job.id == row["job_id"] and job.instance_count == len(series[uid])
            root = out / row["results_dir"]
            saved = json.loads((root / "results.json").read_text())
            results = Results.model_validate(saved)
            assert results.job_id == job.id and results.series.series_instance_uid == uid
            assert root == out / results.series.study_instance_uid / uid
            totals += check_result_tree(root, results)
            probabilities = [f.probability for f in results.findings if f.probability is not None]
            if probabilities:
                series_level = [
                    f.probability
                    for f in results.findings
                    if f.level == "series" and f.probability is not None
                ]
                assert float(row["max_probability"]) == pytest.approx(
                    max(series_level or probabilities), abs=1e-4
                )
    # The shipped models segment, explain and write DICOM: an empty tree would prove nothing.
    assert totals["mask"] and totals["saliency"] and totals["seg"] and totals["sr"], totals


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


RESUME_STUDIES = 10  # two series each: a folder of 20 series
RESUME_SLICES = 4
TINY_MODELS = "tinyseg,tinycls"


@pytest.fixture(scope="module")
def tiny_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[MedcadProcesses]:
    """A live ``medcad serve`` with the tiny fixture models, so 20 series take seconds."""
    with medcad_deployment(tmp_path_factory.mktemp("submit-tiny"), tiny_models_dir) as server:
        yield server


def write_twenty_series(root: Path, studies: int = RESUME_STUDIES) -> dict[str, list[Path]]:
    """``studies`` phantom studies of two small series each (64 × 64, a few slices), one
    folder per series with its ground truth beside it; returns files by Series UID."""
    from models.training.phantoms import generate_series, write_dicom_series

    series: dict[str, list[Path]] = {}
    for study in range(studies):
        seed = 77_000 + study
        for number in (1, 2):
            phantom = generate_series(
                seed * 10 + number,
                n_slices=RESUME_SLICES,
                image_size=64,
                n_nodules=1,
                size_range_mm=(4.0, 8.0),
            )
            folder = root / f"study_{study:02d}" / f"series_{number}"
            paths = write_dicom_series(phantom, folder, seed=seed, series_number=number)
            uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
            series[uid] = paths
    assert len(series) == 2 * studies
    return series


def file_counts(server: Any) -> Counter[str]:
    """Files the API process has answered for since it started, by outcome (``/metrics``)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    counts: Counter[str] = Counter()
    for outcome, value in re.findall(r'^medcad_files_total\{outcome="(\w+)"\} (\S+)$', text, re.M):
        counts[outcome] = int(float(value))
    return counts


def series_stored(state: dict[str, Any], series: dict[str, list[Path]]) -> int:
    """Series whose every file the state file records as held by the server."""
    files = state["files"]
    return sum(
        all(files.get(str(p.resolve()), {}).get("outcome") in ("stored", "duplicate") for p in ps)
        for ps in series.values()
    )


def test_killed_run_of_twenty_series_resumes_without_sending_a_stored_file_again(
    tiny_server: Any, tmp_path: Path
) -> None:
    data = tmp_path / "export"
    series = write_twenty_series(data)
    all_files = {str(p.resolve()) for files in series.values() for p in files}
    state_path = tmp_path / "submit-state.json"
    out = tmp_path / "results"
    command = submit_command(
        tiny_server,
        [data],
        "--models",
        TINY_MODELS,
        "--concurrency",
        "2",
        "--poll",
        "0.5",
        "--wait",
        "--out",
        str(out),
        "--state",
        str(state_path),
        "--wait-timeout",
        "300",
    )
    baseline = file_counts(tiny_server)  # other tests may share this server

    # First run: SIGKILL the real process once the state file records half the series stored.
    log = (tmp_path / "first-run.log").open("wb")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = _read_state(state_path)
            if state and series_stored(state, series) >= len(series) // 2:
                first.send_signal(signal.SIGKILL)
                break
            if first.poll() is not None:
                pytest.fail(
                    f"the first run ended (code {first.returncode}) before half the series "
                    "were stored: " + (tmp_path / "first-run.log").read_text()
                )
            time.sleep(0.002)
        else:
            pytest.fail("half the series were not stored within 120 s")
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        log.close()
    snapshot = _read_state(state_path)
    assert snapshot is not None
    before = {k: v for k, v in snapshot["files"].items() if k in all_files}
    stored_before = {k for k, v in before.items() if v["outcome"] == "stored"}
    in_flight = {k for k, v in before.items() if v["outcome"] == "pending"}
    done_before = series_stored(snapshot, series)
    assert len(series) // 2 <= done_before < len(series), f"killed with {done_before} series done"
    assert not out.exists() or not any(out.rglob("results.json"))

    # Second run, same command: sends the rest, waits for all 20 jobs, downloads everything.
    second = subprocess.run(command, capture_output=True, text=True, timeout=420)
    assert second.returncode == 0, second.stdout + second.stderr

    after = json.loads(state_path.read_text())["files"]
    assert set(after) >= all_files
    for key in all_files:
        record = after[key]
        if key in stored_before:
            assert record["sent"] == 1 and record["outcome"] == "stored", (key, record)
        elif key in in_flight:
            # Sent when the first run died, answer never recorded: sent once more, and the
            # server either had it (duplicate) or not (stored).
            assert record["sent"] == 2 and record["outcome"] in ("stored", "duplicate")
        else:
            assert record["sent"] == 1 and record["outcome"] == "stored", (key, record)

    # The server's own count: every instance stored exactly once, and the only files it saw
    # twice are those in flight when the first run was killed. A re-run that sent again what
    # the server held (about half of the 80 files) would show up here as duplicates.
    served = file_counts(tiny_server) - baseline
    assert served["stored"] == len(all_files), served
    assert served["duplicate"] == sum(after[k]["outcome"] == "duplicate" for k in all_files)
    assert served["duplicate"] <= len(in_flight), (served, len(in_flight))
    assert served["rejected"] == 0, served

    # One job per series covering every instance, all succeeded; every result downloaded.
    rows = read_summary(out)
    assert sorted(r["series_instance_uid"] for r in rows) == sorted(series)
    kinds: Counter[str] = Counter()
    with tiny_server.client() as http:
        # QIDO-RS: the source instances the server holds, each once.
        held = http.get("/dicomweb/instances", params={"Modality": "CT", "limit": "1000"})
        assert held.status_code == 200, held.text
        sop_uids = [item["00080018"]["Value"][0] for item in held.json()]
        assert sorted(sop_uids) == sorted(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for files in series.values()
            for p in files
        )
    with Client(tiny_server.url, tiny_server.api_key) as client:
        for uid, files in series.items():
            (job,) = jobs_of_series(client, uid)
            assert job.status == "succeeded" and job.instance_count == len(files)
            row = next(r for r in rows if r["series_instance_uid"] == uid)
            assert row["job_id"] == job.id and row["status"] == "succeeded", row
            assert int(row["files"]) == len(files)
            root = out / row["results_dir"]
            results = Results.model_validate(json.loads((root / "results.json").read_text()))
            assert results.job_id == job.id and results.series.series_instance_uid == uid
            assert len(results.series.instances) == len(files)
            kinds += check_result_tree(root, results)
    # A mask per slice, saliency maps on every slice (entropy and CAM at least), a SEG, an SR
    # and Parametric Maps per series.
    assert kinds["mask"] == len(all_files) and kinds["saliency"] >= 2 * len(all_files), kinds
    assert kinds["seg"] == kinds["sr"] == len(series) and kinds["pmap"] >= len(series), kinds

    # A third run has nothing to send: no file reaches the server, and it still exits 0.
    third = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr
    final = json.loads(state_path.read_text())["files"]
    assert all(final[k]["sent"] == after[k]["sent"] for k in all_files)
    assert file_counts(tiny_server) - baseline == served


def test_rejected_files_and_unknown_models_give_a_non_zero_exit(
    medcad_server: Any, demo_data_dir: Path, tmp_path: Path
) -> None:
    series, _, _ = fresh_copy(demo_data_dir, tmp_path / "export")
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = []
    for path in sorted(next(iter(series.values())))[:2]:
        good.append(folder / path.name)
        good[-1].write_bytes(path.read_bytes())
    broken = folder / "broken.dcm"  # claims to be DICOM (PS3.10 prefix), holds no data set
    broken.write_bytes(bytes(128) + b"DICM" + os.urandom(64))
    state_path = tmp_path / "state.json"

    unknown = subprocess.run(
        submit_command(
            medcad_server, [folder], "--models", "no-such-model", "--state", str(state_path)
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode != 0 and "no-such-model" in unknown.stdout + unknown.stderr

    run = subprocess.run(
        submit_command(medcad_server, [folder], "--state", str(state_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )

    printed = run.stdout + run.stderr
    assert run.returncode == 1, printed
    assert "mixed/broken.dcm" in printed and "problem" in printed
    files = json.loads(state_path.read_text())["files"]
    record = files[str(broken.resolve())]
    assert record["outcome"] == "rejected" and record["error"], record
    assert all(files[str(p.resolve())]["outcome"] == "stored" for p in good)


def test_progress_bars_show_on_a_terminal(tiny_server: Any, tmp_path: Path) -> None:
    """On a terminal (a pseudo-terminal here) the run shows rich progress bars for scanning,
    uploading (files and bytes), processing and downloading; piped, it prints none (above)."""
    write_twenty_series(tmp_path / "export", studies=1)
    command = submit_command(
        tiny_server,
        [tmp_path / "export"],
        "--models",
        TINY_MODELS,
        "--poll",
        "0.5",
        "--out",
        str(tmp_path / "results"),
        "--state",
        str(tmp_path / "state.json"),
    )
    controller, terminal = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    proc = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closes when the process ends (EIO)
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(controller)
        assert proc.wait(120) == 0, screen.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    text = text.replace("\r", "\n")  # each redraw starts a line
    final = {}  # each task's last drawn amount
    for task, amount in re.findall(r"^(\w+)\s+━+\s+(\S+)", text, re.M):
        final[task] = amount
    assert final == {
        "scanning": "12/12",  # 8 slices and the ground truth beside them
        "files": "8/8",
        "bytes": final.get("bytes"),
        "jobs": "2/2",
        "results": "2/2",
    }, text[-2000:]
    done, total = final["bytes"].split("/")
    assert float(done) == float(total) > 0
    assert "series: 2; jobs: 2 succeeded" in text
