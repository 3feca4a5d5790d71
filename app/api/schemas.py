"""Pydantic schemas of the REST API (request and response bodies)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field


def _as_utc(value: Any) -> Any:
    # SQLite returns naive datetimes; everything medcad stores is UTC, so say so on the wire.
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


UtcDatetime = Annotated[AwareDatetime, BeforeValidator(_as_utc)]

# Example values for the OpenAPI description: one CT series through the shipped models.
_STUDY = "1.2.826.0.1.3680043.8.498.10952716306271532453127845672340965173"
_SERIES = "1.2.826.0.1.3680043.8.498.21688549342248767199514913713792819343"
_SOP = "1.2.826.0.1.3680043.8.498.73025310417846519263514800172964317055"
_JOB = "0b7e6a1c9d2f4e58a3c1b2d4e6f80912"
_EXAMPLE_JOB: dict[str, Any] = {
    "id": _JOB,
    "status": "queued",
    "stage": None,
    "queue_position": 2,
    "eta_seconds": 24.0,
    "models": ["classifier:1.1.0", "segnet:1.3.0", "unet:1.2.0"],
    "timings": {},
    "error": None,
    "warnings": [],
    "attempts": 0,
    "created_at": "2026-01-05T09:30:00Z",
    "started_at": None,
    "results_at": None,
    "finished_at": None,
    "study_instance_uid": _STUDY,
    "series_instance_uid": _SERIES,
    "modality": "CT",
    "instance_count": 40,
    "uncertain": None,
    "webhook": {"url_host": "ris.example.org", "status": "pending", "attempts": 0},
}


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

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "jobs": [{"id": _JOB, "series_instance_uid": _SERIES, "status": "queued"}],
                    "stored": 2,
                    "duplicates": 0,
                    "rejected": [
                        {
                            "filename": "notes.txt",
                            "error": "not_dicom",
                            "detail": "notes.txt: no DICM prefix",
                        }
                    ],
                    "files": [
                        {
                            "filename": "IM0001.dcm",
                            "outcome": "stored",
                            "sop_instance_uid": _SOP,
                            "series_instance_uid": _SERIES,
                            "error": None,
                            "detail": None,
                        },
                        {
                            "filename": "IM0002.dcm",
                            "outcome": "stored",
                            "sop_instance_uid": _SOP + "2",
                            "series_instance_uid": _SERIES,
                            "error": None,
                            "detail": None,
                        },
                        {
                            "filename": "notes.txt",
                            "outcome": "rejected",
                            "sop_instance_uid": None,
                            "series_instance_uid": None,
                            "error": "not_dicom",
                            "detail": "notes.txt: no DICM prefix",
                        },
                    ],
                }
            ]
        }
    )

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

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE_JOB]})

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
    results_at: UtcDatetime | None = Field(
        description="When the masks, findings and saliency maps became readable at "
        "`/jobs/{id}/results`; the job succeeds once its DICOM objects are stored too"
    )
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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [_EXAMPLE_JOB], "total": 1, "limit": 50, "offset": 0}]
        }
    )

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


class FrameRef(BaseModel):
    sop_instance_uid: str
    frame: int


class PixelPoint(BaseModel):
    row: float
    column: float


class LesionOut(BaseModel):
    """One segmented lesion (a 3-D connected component kept by the model's component filter).

    ``number`` ranks the model's lesions of this label by volume (1 = largest). The finding's
    ``sop_instance_uid``/``frame`` is the key slice (largest cross-section); ``centroid`` is
    the lesion's centre of mass on that grid, in source pixels. Volume and the equivalent
    sphere diameter are null when Pixel Spacing or the slice spacing is unknown.
    """

    number: int
    volume_mm3: float | None
    equivalent_diameter_mm: float | None
    first: FrameRef
    last: FrameRef
    frame_count: int
    centroid: PixelPoint


class FindingOut(BaseModel):
    """A classifier's slice or series label, or a segmenter's lesion (``level`` says which).

    ``probability`` is the calibrated probability for slice and series findings, and the
    lesion's highest voxel probability for lesion findings.
    """

    id: str
    model: str
    model_version: str
    label: str
    probability: float
    positive: bool
    uncertain: bool
    level: Literal["slice", "series", "lesion"]
    sop_instance_uid: str | None
    frame: int | None
    saliency_id: str | None
    lesion: LesionOut | None = None


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
    """Everything a job produced (its DICOM objects once it has succeeded)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": _JOB,
                    "status": "succeeded",
                    "complete": True,
                    "uncertain": False,
                    "series": {
                        "study_instance_uid": _STUDY,
                        "series_instance_uid": _SERIES,
                        "modality": "CT",
                        "instances": [
                            {
                                "sop_instance_uid": _SOP,
                                "instance_number": 1,
                                "frames": 1,
                                "rows": 512,
                                "columns": 512,
                                "window": {"center": -600.0, "width": 1500.0},
                            }
                        ],
                    },
                    "findings": [
                        {
                            "id": "f1",
                            "model": "classifier",
                            "model_version": "1.1.0",
                            "label": "nodule",
                            "probability": 0.91,
                            "positive": True,
                            "uncertain": False,
                            "level": "series",
                            "sop_instance_uid": None,
                            "frame": None,
                            "saliency_id": "s1",
                        },
                        {
                            "id": "f2",
                            "model": "unet",
                            "model_version": "1.1.0",
                            "label": "nodule",
                            "probability": 0.99,
                            "positive": True,
                            "uncertain": False,
                            "level": "lesion",
                            "sop_instance_uid": _SOP,
                            "frame": 0,
                            "saliency_id": "s2",
                            "lesion": {
                                "number": 1,
                                "volume_mm3": 412.5,
                                "equivalent_diameter_mm": 9.2,
                                "first": {"sop_instance_uid": _SOP, "frame": 0},
                                "last": {"sop_instance_uid": _SOP, "frame": 0},
                                "frame_count": 1,
                                "centroid": {"row": 301.4, "column": 188.0},
                            },
                        },
                    ],
                    "masks": [
                        {
                            "id": "m1",
                            "model": "unet",
                            "model_version": "1.1.0",
                            "sop_instance_uid": _SOP,
                            "frame": 0,
                            "labels": [
                                {"value": 1, "name": "lung", "pixels": 30008, "area_mm2": 17255.0},
                                {"value": 2, "name": "nodule", "pixels": 148, "area_mm2": 85.1},
                            ],
                            "url": "/api/v1/masks/m1.png",
                            "overlay_url": "/api/v1/masks/m1/overlay.png",
                            "saliency_ids": ["s2"],
                        }
                    ],
                    "saliency": [
                        {
                            "id": "s1",
                            "model": "classifier",
                            "model_version": "1.1.0",
                            "method": "cam",
                            "sop_instance_uid": _SOP,
                            "frame": 0,
                            "url": "/api/v1/saliency/s1.npy",
                            "overlay_url": "/api/v1/saliency/s1/overlay.png",
                            "colorbar_url": "/api/v1/saliency/s1/colorbar.png",
                            "display_range": [0.0, 1.0],
                            "suppressed": False,
                            "target": "nodule",
                            "params": {},
                        }
                    ],
                    "dicom": {
                        "seg": [
                            {
                                "model": "unet",
                                "url": "/api/v1/artifacts/a1",
                                "method": None,
                                "sop_instance_uid": _SOP + "9",
                            }
                        ],
                        "sr": [],
                        "pmap": [],
                    },
                }
            ]
        }
    )

    job_id: str
    status: str
    complete: bool = Field(
        description="False while the job still builds its DICOM objects from these results "
        "(`dicom` is empty until then); true once it has succeeded"
    )
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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "name": "unet",
                            "version": "1.0.0",
                            "task": "segmentation",
                            "description": "U-Net: lungs and nodules on chest CT",
                            "labels": [
                                {"value": 0, "name": "background", "color": None},
                                {"value": 1, "name": "lung", "color": [80, 160, 255]},
                                {"value": 2, "name": "nodule", "color": [255, 80, 80]},
                            ],
                            "default": True,
                            "saliency_methods": ["entropy", "occlusion"],
                            "input_size": [256, 256],
                            "metrics": {"dice_nodule": 0.71},
                        }
                    ]
                }
            ]
        }
    )

    items: list[ModelOut]


class Me(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "pacs-bridge", "role": "uploader", "key_prefix": "3f9a1c2b"}]
        }
    )

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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "id": 1042,
                            "at": "2026-01-05T09:31:12Z",
                            "actor_name": "pacs-bridge",
                            "action": "download",
                            "resource": "artifact/a1",
                            "outcome": "success",
                            "client": "10.0.0.7",
                            "study_instance_uid": _STUDY,
                            "series_instance_uid": _SERIES,
                        }
                    ],
                    "total": 1,
                    "limit": 50,
                    "offset": 0,
                }
            ]
        }
    )

    items: list[AuditEvent]


RETRY_AFTER: dict[str, Any] = {
    "Retry-After": {
        "description": "Seconds to wait before trying again",
        "schema": {"type": "integer", "example": 30},
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No or invalid API key"},
    403: {"model": ErrorBody, "description": "The key's role may not do this"},
    429: {
        "model": ErrorBody,
        "description": "Over this key's request rate",
        "headers": RETRY_AFTER,
    },
    503: {
        "model": ErrorBody,
        "description": "The database or storage is unavailable",
        "headers": RETRY_AFTER,
    },
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "Not found"}}
