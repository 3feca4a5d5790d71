"""Prometheus metrics of the API process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

UPLOADS = Counter("medcad_uploads_total", "Upload requests", ["outcome"])
FILES = Counter("medcad_files_total", "Uploaded files by outcome", ["outcome"])
REJECTIONS = Counter("medcad_rejections_total", "Rejected files by error code", ["code"])
QUEUE_DEPTH = Gauge("medcad_queue_depth", "Queued jobs")
JOBS = Gauge("medcad_jobs", "Jobs by status", ["status"])
JOB_STAGE_SECONDS = Histogram(
    "medcad_job_stage_seconds",
    "Job stage durations (from finished jobs)",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
JOB_FAILURES = Counter("medcad_job_failures_total", "Failed jobs by reason", ["code"])
