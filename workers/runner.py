"""Run one job: claim → decode → analyse with every model → results → DICOM objects.

The only worker module that opens database sessions; it reads and writes blobs itself and
through ``workers.series`` (decoding) and ``workers.dicom_outputs`` (SEG, SR, Parametric Maps).
Each step runs in its own short ``session_scope()``. The result rows (masks, findings, saliency
maps) commit in ONE transaction, after every blob they name is durable, and are readable from
then on (the job's ``results_at``); the DICOM objects built from them commit with the
``succeeded`` status in a second one. A job that stops in between is still running: it is
reclaimed and run again like any other, and the re-run replaces its result set as a whole.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.db.records import (
    ArtifactRecord,
    FindingRecord,
    InstanceRecord,
    JobRecord,
    JobStatus,
    MaskRecord,
    SaliencyRecord,
    new_id,
)
from app.db.session import session_scope
from app.errors import MedcadError, PipelineError
from app.jobs import service as jobs
from app.registry.manifest import SaliencyMethod
from app.registry.service import RegisteredModel, current_registry
from app.settings import Settings, get_settings
from app.storage import BlobStore
from workers import dicom_outputs, onnx_sessions
from workers.analysis import ModelAnalysis, SaliencyResult, analyze_series
from workers.forwarding import forward_job_outputs
from workers.outputs import overlays
from workers.pipeline import saliency as saliency_maps
from workers.pipeline.decode import DecodeError
from workers.series import DecodedSeries, decode_series

log = logging.getLogger(__name__)


def _load_instances(job_id: str) -> tuple[list[InstanceRecord], list[str], dict[str, Any]]:
    with session_scope() as session:
        job = jobs.get_job(session=session, job_id=job_id)
        rows = list(
            session.scalars(select(InstanceRecord).where(InstanceRecord.series_id == job.series_id))
        )
        return rows, list(job.models), dict(job.options or {})


class JobRun:
    """State of one running job (one attempt)."""

    def __init__(self, job_id: str, settings: Settings, owner: str) -> None:
        self.job_id = job_id
        self.settings = settings
        self.owner = owner
        self.store = BlobStore(settings.blob_dir)
        self.sink = dicom_outputs.ArtifactSink(job_id, self.store)
        self.timings: dict[str, float] = {}
        self._timings_lock = threading.Lock()  # the output builder threads time their work too
        self.current = "claimed"
        self.lost = False
        self.warnings: list[dict[str, str]] = []
        self._stage_start = time.perf_counter()
        # every map of one method shares its colour bar: render and store it once per job
        self.colorbars: dict[tuple[float, float, str], str] = {}

    def start_heartbeat(self) -> threading.Event:
        """Renew the lease every third of its length while the job runs (long stages included)."""
        stop = threading.Event()
        interval = max(0.5, self.settings.job_lease_seconds / 3)

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    with session_scope() as session:
                        owned = jobs.renew_lease(
                            session=session,
                            job_id=self.job_id,
                            owner=self.owner,
                            lease_seconds=self.settings.job_lease_seconds,
                            stage=self.current,
                        )
                except Exception as exc:  # a missed beat is retried; the lease is 3 beats long
                    log.warning(
                        "lease renewal failed: %s",
                        type(exc).__name__,
                        extra={"job_id": self.job_id},
                    )
                    continue
                if not owned:
                    self.lost = True
                    return

        threading.Thread(target=beat, name=f"lease-{self.job_id[:8]}", daemon=True).start()
        return stop

    def stage(self, name: str) -> None:
        """Record the stage (renews the lease); stop if the job was taken away from us."""
        self.current = name
        if self.lost:
            raise PipelineError("lease_lost", "the job's lease was reclaimed by another worker")
        with session_scope() as session:
            owned = jobs.renew_lease(
                session=session,
                job_id=self.job_id,
                owner=self.owner,
                lease_seconds=self.settings.job_lease_seconds,
                stage=name,
                timings=dict(self.timings),
            )
        if not owned:
            raise PipelineError("lease_lost", "the job's lease was reclaimed by another worker")

    def timed(self, name: str, seconds: float) -> None:
        with self._timings_lock:
            self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 4)


def resolve_job_models(keys: list[str], settings: Settings) -> list[RegisteredModel]:
    """The registered models named on the job (all must still exist)."""
    registry = current_registry(settings.models_dir)
    missing = [k for k in keys if k not in registry]
    if missing:
        raise PipelineError("unknown_model", f"models no longer registered: {', '.join(missing)}")
    return [registry[k] for k in keys]


def ort_threads(settings: Settings) -> int:
    """Intra-op threads per session: the setting, or this process's share of the cores.

    With ``worker_concurrency`` child processes on the host, each one running all cores' worth
    of threads would oversubscribe the CPU, and thread-parallel operators stall at their
    barriers when a partner thread is descheduled.
    """
    if settings.ort_intra_op_threads > 0:
        return settings.ort_intra_op_threads
    return max(1, _cores() // max(1, settings.worker_concurrency))


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def run_job(job_id: str, settings: Settings | None = None) -> str:
    """Run a job to completion (idempotent: a finished or foreign-leased job is left alone)."""
    settings = settings or get_settings()
    owner = jobs.lease_owner()
    with session_scope() as session:
        claim = jobs.claim_job(
            session=session,
            job_id=job_id,
            owner=owner,
            lease_seconds=settings.job_lease_seconds,
            max_attempts=settings.job_max_attempts,
        )
    if not claim.claimed:
        log.info("job not claimed", extra={"job_id": job_id, "reason": claim.reason})
        return claim.reason
    log.info("job claimed", extra={"job_id": job_id, "attempt": claim.attempts})
    run = JobRun(job_id, settings, owner)
    heartbeat = run.start_heartbeat()
    try:
        _execute(run)
    except (MedcadError, DecodeError) as exc:
        _record_failure(job_id, owner, exc.code, exc.detail)
        return f"failed: {exc.code}"
    except OperationalError:
        # The database is unreachable. Not the job's fault: never fail it. Once the database
        # answers again, give the job back (queued, this attempt not counted) so it neither waits
        # for its lease to expire nor moves closer to the attempt limit; if the database stays
        # away, the task is retried and the sweeper reclaims the job when its lease expires.
        log.warning("database unavailable during job", extra={"job_id": job_id})
        if _release_when_database_returns(job_id, owner, settings):
            return "released: database unavailable"
        raise
    except Exception as exc:  # an unexpected bug must end the job, not loop it
        # Only the type and stage are recorded: library messages may quote header values (PHI).
        log.error("job crashed", extra={"job_id": job_id, "error_type": type(exc).__name__})
        _record_failure(
            job_id, owner, "internal_error", f"{type(exc).__name__} during stage {run.current}"
        )
        return "failed: internal_error"
    finally:
        heartbeat.set()
    forward_job_outputs(job_id, settings)
    return "succeeded"


def _release_when_database_returns(job_id: str, owner: str, settings: Settings) -> bool:
    """Wait (up to one lease length) for the database, then hand the job back to the queue.

    True when the job is no longer this process's business (released, or already taken over);
    False when the database did not come back in time.
    """
    from app.queue import send_job

    deadline = time.monotonic() + settings.job_lease_seconds
    while time.monotonic() < deadline:
        time.sleep(1.0)
        try:
            with session_scope() as session:
                released = jobs.release_job(session=session, job_id=job_id, owner=owner)
        except OperationalError:
            continue
        if released:
            send_job(job_id)
            log.info("job released after a database outage", extra={"job_id": job_id})
        return True
    return False


def _record_failure(job_id: str, owner: str, code: str, detail: str) -> None:
    with session_scope() as session:
        job = session.get(JobRecord, job_id)
        if job is not None and job.status == JobStatus.RUNNING and job.lease_owner == owner:
            jobs.fail_job(session=session, job=job, code=code, detail=detail)
    log.info("job failed", extra={"job_id": job_id, "error": code})


def _execute(run: JobRun) -> None:
    rows, model_keys, options = _load_instances(run.job_id)
    extra = [SaliencyMethod(m) for m in options.get("saliency", [])]
    requested_budget = options.get("saliency_budget")
    models = resolve_job_models(model_keys, run.settings)
    run.stage("decode")
    t = time.perf_counter()
    series = decode_series(rows, run.store)
    run.timed("decode", time.perf_counter() - t)
    preprocessed: dict[str, NDArray[np.float32]] = {}  # models sharing a preprocessing share x
    modality = str(series.datasets[0].get("Modality", "") or "")
    threads = ort_threads(run.settings)
    voxel_mm3 = voxel_volume_mm3(series)  # the same for every model
    with OutputBuilder(run, series, overlap=True, models=len(models)) as outputs:
        for model in models:
            run.stage(f"infer:{model.manifest.name}")
            intended = model.manifest.preprocessing.modalities
            if intended and modality not in intended:
                run.warnings.append(
                    {
                        "code": "outside_intended_use",
                        "detail": f"{model.manifest.key}: modality {modality or 'unknown'!r} is "
                        f"not one of {intended}; results are out of distribution",
                    }
                )
            session = onnx_sessions.get_session(
                model,
                intra_op_threads=threads,
                inter_op_threads=run.settings.ort_inter_op_threads,
            )
            analysis = analyze_series(
                session.run,
                model.manifest,
                series.frames,
                max_forward_passes=int(requested_budget)
                if requested_budget
                else min(
                    run.settings.saliency_max_forward_passes,
                    model.manifest.saliency.max_forward_passes,
                ),
                extra_methods=extra,
                preprocessed=preprocessed,
                voxel_mm3=voxel_mm3,
            )
            for name, seconds in analysis.timings.items():
                run.timed(f"{name}:{model.manifest.name}", seconds)
            outputs.add(analysis)
        run.stage("outputs")
        t = time.perf_counter()
        rows = outputs.result_rows()
        run.timed("outputs", time.perf_counter() - t)
        t = time.perf_counter()
        _publish_results(run, rows, outputs.analyses)
        run.timed("commit", time.perf_counter() - t)
        run.stage("dicom")
        t = time.perf_counter()
        objects = outputs.dicom_rows()
        run.timed("dicom", time.perf_counter() - t)
    _commit_dicom(run, objects, outputs.analyses)


@dataclass
class _PendingOutputs:
    """One model's outputs in the making: its saliency maps and their rendering futures."""

    analysis: ModelAnalysis
    maps: list[SaliencyResult]
    saliency: list[Future[SaliencyRecord]]
    masks: list[Future[tuple[str, str]]]


class OutputBuilder:
    """Builds every model's records in two sets: the result rows first, the DICOM objects after.

    The result rows are what a reader needs to see what the models found: masks, findings,
    lesions and saliency maps, with their PNGs and float maps. The DICOM objects (SEG, the
    findings SR, Parametric Maps) are derived from the same analyses and cost a fixed 0.2-0.3 s
    of pure Python per job whatever its size (highdicom builds and checks each object), so the
    runner commits the result rows first (``result_rows``) and builds the objects after
    (``dicom_rows``): a one-slice job's masks are readable that much sooner.

    Per-frame images (saliency maps, label maps and their overlays) are rendered by a small
    thread pool: PNG compression, hashing and the blob store's fsync release the GIL. The rows
    and the DICOM objects are each built on one thread of their own, model after model.

    With ``overlap`` (what the workers do), a model's rows and objects are built while the next
    model runs: onnxruntime releases the GIL, so the builder threads use a spare core, or the
    gaps onnxruntime's threads leave and the time the renderers spend waiting on fsync. The
    last model's objects (of ``models``) wait until ``dicom_rows``, after the result rows are
    committed, so that they do not compete with that model's rows. Without ``overlap``,
    everything is built when asked for, as one loop would. Either way the rows come out in the
    same order with the same content, and the warnings in model order.
    """

    def __init__(
        self, run: JobRun, series: DecodedSeries, *, overlap: bool, models: int = 0
    ) -> None:
        self.run = run
        self.series = series
        self.overlap = overlap
        self.models = models
        self.analyses: list[ModelAnalysis] = []
        self._pool = ThreadPoolExecutor(max_workers=min(4, _cores()), thread_name_prefix="render")
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outputs")
        self._dicom = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dicom")
        self._rows: list[Future[list[Any]]] = []
        self._objects: list[Future[tuple[list[ArtifactRecord], list[dict[str, str]]]]] = []

    def __enter__(self) -> OutputBuilder:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # on failure, work not started yet is dropped; running work finishes (its blobs are
        # orphans for the scrubber, as after a crash)
        failed = exc_type is not None
        self._dicom.shutdown(wait=True, cancel_futures=failed)
        self._builder.shutdown(wait=True, cancel_futures=failed)
        self._pool.shutdown(wait=True, cancel_futures=failed)

    def add(self, analysis: ModelAnalysis) -> None:
        """Queue one model's outputs (started now when overlapping, else when asked for)."""
        self.analyses.append(analysis)
        if self.overlap:
            self._submit_rows(analysis)
            if len(self.analyses) < self.models:  # not the last model
                self._submit_objects(analysis)

    def result_rows(self) -> list[Any]:
        """Every model's result rows (no DICOM objects), in model order (waits for them)."""
        if not self.overlap:
            for analysis in self.analyses:
                self._submit_rows(analysis)
        return [row for future in self._rows for row in future.result()]

    def dicom_rows(self) -> list[ArtifactRecord]:
        """Every model's DICOM objects, then the series' findings SR (waits for them); the
        objects the sources cannot support become entries of the job's warnings instead."""
        for analysis in self.analyses[len(self._objects) :]:
            self._submit_objects(analysis)
        out: list[ArtifactRecord] = []
        for future in self._objects:
            records, warnings = future.result()
            out.extend(records)
            self.run.warnings.extend(warnings)
        t = time.perf_counter()
        out.extend(
            dicom_outputs.findings_report(
                self.run.sink, self.series, self.analyses, self.run.warnings
            )
        )
        self.run.timed("outputs_built", time.perf_counter() - t)
        return out

    def _submit_rows(self, analysis: ModelAnalysis) -> None:
        pending = _start_model_outputs(self.run, self.series, analysis, self._pool)
        self._rows.append(self._builder.submit(self._finish_rows, pending))

    def _submit_objects(self, analysis: ModelAnalysis) -> None:
        self._objects.append(self._dicom.submit(self._build_objects, analysis))

    def _finish_rows(self, pending: _PendingOutputs) -> list[Any]:
        t = time.perf_counter()
        built = _finish_model_outputs(self.run, self.series, pending)
        self.run.timed("outputs_built", time.perf_counter() - t)
        return built

    def _build_objects(
        self, analysis: ModelAnalysis
    ) -> tuple[list[ArtifactRecord], list[dict[str, str]]]:
        t = time.perf_counter()
        warnings: list[dict[str, str]] = []
        built = dicom_outputs.model_objects(self.run.sink, self.series, analysis, warnings)
        self.run.timed("outputs_built", time.perf_counter() - t)
        return built, warnings


def build_records(run: JobRun, series: DecodedSeries, analyses: list[ModelAnalysis]) -> list[Any]:
    """Render PNGs/maps/DICOM objects, store their blobs, and return the rows to insert."""
    with OutputBuilder(run, series, overlap=False) as outputs:
        for analysis in analyses:
            outputs.add(analysis)
        rows: list[Any] = outputs.result_rows()
        return rows + list(outputs.dicom_rows())


def _start_model_outputs(
    run: JobRun, series: DecodedSeries, analysis: ModelAnalysis, pool: ThreadPoolExecutor
) -> _PendingOutputs:
    """Submit a model's per-frame renderings to the pool."""
    name, version = analysis.manifest.name, analysis.manifest.version
    maps = analysis.saliency
    return _PendingOutputs(
        analysis=analysis,
        maps=maps,
        saliency=[pool.submit(_saliency_record, run, series, name, version, sal) for sal in maps],
        masks=[pool.submit(_mask_images, run, analysis, i) for i in range(len(series.refs))]
        if analysis.segmentation is not None
        else [],
    )


def _finish_model_outputs(
    run: JobRun, series: DecodedSeries, pending: _PendingOutputs
) -> list[Any]:
    """A model's result rows: saliency maps, masks, lesions and findings."""
    analysis = pending.analysis
    records: list[Any] = []
    saliency_ids: dict[tuple[int, str], str] = {}
    for sal, future in zip(pending.maps, pending.saliency, strict=True):
        record = future.result()
        records.append(record)
        saliency_ids[(sal.index, sal.method.value)] = record.id
    if analysis.segmentation is not None:
        records.extend(_mask_records(run, series, analysis, saliency_ids, pending.masks))
        records.extend(_lesion_records(run, series, analysis, saliency_ids))
    if analysis.classification is not None:
        records.extend(_finding_records(run, series, analysis, saliency_ids))
    return records


def _saliency_record(
    run: JobRun, series: DecodedSeries, model: str, version: str, sal: SaliencyResult
) -> SaliencyRecord:
    ref = series.refs[sal.index]
    lo, hi = sal.display_range
    blob, _meta = saliency_maps.encode_map(sal.values)
    overlay = overlays.render_saliency_overlay(
        sal.values,
        vmin=lo,
        vmax=hi,
        colormap="inferno",
        alpha_max=0.75,
        suppressed=sal.suppressed,
    )
    params = dict(sal.params, colorbar_sha256=_colorbar_sha256(run, lo, hi, _legend(sal)))
    return SaliencyRecord(
        id=new_id(),
        job_id=run.job_id,
        model=model,
        model_version=version,
        method=sal.method.value,
        sop_instance_uid=ref.sop_instance_uid,
        frame=ref.frame,
        target=sal.target,
        blob_sha256=run.store.put(blob),
        overlay_sha256=run.store.put(overlay),
        display_lo=float(lo),
        display_hi=float(hi),
        suppressed=sal.suppressed,
        params=params,
    )


def _colorbar_sha256(run: JobRun, lo: float, hi: float, label: str) -> str:
    """The stored colour bar for a display range and legend (rendered once per job)."""
    key = (float(lo), float(hi), label)
    sha = run.colorbars.get(key)
    if sha is None:  # two threads may both render it: same bytes, same key
        colorbar = overlays.render_colorbar(lo, hi, colormap="inferno", label=label)
        sha = run.colorbars[key] = run.store.put(colorbar)
    return sha


_LEGENDS = {
    "cam": "class activation (logit contribution)",
    "occlusion": "score drop when occluded",
    "rise": "RISE importance",
    "entropy": "uncertainty (normalised entropy)",
    "tta_std": "uncertainty (TTA std)",
}


def _legend(sal: SaliencyResult) -> str:
    return _LEGENDS.get(sal.method.value, sal.method.value)


def _mask_images(run: JobRun, analysis: ModelAnalysis, i: int) -> tuple[str, str]:
    """Store frame ``i``'s label map PNG and its overlay; their blob keys."""
    seg = analysis.segmentation
    assert seg is not None
    colors = {
        lab.value: lab.color or (255, 0, 0) for lab in analysis.manifest.labels if lab.value != 0
    }
    labels = seg.labels[i]
    return (
        run.store.put(overlays.render_label_png(labels)),
        run.store.put(overlays.render_label_overlay(labels, colors, alpha=0.45)),
    )


def _mask_records(
    run: JobRun,
    series: DecodedSeries,
    analysis: ModelAnalysis,
    saliency_ids: dict[tuple[int, str], str],
    images: list[Future[tuple[str, str]]],
) -> list[MaskRecord]:
    seg = analysis.segmentation
    assert seg is not None
    manifest = analysis.manifest
    spacing = _pixel_area_mm2(series)
    linked_by_frame: dict[int, list[str]] = {}
    for (idx, _m), v in saliency_ids.items():
        linked_by_frame.setdefault(idx, []).append(v)
    out: list[MaskRecord] = []
    for i, ref in enumerate(series.refs):
        stats = [
            dict(s, area_mm2=round(s["pixels"] * spacing, 2) if spacing else None)
            for s in seg.stats[i]
        ]
        linked = linked_by_frame.get(i, [])
        blob_sha256, overlay_sha256 = images[i].result()
        out.append(
            MaskRecord(
                job_id=run.job_id,
                model=manifest.name,
                model_version=manifest.version,
                sop_instance_uid=ref.sop_instance_uid,
                frame=ref.frame,
                blob_sha256=blob_sha256,
                overlay_sha256=overlay_sha256,
                labels=[dict(s, saliency_ids=linked) for s in stats] if stats else [],
            )
        )
    return out


def voxel_volume_mm3(series: DecodedSeries) -> float | None:
    """Pixel area × slice spacing of the series, or None when either is unknown."""
    area = _pixel_area_mm2(series)
    if area is None or series.slice_spacing_mm is None:
        return None
    return area * series.slice_spacing_mm


def _pixel_area_mm2(series: DecodedSeries) -> float | None:
    ds = series.datasets[0]
    spacing = ds.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        return None
    return float(spacing[0]) * float(spacing[1])


def _finding_records(
    run: JobRun,
    series: DecodedSeries,
    analysis: ModelAnalysis,
    saliency_ids: dict[tuple[int, str], str],
) -> list[FindingRecord]:
    cls = analysis.classification
    manifest = analysis.manifest
    assert cls is not None and manifest.classification is not None
    label = manifest.classification.positive_label
    method = manifest.saliency.methods[0].value if manifest.saliency.methods else ""
    out = [
        FindingRecord(
            job_id=run.job_id,
            model=manifest.name,
            model_version=manifest.version,
            label=label,
            probability=float(cls.probabilities[i]),
            positive=bool(cls.positive[i]),
            uncertain=bool(cls.uncertain[i]),
            level="slice",
            sop_instance_uid=ref.sop_instance_uid,
            frame=ref.frame,
            extra={"saliency_id": saliency_ids.get((i, method))},
        )
        for i, ref in enumerate(series.refs)
    ]
    top = series.refs[cls.series_index]
    out.append(
        FindingRecord(
            job_id=run.job_id,
            model=manifest.name,
            model_version=manifest.version,
            label=label,
            probability=cls.series_probability,
            positive=cls.series_positive,
            uncertain=cls.series_uncertain,
            level="series",
            sop_instance_uid=None,
            frame=None,
            extra={
                "saliency_id": saliency_ids.get((cls.series_index, method)),
                "aggregation": manifest.classification.series_aggregation,
                "driving_sop_instance_uid": top.sop_instance_uid,
                "driving_frame": top.frame,
            },
        )
    )
    return out


def _lesion_records(
    run: JobRun,
    series: DecodedSeries,
    analysis: ModelAnalysis,
    saliency_ids: dict[tuple[int, str], str],
) -> list[FindingRecord]:
    """One ``lesion`` finding per kept component of a filtered structure (e.g. each nodule).

    The finding sits on the lesion's key frame (its largest cross-section); its probability is
    the component's highest voxel probability, the score the component filter ranked it by.
    Its saliency is the structure occlusion map of the key frame when one was computed, else
    the uncertainty map of that frame.
    """
    seg = analysis.segmentation
    assert seg is not None
    manifest = analysis.manifest
    out: list[FindingRecord] = []
    for lesion in seg.lesions:
        key = series.refs[lesion.key_frame]
        first, last = (series.refs[i] for i in lesion.frames)
        saliency_id = next(
            (
                saliency_ids[(lesion.key_frame, m)]
                for m in _LESION_SALIENCY
                if (lesion.key_frame, m) in saliency_ids
            ),
            None,
        )
        out.append(
            FindingRecord(
                job_id=run.job_id,
                model=manifest.name,
                model_version=manifest.version,
                label=lesion.structure,
                probability=lesion.max_probability,
                positive=True,
                uncertain=lesion.uncertain,
                level="lesion",
                sop_instance_uid=key.sop_instance_uid,
                frame=key.frame,
                extra={
                    "saliency_id": saliency_id,
                    "lesion": {
                        "number": lesion.number,
                        "volume_mm3": _rounded(lesion.volume_mm3, 1),
                        "equivalent_diameter_mm": _rounded(lesion.equivalent_diameter_mm, 1),
                        "first": {"sop_instance_uid": first.sop_instance_uid, "frame": first.frame},
                        "last": {"sop_instance_uid": last.sop_instance_uid, "frame": last.frame},
                        "frame_count": lesion.frames[1] - lesion.frames[0] + 1,
                        "centroid": {
                            "row": round(lesion.centroid[1], 1),
                            "column": round(lesion.centroid[2], 1),
                        },
                    },
                },
            )
        )
    return out


# what explains a lesion best: the structure's own evidence, then the model's uncertainty
_LESION_SALIENCY = ("occlusion", "rise", "entropy", "tta_std")


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _uncertain(analyses: list[ModelAnalysis]) -> bool:
    flags = [a.segmentation.uncertain for a in analyses if a.segmentation is not None]
    flags += [a.classification.series_uncertain for a in analyses if a.classification is not None]
    return any(flags)


def _owned_job(session: Session, run: JobRun) -> JobRecord:
    """The job's row, if this attempt still holds its lease."""
    job = session.get(JobRecord, run.job_id)
    if job is None or job.status != JobStatus.RUNNING or job.lease_owner != run.owner:
        raise PipelineError("lease_lost", "the job's lease was reclaimed by another worker")
    return job


def _publish_results(run: JobRun, rows: list[Any], analyses: list[ModelAnalysis]) -> None:
    """Replace the job's result set with ``rows`` and make it readable, in one transaction.

    The previous attempt's DICOM objects go too: a result set and its objects always come
    from the same attempt. The job stays running, under its lease, until ``_commit_dicom``.
    """
    with session_scope() as session:
        job = _owned_job(session, run)
        for table in (FindingRecord, MaskRecord, SaliencyRecord, ArtifactRecord):
            session.execute(delete(table).where(table.job_id == run.job_id))
        session.add_all(rows)
        # written before the job is stamped: its results_at is then the moment its rows are
        # (only the job's own row and the commit follow), which clients can time against
        session.flush()
        jobs.publish_results(
            session=session, job=job, timings=dict(run.timings), uncertain=_uncertain(analyses)
        )
        job.warnings = list(run.warnings)


def _commit_dicom(
    run: JobRun, objects: list[ArtifactRecord], analyses: list[ModelAnalysis]
) -> None:
    """Add the job's DICOM objects and mark it succeeded, in one transaction."""
    with session_scope() as session:
        job = _owned_job(session, run)
        session.add_all(objects)
        session.flush()
        jobs.succeed_job(
            session=session, job=job, timings=dict(run.timings), uncertain=_uncertain(analyses)
        )
        job.warnings = list(run.warnings)


def fail_on_time_limit(job_id: str) -> None:
    """Record that a job exceeded the task time limit (called by the task guard)."""
    with session_scope() as session:
        job = session.get(JobRecord, job_id)
        if job is not None and job.status == JobStatus.RUNNING:
            jobs.fail_job(
                session=session,
                job=job,
                code="time_limit",
                detail="the job exceeded the worker's time limit",
            )
