"""Pydantic schemas of the REST API (request and response bodies)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, Field


def _as_utc(value: Any) -> Any:
    # SQLite returns naive datetimes; everything medcad stores is UTC, so say so on the wire.
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


UtcDatetime = Annotated[AwareDatetime, BeforeValidator(_as_utc)]


class ErrorBody(BaseModel):
    """Every error: a stable code and a detail naming the offending value."""

    error: str = Field(examples=["not_dicom"])
    detail: str = Field(examples=["scan.txt: no DICM prefix and not a parseable dataset"])


class JobRef(BaseModel):
    id: str
    series_instance_uid: str
    status: str


class RejectedFile(BaseModel):
    filename: str
    error: str
    detail: str


class FileResult(BaseModel):
    filename: str
    outcome: Literal["stored", "duplicate", "rejected"]
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    error: str | None = None
    detail: str | None = None


class UploadResponse(BaseModel):
    """What happened to an upload: jobs created, files stored, duplicates and rejections."""

    jobs: list[JobRef]
    stored: int
    duplicates: int
    rejected: list[RejectedFile]
    files: list[FileResult]


class JobError(BaseModel):
    code: str
    detail: str


class JobWarning(BaseModel):
    code: str
    detail: str


class Webhook(BaseModel):
    url_host: str
    status: str
    attempts: int


class Job(BaseModel):
    """A job's state: queue position and ETA while queued, stage while running."""

    id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    stage: str | None
    queue_position: int | None
    eta_seconds: float | None
    models: list[str]
    timings: dict[str, float]
    error: JobError | None
    warnings: list[JobWarning] = []
    attempts: int
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    instance_count: int
    uncertain: bool | None
    webhook: Webhook | None


class Page(BaseModel):
    total: int
    limit: int
    offset: int


class JobPage(Page):
    items: list[Job]


class WindowSchema(BaseModel):
    center: float
    width: float


class InstanceInfo(BaseModel):
    sop_instance_uid: str
    instance_number: int | None
    frames: int
    rows: int | None
    columns: int | None
    window: WindowSchema | None


class SeriesInfo(BaseModel):
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    instances: list[InstanceInfo]


class FindingOut(BaseModel):
    id: str
    model: str
    model_version: str
    label: str
    probability: float
    positive: bool
    uncertain: bool
    level: Literal["slice", "series"]
    sop_instance_uid: str | None
    frame: int | None
    saliency_id: str | None


class MaskLabel(BaseModel):
    value: int
    name: str
    pixels: int
    area_mm2: float | None = None


class MaskOut(BaseModel):
    id: str
    model: str
    model_version: str
    sop_instance_uid: str
    frame: int
    labels: list[MaskLabel]
    url: str
    overlay_url: str
    saliency_ids: list[str]


class SaliencyOut(BaseModel):
    id: str
    model: str
    model_version: str
    method: str
    sop_instance_uid: str
    frame: int
    url: str
    overlay_url: str
    colorbar_url: str
    display_range: tuple[float, float]
    suppressed: bool
    target: str | None
    params: dict[str, Any]


class DicomLink(BaseModel):
    model: str
    url: str
    method: str | None = None
    sop_instance_uid: str | None = None


class DicomOutputs(BaseModel):
    seg: list[DicomLink] = []
    sr: list[DicomLink] = []
    pmap: list[DicomLink] = []


class Results(BaseModel):
    """Everything a succeeded job produced."""

    job_id: str
    status: str
    uncertain: bool | None
    series: SeriesInfo
    findings: list[FindingOut]
    masks: list[MaskOut]
    saliency: list[SaliencyOut]
    dicom: DicomOutputs


class ModelLabel(BaseModel):
    value: int
    name: str
    color: tuple[int, int, int] | None


class ModelOut(BaseModel):
    name: str
    version: str
    task: str
    description: str
    labels: list[ModelLabel]
    default: bool
    saliency_methods: list[str]
    input_size: tuple[int, int]
    metrics: dict[str, Any]


class ModelList(BaseModel):
    items: list[ModelOut]


class Me(BaseModel):
    name: str
    role: str
    key_prefix: str


class AuditEvent(BaseModel):
    id: int
    at: UtcDatetime
    actor_name: str | None
    action: str
    resource: str
    outcome: str
    client: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None


class AuditPage(Page):
    items: list[AuditEvent]


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No or invalid API key"},
    403: {"model": ErrorBody, "description": "The key's role may not do this"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "Not found"}}
