"""Prometheus metrics: the API's own counters, and job figures read from the database.

Uploads, files and rejections are counted where they happen, in the API process. Jobs run in
worker processes that may live on other hosts and serve no HTTP, so their figures (jobs by
status, failures by reason, stage durations by model) are read from the database when
``/metrics`` is scraped: every API process then reports the same, complete numbers, and no
worker needs a port of its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.db.records import JobRecord, JobStatus
from app.db.session import session_scope
from app.settings import get_settings

UPLOADS = Counter("medcad_uploads_total", "Upload requests", ["outcome"])
FILES = Counter("medcad_files_total", "Uploaded files by outcome", ["outcome"])
REJECTIONS = Counter("medcad_rejections_total", "Rejected files by error code", ["code"])

#: Stage durations are summarised over this many most recently created succeeded jobs.
RECENT_JOBS = 500
QUANTILES = (0.5, 0.95)


def stage_quantiles(
    timings: Iterable[Mapping[str, float]], quantiles: Iterable[float] = QUANTILES
) -> dict[tuple[str, str], tuple[int, dict[float, float]]]:
    """Per (stage, model): the number of jobs that ran the stage and its duration quantiles.

    A job's timings name a model's stages ``"<stage>:<model>"`` (``"infer:unet"``) and the
    job-wide ones plainly (``"decode"``, ``"outputs"``); the latter get the model ``""``.
    """
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    for job in timings:
        for key, value in job.items():
            stage, _, model = key.partition(":")
            seconds[(stage, model)].append(float(value))
    qs = tuple(quantiles)
    return {
        key: (len(values), dict(zip(qs, np.quantile(values, qs).tolist(), strict=True)))
        for key, values in sorted(seconds.items())
    }


class JobsCollector(Collector):
    """Job figures read from the database at scrape time; nothing when it cannot be read."""

    def collect(self) -> Iterator[Metric]:
        try:
            with session_scope() as session:
                by_status = dict(
                    session.execute(
                        select(JobRecord.status, func.count()).group_by(JobRecord.status)
                    )
                    .tuples()
                    .all()
                )
                failures = dict(
                    session.execute(
                        select(JobRecord.error_code, func.count())
                        .where(JobRecord.status == JobStatus.FAILED)
                        .group_by(JobRecord.error_code)
                    )
                    .tuples()
                    .all()
                )
                recent = session.scalars(
                    select(JobRecord.timings)
                    .where(JobRecord.status == JobStatus.SUCCEEDED)
                    .order_by(JobRecord.created_at.desc())
                    .limit(RECENT_JOBS)
                ).all()
        except Exception:  # metrics must answer even when the database does not
            return
        jobs = GaugeMetricFamily("medcad_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status.value, 0))
        yield jobs
        yield GaugeMetricFamily(
            "medcad_queue_depth", "Queued jobs", value=by_status.get(JobStatus.QUEUED.value, 0)
        )
        failed = GaugeMetricFamily(
            "medcad_job_failures", "Failed jobs in the database by reason", labels=["code"]
        )
        for code, count in sorted(failures.items(), key=lambda kv: str(kv[0])):
            failed.add_metric([code or "unknown"], count)
        yield failed
        stages = stage_quantiles(t or {} for t in recent)
        durations = GaugeMetricFamily(
            "medcad_job_stage_seconds",
            f"Stage durations by model over the last {RECENT_JOBS} succeeded jobs "
            "(model '' for job-wide stages)",
            labels=["stage", "model", "quantile"],
        )
        counted = GaugeMetricFamily(
            "medcad_job_stage_jobs",
            "Succeeded jobs behind medcad_job_stage_seconds, by stage and model",
            labels=["stage", "model"],
        )
        for (stage, model), (n, values) in stages.items():
            counted.add_metric([stage, model], n)
            for q, v in values.items():
                durations.add_metric([stage, model, f"{q:g}"], v)
        yield durations
        yield counted


_JOBS_REGISTRY = CollectorRegistry(auto_describe=False)
_JOBS_REGISTRY.register(JobsCollector())


def exposition() -> bytes:
    """The text a scrape of ``/metrics`` answers.

    With several API processes (under a ``medcad serve`` supervisor, which gives
    prometheus_client its multiprocess directory) the counters are the sums over all of them,
    whichever process answers the scrape.
    """
    if get_settings().api_supervisor_pid is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        own = generate_latest(registry)
    else:
        own = generate_latest(REGISTRY)
    return own + generate_latest(_JOBS_REGISTRY)
