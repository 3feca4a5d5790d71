"""The worker runner on real onnxruntime sessions, real SQLite/PostgreSQL and real blobs."""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.sr.codedict import codes
from sqlalchemy import func, select

from app.db.records import FindingRecord, JobRecord, MaskRecord, SaliencyRecord
from app.db.session import session_scope
from tests.fixtures.dicom_files import bright_disc_series
from workers import runner

pytestmark = pytest.mark.usefixtures("medcad_env")


def _upload(api: Any, blobs: list[bytes], **data: str) -> str:
    files = [("files", (f"s{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]
    r = api.post("/api/v1/studies", files=files, data=data)
    assert r.status_code == 202, r.text
    return str(r.json()["jobs"][0]["id"])


def _counts(job_id: str) -> tuple[int, int, int]:
    with session_scope() as s:
        return tuple(  # type: ignore[return-value]
            int(s.scalar(select(func.count()).select_from(t).where(t.job_id == job_id)) or 0)
            for t in (FindingRecord, MaskRecord, SaliencyRecord)
        )


def test_job_runs_and_results_are_served(api: Any) -> None:
    blobs, disc = bright_disc_series(n=3, radius=10)
    job_id = _upload(api, blobs)
    assert runner.run_job(job_id) == "succeeded"
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert {"decode", "outputs"} <= set(job["timings"])
    res = api.get(f"/api/v1/jobs/{job_id}/results").json()
    # masks: one per slice; the bright disc is label 2 (> 0.75 after the 2000-wide window)
    assert len(res["masks"]) == 3
    png = api.get(res["masks"][0]["url"])
    assert png.status_code == 200 and png.headers["etag"]
    labels = np.asarray(Image.open(io.BytesIO(png.content)))
    assert labels.shape == (64, 64)
    assert (labels[disc] == 2).mean() > 0.95 and (labels[~disc] != 2).mean() > 0.95
    # findings: per-slice + series for the classifier; every finding has its saliency map
    findings = res["findings"]
    assert len([f for f in findings if f["level"] == "slice"]) == 3
    assert len([f for f in findings if f["level"] == "series"]) == 1
    saliency_ids = {s["id"] for s in res["saliency"]}
    assert all(f["saliency_id"] in saliency_ids for f in findings)
    assert all(m["saliency_ids"] for m in res["masks"])
    # the disc through the 3 slices is one 3-D lesion of the segmenter, measured from the
    # geometry (1 mm pixels, 2 mm slices) and explained by the occlusion of its key slice
    (lesion,) = [f for f in findings if f["level"] == "lesion"]
    assert lesion["model"] == "tinyseg" and lesion["label"] == "nodule" and lesion["positive"]
    volume = 3 * int(disc.sum()) * 1.0 * 1.0 * 2.0
    assert lesion["lesion"]["volume_mm3"] == pytest.approx(volume, rel=0.05)
    assert lesion["lesion"]["equivalent_diameter_mm"] == pytest.approx(
        (6 * volume / np.pi) ** (1 / 3), rel=0.02
    )
    assert lesion["lesion"]["number"] == 1 and lesion["lesion"]["frame_count"] == 3
    centre = lesion["lesion"]["centroid"]
    assert abs(centre["row"] - 31.5) < 1.5 and abs(centre["column"] - 31.5) < 1.5
    explained = next(s for s in res["saliency"] if s["id"] == lesion["saliency_id"])
    assert explained["method"] == "occlusion" and explained["model"] == "tinyseg"
    assert (explained["sop_instance_uid"], explained["frame"]) == (
        lesion["sop_instance_uid"],
        lesion["frame"],
    )
    # the CAM of the mean classifier is 10*(x-0.5): its argmax lies in the bright disc
    cam = next(s for s in res["saliency"] if s["method"] == "cam")
    values = np.load(io.BytesIO(api.get(cam["url"]).content)).astype(np.float32)
    assert disc[np.unravel_index(np.argmax(values), values.shape)]
    overlay = Image.open(io.BytesIO(api.get(cam["overlay_url"]).content))
    assert overlay.mode == "RGBA" and overlay.size == (64, 64)
    assert api.get(cam["colorbar_url"]).status_code == 200
    # DICOM outputs are listed and downloadable
    for kind in ("seg", "sr", "pmap"):
        assert res["dicom"][kind], kind
        url = res["dicom"][kind][0]["url"]
        got = api.get(url)
        assert got.content[128:132] == b"DICM"
        # ETag: the content address (sha256) of the bytes; a match answers 304 without them
        etag = got.headers["etag"]
        assert etag == f'"{hashlib.sha256(got.content).hexdigest()}"', kind
        again = api.get(url, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"", kind
        assert again.headers["etag"] == etag
    # one SR for the series: the classifier's series finding, then the slices it calls
    # positive or uncertain; the segmenter's lesion with the volume the API reports
    (link,) = res["dicom"]["sr"]
    assert link["model"] == "tinycls+tinyseg"
    sr = pydicom.dcmread(io.BytesIO(api.get(link["url"]).content))
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    by_model: dict[str, list[Any]] = {}
    for group in groups:
        (algorithm,) = [
            item.TextValue
            for item in group[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "111001"  # Algorithm Name
        ]
        by_model.setdefault(algorithm, []).append(group)
    flagged = [f for f in findings if f["level"] == "slice" and (f["positive"] or f["uncertain"])]
    assert len(by_model["tinycls"]) == 1 + len(flagged)
    (group,) = by_model["tinyseg"]
    assert group.tracking_identifier == "nodule 1" and len(group.source_images) == 3
    (volume,) = group.get_measurements(name=codes.SCT.Volume)
    assert volume.value == pytest.approx(lesion["lesion"]["volume_mm3"], abs=0.1)
    pixels = api.get(
        f"/api/v1/instances/{res['series']['instances'][0]['sop_instance_uid']}/frames/0/pixels"
    )
    hu = np.frombuffer(pixels.content, "<i2").reshape(64, 64)
    assert hu[disc].mean() > 700 and pixels.headers["x-window-width"] == "1500"


def test_running_a_job_twice_leaves_one_result_set(api: Any) -> None:
    blobs, _ = bright_disc_series(n=2)
    job_id = _upload(api, blobs)
    assert runner.run_job(job_id) == "succeeded"
    first = _counts(job_id)
    assert runner.run_job(job_id).startswith("status")  # finished: not claimed again
    before = api.get(f"/api/v1/jobs/{job_id}/results")
    etag = before.headers["etag"]
    again = api.get(f"/api/v1/jobs/{job_id}/results", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["etag"] == etag and not again.content
    with session_scope() as s:  # force a re-run (e.g. a redelivered message after a crash)
        job = s.get(JobRecord, job_id)
        assert job is not None
        job.status = "queued"
    assert runner.run_job(job_id) == "succeeded"
    assert _counts(job_id) == first
    # the re-run replaced the rows: the served result set (and its ETag) follow, never stale
    after = api.get(f"/api/v1/jobs/{job_id}/results", headers={"If-None-Match": etag})
    assert after.status_code == 200 and after.headers["etag"] != etag
    ids = {m["id"] for m in after.json()["masks"]}
    assert ids.isdisjoint(m["id"] for m in before.json()["masks"])
    assert all(api.get(m["url"]).status_code == 200 for m in after.json()["masks"])


def _results(api: Any, job_id: str) -> tuple[dict[str, Any], str]:
    r = api.get(f"/api/v1/jobs/{job_id}/results")
    assert r.status_code == 200, r.text
    return r.json(), r.headers["etag"]


def test_results_are_readable_while_the_dicom_objects_are_built(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the result rows commit first; the job stays running until its SEG/SR/PMs are stored
    blobs, _ = bright_disc_series(n=2, radius=10)
    job_id = _upload(api, blobs)
    seen: dict[str, Any] = {}
    dicom_rows = runner.OutputBuilder.dicom_rows

    def look_first(self: runner.OutputBuilder) -> list[Any]:
        seen["job"] = api.get(f"/api/v1/jobs/{job_id}").json()
        seen["results"], seen["etag"] = _results(api, job_id)
        return dicom_rows(self)

    monkeypatch.setattr(runner.OutputBuilder, "dicom_rows", look_first)
    assert runner.run_job(job_id) == "succeeded"
    job, partial = seen["job"], seen["results"]
    assert job["status"] == "running" and job["stage"] == "dicom" and job["results_at"]
    assert job["finished_at"] is None
    assert partial["complete"] is False and partial["status"] == "running"
    assert partial["masks"] and partial["saliency"] and partial["findings"]
    assert not any(partial["dicom"].values())
    final, etag = _results(api, job_id)
    assert final["complete"] is True and final["dicom"]["seg"] and final["dicom"]["sr"]
    assert etag != seen["etag"]  # a polling client sees the DICOM objects arrive
    # the second transaction added the objects; the rows already read stay the rows served
    for kind in ("masks", "saliency", "findings"):
        assert [x["id"] for x in final[kind]] == [x["id"] for x in partial[kind]]
    done = api.get(f"/api/v1/jobs/{job_id}").json()
    assert done["results_at"] <= done["finished_at"]
    assert {"outputs", "commit", "dicom"} <= set(done["timings"])


def test_a_worker_lost_between_results_and_dicom_objects_reruns_the_job(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta

    from app.db.records import utcnow
    from app.jobs.sweeper import sweep_once
    from app.settings import get_settings

    blobs, _ = bright_disc_series(n=2, radius=10)
    job_id = _upload(api, blobs)

    def killed(self: runner.OutputBuilder) -> list[Any]:
        raise SystemExit("worker process ends here")  # not caught by the runner, like a kill

    with monkeypatch.context() as m:
        m.setattr(runner.OutputBuilder, "dicom_rows", killed)
        with pytest.raises(SystemExit):
            runner.run_job(job_id)
    partial, _ = _results(api, job_id)  # the committed rows stay readable meanwhile
    assert partial["complete"] is False and partial["masks"] and not partial["dicom"]["seg"]
    with session_scope() as s:  # the lease runs out, as it would after the kill
        job = s.get(JobRecord, job_id)
        assert job is not None and job.status == "running"
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
    assert sweep_once(get_settings()).reclaimed == [job_id]
    assert runner.run_job(job_id) == "succeeded"
    final, _ = _results(api, job_id)
    assert final["complete"] is True and final["dicom"]["seg"] and final["dicom"]["sr"]
    assert {m["id"] for m in final["masks"]}.isdisjoint(m["id"] for m in partial["masks"])
    assert len(final["masks"]) == len(partial["masks"])  # one result set, not two
    assert api.get(f"/api/v1/jobs/{job_id}").json()["attempts"] == 2


def test_a_job_that_fails_after_its_results_serves_none(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.errors import PipelineError

    blobs, _ = bright_disc_series(n=1, radius=10)
    job_id = _upload(api, blobs)

    def broken(self: runner.OutputBuilder) -> list[Any]:
        raise PipelineError("storage_failed", "the DICOM objects could not be stored")

    monkeypatch.setattr(runner.OutputBuilder, "dicom_rows", broken)
    assert runner.run_job(job_id) == "failed: storage_failed"
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["results_at"] is None
    r = api.get(f"/api/v1/jobs/{job_id}/results")
    assert r.status_code == 409 and r.json()["error"] == "not_ready"


@contextlib.contextmanager
def _tampered_segmenter() -> Iterator[None]:
    """The tiny segmenter's ONNX file no longer matches its manifest's sha256."""
    from app.settings import get_settings
    from workers import onnx_sessions

    model_file = next(get_settings().models_dir.glob("tinyseg/*/model.onnx"))
    original = model_file.read_bytes()
    try:
        model_file.write_bytes(original + b"tampered")
        onnx_sessions.clear()
        yield
    finally:
        model_file.write_bytes(original)
        onnx_sessions.clear()


def test_undecodable_pixels_fail_with_a_reason(api: Any) -> None:
    blobs, _ = bright_disc_series(n=1)
    job_id = _upload(api, blobs)
    with _tampered_segmenter():
        assert runner.run_job(job_id) == "failed: model_checksum_mismatch"
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "model_checksum_mismatch"
    assert _counts(job_id) == (0, 0, 0)


def test_metrics_give_stage_durations_by_model_and_failures_by_reason(api: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    ok = _upload(api, bright_disc_series(n=2, radius=10)[0])
    assert runner.run_job(ok) == "succeeded"
    timings = api.get(f"/api/v1/jobs/{ok}").json()["timings"]
    failed = _upload(api, bright_disc_series(n=1)[0])
    with _tampered_segmenter():
        assert runner.run_job(failed) == "failed: model_checksum_mismatch"
    _upload(api, bright_disc_series(n=1)[0])  # left queued

    r = api.get("/metrics", headers={"Authorization": ""})
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    jobs = {s.labels["status"]: s.value for s in families["medcad_jobs"].samples}
    assert jobs == {"queued": 1, "running": 0, "succeeded": 1, "failed": 1}
    assert families["medcad_queue_depth"].samples[0].value == 1
    failures = {s.labels["code"]: s.value for s in families["medcad_job_failures"].samples}
    assert failures == {"model_checksum_mismatch": 1}
    # One succeeded job: every quantile of a stage is that job's own duration.
    stage = {
        (s.labels["stage"], s.labels["model"], s.labels["quantile"]): s.value
        for s in families["medcad_job_stage_seconds"].samples
    }
    assert {(k.partition(":")[0], k.partition(":")[2]) for k in timings} == {
        (st, model) for st, model, _ in stage
    }
    assert ("infer", "tinyseg", "0.95") in stage and ("decode", "", "0.5") in stage
    for key, seconds in timings.items():
        st, _, model = key.partition(":")
        assert stage[(st, model, "0.5")] == pytest.approx(seconds)
        assert stage[(st, model, "0.95")] == pytest.approx(seconds)


def test_claim_gives_up_after_max_attempts(api: Any) -> None:
    from app.jobs.service import claim_job

    blobs, _ = bright_disc_series(n=1)
    job_id = _upload(api, blobs)
    with session_scope() as s:
        job = s.get(JobRecord, job_id)
        assert job is not None
        job.attempts = 3
    with session_scope() as s:
        claim = claim_job(session=s, job_id=job_id, owner="h:1", lease_seconds=60, max_attempts=3)
    assert not claim.claimed
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"


def test_sweeper_reclaims_expired_lease(api: Any) -> None:
    from datetime import timedelta

    from app.db.records import utcnow
    from app.jobs.sweeper import sweep_once
    from app.settings import get_settings

    blobs, _ = bright_disc_series(n=1)
    job_id = _upload(api, blobs)
    with session_scope() as s:
        job = s.get(JobRecord, job_id)
        assert job is not None
        job.status, job.attempts = "running", 1
        job.lease_owner, job.lease_expires_at = "elsewhere:1", utcnow() - timedelta(seconds=1)
    report = sweep_once(get_settings())
    assert report.reclaimed == [job_id]
    assert runner.run_job(job_id) == "succeeded"
    assert api.get(f"/api/v1/jobs/{job_id}").json()["attempts"] == 2


def _age_queued(job_ids: list[str], seconds: float) -> None:
    from datetime import timedelta

    from app.db.records import utcnow

    with session_scope() as s:
        for i, job_id in enumerate(job_ids):
            job = s.get(JobRecord, job_id)
            assert job is not None and job.status == "queued"
            job.enqueued_at = utcnow() - timedelta(seconds=seconds - i)  # the first is oldest


def _purge_broker_queue() -> int:
    from app import queue

    with queue._producer().connection_for_write() as conn:
        return int(conn.default_channel.queue_purge(queue.QUEUE_NAME) or 0)


def test_sweeper_resends_only_the_messages_the_broker_lost(api: Any) -> None:
    """A backlog waiting in the broker is not sent again; a lost message is, oldest first."""
    from app import queue
    from app.jobs.sweeper import sweep_once
    from app.settings import get_settings

    settings = get_settings()
    ids = [_upload(api, bright_disc_series(n=1, seed=k)[0]) for k in range(3)]
    assert queue.waiting_messages() == 3
    _age_queued(ids, 10 * settings.queued_resend_after_seconds)
    # every queued job still has its message: waiting for a worker is not being lost
    for _ in range(2):
        assert sweep_once(settings).resent == []
    assert queue.waiting_messages() == 3
    # the broker loses everything (a Redis restart without persistence): all three go again
    assert _purge_broker_queue() == 3
    assert sweep_once(settings).resent == ids
    assert queue.waiting_messages() == 3
    assert sweep_once(settings).resent == []  # just sent: not stale, and none missing
    # one message short: exactly one job, the one sent longest ago, is sent again
    _age_queued(ids, 10 * settings.queued_resend_after_seconds)
    with queue._producer().connection_for_write() as conn:
        assert conn.default_channel.basic_get(queue.QUEUE_NAME, no_ack=True) is not None
    assert queue.waiting_messages() == 2
    assert sweep_once(settings).resent == ids[:1]
    assert queue.waiting_messages() == 3


def test_waiting_messages_counts_a_redis_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker's count the sweeper relies on, on a real Redis (the production broker)."""
    from app import queue
    from tests.conftest import reset_caches
    from tests.helpers.services import redis_db_url

    monkeypatch.setenv("MEDCAD_BROKER_URL", redis_db_url(10))
    reset_caches()
    assert queue.waiting_messages() == 0
    for k in range(4):
        assert queue.send_job(f"job-{k}")
    assert queue.waiting_messages() == 4
    assert _purge_broker_queue() == 4
    assert queue.waiting_messages() == 0
    monkeypatch.setenv("MEDCAD_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    reset_caches()
    assert queue.waiting_messages() is None


def test_perturbation_saliency_on_request_respects_budget(api: Any) -> None:
    blobs, disc = bright_disc_series(n=2, radius=10)
    job_id = _upload(api, blobs, models="tinycls", saliency="occlusion,rise", saliency_budget="60")
    assert runner.run_job(job_id) == "succeeded"
    res = api.get(f"/api/v1/jobs/{job_id}/results").json()
    methods = [s["method"] for s in res["saliency"]]
    assert methods.count("cam") == 2 and "occlusion" in methods and "rise" in methods
    passes = sum(s["params"]["passes"] for s in res["saliency"] if s["method"] != "cam")
    assert passes <= 60
    occ = next(s for s in res["saliency"] if s["method"] == "occlusion")
    values = np.load(io.BytesIO(api.get(occ["url"]).content)).astype(np.float32)
    # occluding the bright disc lowers the mean-intensity score most: the map peaks there
    assert disc[np.unravel_index(np.argmax(values), values.shape)]


def test_flip_tta_uncertainty_on_request_maps_every_segmented_frame(api: Any) -> None:
    blobs, _ = bright_disc_series(n=3, radius=10)
    job_id = _upload(api, blobs, models="tinyseg", saliency="tta_std")
    assert runner.run_job(job_id) == "succeeded"
    res = api.get(f"/api/v1/jobs/{job_id}/results").json()
    tta = [s for s in res["saliency"] if s["method"] == "tta_std"]
    assert len({s["sop_instance_uid"] for s in tta}) == len(tta) == 3  # one per slice
    assert all(s["model"] == "tinyseg" and s["params"]["flips"].count(",") == 3 for s in tta)
    values = np.load(io.BytesIO(api.get(tta[0]["url"]).content)).astype(np.float32)
    assert values.shape == (64, 64) and 0.0 <= values.min() and values.max() <= 0.5
    # the pixel-wise model is flip-equivariant: its flips agree everywhere
    assert values.max() < 1e-3
    ids = {s["id"] for s in tta}
    assert all(ids & set(m["saliency_ids"]) for m in res["masks"])
    assert "tta_std" in {link["method"] for link in res["dicom"]["pmap"]}


def test_bad_saliency_request_is_400(api: Any) -> None:
    blobs, _ = bright_disc_series(n=1)
    files = [("files", ("a.dcm", blobs[0], "application/dicom"))]
    r = api.post("/api/v1/studies", files=files, data={"saliency": "gradcam"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_saliency"
    r = api.post("/api/v1/studies", files=files, data={"saliency_budget": "999999"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_saliency_budget"


def test_non_ct_series_is_processed_with_an_intended_use_warning(api: Any) -> None:
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("MR_small.dcm"), "rb").read()
    r = api.post("/api/v1/studies", files=[("files", ("mr.dcm", data, "application/dicom"))])
    job_id = r.json()["jobs"][0]["id"]
    assert runner.run_job(job_id) == "succeeded"
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    codes = {w["code"] for w in job["warnings"]}
    assert "outside_intended_use" in codes
    assert any("'MR'" in w["detail"] for w in job["warnings"])


def _result_content(job_id: str) -> dict[str, Any]:
    """What a job delivered, without ids, UIDs and times: blob keys, values, DICOM pixels."""
    import pydicom

    from app.db.records import ArtifactRecord
    from app.settings import get_settings
    from app.storage import BlobStore

    store = BlobStore(get_settings().blob_dir)
    with session_scope() as s:
        masks = s.scalars(select(MaskRecord).where(MaskRecord.job_id == job_id)).all()
        maps = s.scalars(select(SaliencyRecord).where(SaliencyRecord.job_id == job_id)).all()
        found = s.scalars(select(FindingRecord).where(FindingRecord.job_id == job_id)).all()
        artifacts = s.scalars(select(ArtifactRecord).where(ArtifactRecord.job_id == job_id)).all()
        dicom = sorted(
            (a.kind, a.model, a.method or "", pydicom.dcmread(io.BytesIO(store.get(a.blob_sha256))))
            for a in artifacts
        )
        return {
            "masks": sorted((m.model, m.frame, m.blob_sha256, m.overlay_sha256) for m in masks),
            "saliency": sorted(
                (m.model, m.method, m.frame, m.blob_sha256, m.overlay_sha256) for m in maps
            ),
            "findings": sorted((f.model, f.level, f.frame or -1, f.probability) for f in found),
            "dicom_kinds": [d[:3] for d in dicom],
            "dicom_pixels": [
                d[3].PixelData if "PixelData" in d[3] else d[3].get("FloatPixelData", b"")
                for d in dicom
            ],
            "dicom_elements": [sum(1 for _ in d[3].iterall()) for d in dicom],
        }


def test_outputs_built_alongside_inference_match_outputs_built_after_it(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the workers build each model's outputs while the next model runs; built after the last
    # model instead, as one loop would, the rows must be the same
    blobs, _ = bright_disc_series(n=3, radius=10)
    job_id = _upload(api, blobs, saliency="occlusion", saliency_budget="40")
    content = {}
    for overlap in (True, False):
        with session_scope() as s:  # run the same job again, from scratch
            job = s.get(JobRecord, job_id)
            assert job is not None
            job.status, job.attempts = "queued", 0
        builder = runner.OutputBuilder
        monkeypatch.setattr(
            runner,
            "OutputBuilder",
            lambda r, s, overlap, models, b=builder, o=overlap: b(r, s, overlap=o, models=models),
        )
        assert runner.run_job(job_id) == "succeeded"
        monkeypatch.setattr(runner, "OutputBuilder", builder)
        content[overlap] = _result_content(job_id)
    overlapped, sequential = content.values()
    assert overlapped["masks"] and overlapped["saliency"] and overlapped["findings"]
    assert [k for k, _, _ in overlapped["dicom_kinds"]].count("pmap") >= 2
    assert overlapped == sequential
