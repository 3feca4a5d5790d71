"""A Python client for the medcad REST API (sync, over ``httpx``).

It is what ``medcad submit`` uses, and it is meant for scripts and notebooks too::

    from pathlib import Path
    from app.client import Client

    with Client("http://127.0.0.1:8000", api_key="mc_...") as medcad:
        print(medcad.me().role)
        upload = medcad.upload(sorted(Path("series01").glob("*.dcm")), models=["unet"])
        jobs = medcad.wait([job.id for job in upload.jobs], timeout=600)
        for job in jobs.values():
            if job.status == "succeeded":
                tree = medcad.download_results(job.id, Path("results"))
                print(tree.root, len(tree.files))

Every failure the server reports arrives as :class:`ClientError` carrying the server's error
body (``{"error": code, "detail": text}``). Transient failures (connection errors, timeouts,
429/502/503/504) are retried with bounded exponential backoff and jitter, honouring
``Retry-After``; other 4xx/5xx answers are raised at once. Uploads may be retried safely because
the server deduplicates identical instances ("duplicate" outcome).
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import re
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "TERMINAL_STATUSES",
    "Client",
    "ClientError",
    "DicomOutputs",
    "DicomRef",
    "FileOutcome",
    "Finding",
    "Job",
    "JobRef",
    "JobWaitTimeout",
    "Mask",
    "Me",
    "ModelInfo",
    "Rejection",
    "ResultTree",
    "Results",
    "RetryPolicy",
    "Saliency",
    "UploadResult",
    "parse_retry_after",
    "retry_delay",
    "write_atomic",
]

logger = logging.getLogger("medcad.client")

T = TypeVar("T")

#: Job statuses after which a job never changes again.
TERMINAL_STATUSES = frozenset({"succeeded", "failed"})

#: Answers worth trying again: rate limited, or a gateway / the service is briefly unavailable.
RETRY_STATUSES = frozenset({429, 502, 503, 504})

# Network-level failures that may succeed on a new attempt. Deliberately not the whole
# ``httpx.TransportError`` family: an unsupported URL scheme or a protocol error on our own side
# fails the same way every time.
_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)

_CHUNK = 256 * 1024


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ClientError(Exception):
    """The server answered with an error, or could not be reached.

    Attributes
    ----------
    status
        HTTP status of the answer; ``0`` when no answer arrived (connection failure, timeout).
    code
        The server's error code (``"not_found"``, ``"payload_too_large"``, ...), or
        ``"connection_error"`` / ``"http_<status>"`` when the server sent no error body.
    detail
        The server's human-readable detail.
    body
        The whole decoded JSON body when there was one (e.g. an upload's per-file outcomes).
    """

    def __init__(
        self, status: int, code: str, detail: str, *, body: Mapping[str, Any] | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.body: Mapping[str, Any] = body or {}
        super().__init__(f"{status} {code}: {detail}" if status else f"{code}: {detail}")


class JobWaitTimeout(TimeoutError):
    """``Client.wait`` ran out of time; ``jobs`` holds the last state seen of every job."""

    def __init__(self, jobs: Mapping[str, Job], pending: Sequence[str]) -> None:
        self.jobs = dict(jobs)
        self.pending = list(pending)
        super().__init__(f"{len(self.pending)} job(s) still not finished")


# --------------------------------------------------------------------------------------------
# Schemas mirroring the REST contract. Unknown fields are kept (``extra="allow"``) so a newer
# server does not break an older client; fields the contract allows to be null default to None.
# --------------------------------------------------------------------------------------------


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Me(_Schema):
    """``GET /api/v1/me``: who the API key belongs to."""

    name: str
    role: str  # "viewer" | "uploader" | "admin"
    key_prefix: str = ""


class ModelLabel(_Schema):
    value: int
    name: str
    color: str | list[int] | None = None


class ModelInfo(_Schema):
    """One registered ML model (``GET /api/v1/models``)."""

    name: str
    version: str
    task: str
    description: str = ""
    labels: list[ModelLabel] = Field(default_factory=list)
    default: bool = False
    saliency_methods: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)


class JobRef(_Schema):
    """A job created by an upload."""

    id: str
    series_instance_uid: str | None = None
    status: str = "queued"


class Rejection(_Schema):
    filename: str
    error: str
    detail: str = ""


class FileOutcome(_Schema):
    """What the server did with one uploaded file (or one zip member)."""

    filename: str
    outcome: str  # "stored" | "duplicate" | "rejected"
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    error: str | None = None
    detail: str | None = None


class UploadResult(_Schema):
    """``POST /api/v1/studies``; also returned (not raised) when every file was rejected."""

    jobs: list[JobRef] = Field(default_factory=list)
    stored: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = Field(default_factory=list)
    files: list[FileOutcome] = Field(default_factory=list)
    http_status: int = 202


class JobError(_Schema):
    code: str
    detail: str = ""


class Webhook(_Schema):
    url_host: str
    status: str
    attempts: int = 0


class Job(_Schema):
    """``GET /api/v1/jobs/{id}``. ``status`` is queued, running, succeeded or failed."""

    id: str
    status: str
    stage: str | None = None
    queue_position: int | None = None
    eta_seconds: float | None = None
    models: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    error: JobError | None = None
    attempts: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    results_at: datetime | None = None
    finished_at: datetime | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    modality: str | None = None
    instance_count: int = 0
    uncertain: bool | None = None
    webhook: Webhook | None = None

    @property
    def done(self) -> bool:
        """True once the job can no longer change (succeeded or failed)."""
        return self.status in TERMINAL_STATUSES


class Window(_Schema):
    center: float
    width: float


class InstanceInfo(_Schema):
    sop_instance_uid: str
    instance_number: int | None = None
    frames: int = 1
    rows: int
    columns: int
    window: Window | None = None


class SeriesInfo(_Schema):
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None = None
    instances: list[InstanceInfo] = Field(default_factory=list)


class Finding(_Schema):
    id: str
    model: str
    model_version: str = ""
    label: str
    probability: float | None = None
    positive: bool | None = None
    uncertain: bool | None = None
    level: str = "series"  # "slice" | "series"
    sop_instance_uid: str | None = None
    frame: int | None = None
    saliency_id: str | None = None


class MaskLabel(_Schema):
    value: int
    name: str
    pixels: int = 0
    area_mm2: float | None = None


class Mask(_Schema):
    id: str
    model: str
    model_version: str = ""
    sop_instance_uid: str
    frame: int
    labels: list[MaskLabel] = Field(default_factory=list)
    url: str
    overlay_url: str | None = None
    saliency_ids: list[str] = Field(default_factory=list)


class Saliency(_Schema):
    id: str
    model: str
    model_version: str = ""
    method: str
    sop_instance_uid: str
    frame: int
    url: str
    overlay_url: str | None = None
    display_range: list[float] = Field(default_factory=list)
    suppressed: bool = False
    target: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class DicomRef(_Schema):
    model: str
    url: str
    method: str | None = None


class DicomOutputs(_Schema):
    seg: list[DicomRef] = Field(default_factory=list)
    sr: list[DicomRef] = Field(default_factory=list)
    pmap: list[DicomRef] = Field(default_factory=list)


class Results(_Schema):
    """``GET /api/v1/jobs/{id}/results``: readable once the job's ``results_at`` is set;
    ``complete`` (and the ``dicom`` objects) once it has succeeded."""

    job_id: str
    status: str
    complete: bool = True
    series: SeriesInfo
    findings: list[Finding] = Field(default_factory=list)
    masks: list[Mask] = Field(default_factory=list)
    saliency: list[Saliency] = Field(default_factory=list)
    dicom: DicomOutputs = Field(default_factory=DicomOutputs)


@dataclass(frozen=True)
class ResultTree:
    """Where ``Client.download_results`` wrote a job's results."""

    root: Path
    results: Results
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Retry policy (pure functions, unit-tested on their own)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried.

    ``attempts`` counts every try, the first included. The n-th retry waits a random time in
    ``[d/2, d]`` with ``d = min(max_delay, backoff * 2**(n-1))`` ("equal jitter", so parallel
    clients do not retry in lock step). A ``Retry-After`` from the server is honoured as given
    (plus up to 10 % jitter) unless it is longer than ``max_retry_after``: then the error is
    raised rather than blocking for that long.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 300.0


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3), or None if unusable.

    The header is either a number of seconds or an HTTP date.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def retry_delay(
    retry: int, policy: RetryPolicy, *, retry_after: float | None, rng: random.Random
) -> float | None:
    """Seconds to sleep before retry number ``retry`` (1-based); None means give up now."""
    if retry >= policy.attempts:
        return None
    if retry_after is not None:
        if retry_after > policy.max_retry_after:
            return None
        return retry_after + rng.uniform(0.0, 0.1 * retry_after)
    ceiling = min(policy.max_delay, policy.backoff * 2 ** (retry - 1))
    return rng.uniform(ceiling / 2, ceiling)


class _Transient(Exception):
    """Internal: an attempt failed in a way worth retrying."""

    def __init__(self, error: ClientError, retry_after: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


# --------------------------------------------------------------------------------------------
# Upload payloads
# --------------------------------------------------------------------------------------------

#: One file to upload: a path; raw bytes; or ``(filename, path_or_bytes)`` to choose the name
#: the server sees (names are only labels there, never used as paths).
UploadItem = str | os.PathLike[str] | bytes | tuple[str, "str | os.PathLike[str] | bytes"]


_RETRYABLE: tuple[type[Exception], ...] = (_Transient, *_TRANSIENT_ERRORS)


class _CountingReader:
    """A binary file wrapper that reports every chunk read (for upload progress bars)."""

    def __init__(self, raw: IO[bytes], on_bytes: Callable[[int], None]) -> None:
        self._raw = raw
        self._on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        if chunk:
            self._on_bytes(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()


class _ByteCounter:
    """Counts the bytes of one upload attempt and forwards them to a progress callback."""

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self._progress = progress
        self.sent = 0

    def __call__(self, n: int) -> None:
        self.sent += n
        if self._progress:
            self._progress(n)

    def rollback(self) -> None:
        if self._progress and self.sent:
            self._progress(-self.sent)
        self.sent = 0


def _content_type(name: str, head: bytes) -> str:
    if name.lower().endswith(".zip") or head.startswith(b"PK\x03\x04"):
        return "application/zip"
    return "application/dicom"


def _normalise_items(items: UploadItem | Iterable[UploadItem]) -> list[tuple[str, Path | bytes]]:
    if isinstance(items, str | bytes | os.PathLike | tuple):
        items = [items]
    out: list[tuple[str, Path | bytes]] = []
    for index, item in enumerate(items):
        if isinstance(item, tuple):
            name, source = item
            out.append((name, source if isinstance(source, bytes) else Path(source)))
        elif isinstance(item, bytes):
            out.append((f"upload-{index + 1}.dcm", item))
        else:
            path = Path(item)
            out.append((path.name, path))
    return out


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class Client:
    """A medcad server, seen from Python. Thread-safe: one instance may serve many threads.

    Parameters
    ----------
    server
        Base URL, e.g. ``"http://127.0.0.1:8000"``.
    api_key
        Sent as ``Authorization: Bearer <key>``; ``None`` only reaches public routes.
    timeout
        Seconds for each network operation (connect, each read, each write).
    retries
        Retries after the first try, or a full :class:`RetryPolicy`.
    max_connections
        Size of the connection pool (``medcad submit`` sets it to its concurrency).
    """

    def __init__(
        self,
        server: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int | RetryPolicy = 4,
        max_connections: int = 10,
    ) -> None:
        self.server = server.rstrip("/")
        self._policy = (
            retries if isinstance(retries, RetryPolicy) else RetryPolicy(attempts=retries + 1)
        )
        self._rng = random.Random()
        headers = {"User-Agent": "medcad-client", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.server,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections),
            follow_redirects=False,
        )
        self._origin = (
            self._http.base_url.scheme,
            self._http.base_url.host,
            self._http.base_url.port,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def me(self) -> Me:
        """Who the API key belongs to (a cheap sign-in check)."""
        return Me.model_validate(self._json("GET", "/api/v1/me"))

    def models(self) -> list[ModelInfo]:
        """The registered ML models."""
        body = self._json("GET", "/api/v1/models")
        return [ModelInfo.model_validate(item) for item in body.get("items", [])]

    def job(self, job_id: str) -> Job:
        """One job's current state."""
        return Job.model_validate(self._json("GET", f"/api/v1/jobs/{_segment(job_id)}"))

    def jobs(self, *, page_size: int = 50, **filters: str) -> Iterator[Job]:
        """Every job matching ``filters`` (``status``, ``study_instance_uid``,
        ``series_instance_uid``), newest first, fetching pages lazily.

        A job created while paging shifts later pages by one; ids already yielded are skipped
        so no job is returned twice.
        """
        seen: set[str] = set()
        offset = 0
        while True:
            params: dict[str, str | int] = {**filters, "limit": page_size, "offset": offset}
            body = self._json("GET", "/api/v1/jobs", params=params)
            items = body.get("items", [])
            for item in items:
                job = Job.model_validate(item)
                if job.id not in seen:
                    seen.add(job.id)
                    yield job
            offset += len(items)
            if not items or offset >= int(body.get("total", 0)):
                return

    def results(self, job_id: str) -> Results:
        """A job's results (``complete`` once it has succeeded); ``ClientError`` 409
        ``not_ready`` before its ``results_at``."""
        return Results.model_validate(self.results_json(job_id))

    def results_json(self, job_id: str) -> dict[str, Any]:
        """The results body exactly as the server sent it."""
        return self._json("GET", f"/api/v1/jobs/{_segment(job_id)}/results")

    def wait(
        self,
        job_ids: Iterable[str],
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_change: Callable[[Job], None] | None = None,
    ) -> dict[str, Job]:
        """Poll until every job has succeeded or failed; returns the final jobs by id.

        ``on_change`` is called (in this thread) whenever a job's status or stage changes,
        which lets a caller start downloading a job as soon as it ends. Raises
        :class:`JobWaitTimeout` after ``timeout`` seconds.
        """
        pending = list(dict.fromkeys(job_ids))
        latest: dict[str, Job] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for job_id in list(pending):
                job = self.job(job_id)
                before = latest.get(job_id)
                latest[job_id] = job
                if on_change and (
                    before is None or (before.status, before.stage) != (job.status, job.stage)
                ):
                    on_change(job)
                if job.done:
                    pending.remove(job_id)
            if not pending:
                return latest
            if deadline is not None and time.monotonic() + poll > deadline:
                raise JobWaitTimeout(latest, pending)
            time.sleep(poll)

    # -- uploading -------------------------------------------------------------------------

    def upload(
        self,
        paths_or_bytes: UploadItem | Iterable[UploadItem],
        *,
        models: Sequence[str] | str | None = None,
        callback_url: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> UploadResult:
        """Upload DICOM files and/or zips in one request (``POST /api/v1/studies``).

        Files are streamed from disk. ``progress`` receives byte counts as they are sent; when
        an attempt fails and is retried, it first receives the negative of what that attempt
        had counted, so a progress bar never over-counts. When every file is rejected the
        server answers 4xx (422; 409 if all conflict) with the same body; that is returned
        (``http_status`` tells), not raised, so the per-file reasons are at hand.
        """
        items = _normalise_items(paths_or_bytes)
        if not items:
            raise ValueError("nothing to upload")
        data: dict[str, str] = {}
        if models:
            data["models"] = models if isinstance(models, str) else ",".join(models)
        if callback_url:
            data["callback_url"] = callback_url

        def attempt() -> UploadResult:
            counter = _ByteCounter(progress)
            try:
                return self._upload_once(items, data, counter)
            except _RETRYABLE:
                counter.rollback()  # this attempt's bytes will be sent again
                raise

        return self._with_retries(attempt, what="POST /api/v1/studies")

    def _upload_once(
        self, items: list[tuple[str, Path | bytes]], data: dict[str, str], counter: _ByteCounter
    ) -> UploadResult:
        with ExitStack() as stack:
            parts: list[tuple[str, tuple[str, Any, str]]] = []
            for name, source in items:
                if isinstance(source, bytes):
                    counter(len(source))
                    parts.append(("files", (name, source, _content_type(name, source[:4]))))
                    continue
                raw = stack.enter_context(source.open("rb"))
                head = raw.read(4)
                raw.seek(0)
                parts.append(
                    ("files", (name, _CountingReader(raw, counter), _content_type(name, head)))
                )
            response = self._http.post("/api/v1/studies", files=parts, data=data)
        if 400 <= response.status_code < 500:
            # "Every file rejected" (422, 409 if all conflicts, or the one status all the
            # rejections share) carries the upload body: hand it back, reasons and all.
            body = _decode(response)
            if isinstance(body, dict) and "files" in body and "rejected" in body:
                return UploadResult.model_validate({**body, "http_status": response.status_code})
        body = self._checked(response)
        return UploadResult.model_validate({**body, "http_status": response.status_code})

    # -- downloading -----------------------------------------------------------------------

    def download(self, url: str, dest: str | os.PathLike[str]) -> Path:
        """Stream ``url`` (absolute on this server, or a server-relative path) to ``dest``.

        Bytes go to a temporary file beside ``dest`` that is fsynced and renamed into place,
        so ``dest`` is either absent or complete, never half-written.
        """
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        request_url = self._own_url(url)

        def attempt() -> Path:
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
            try:
                with self._http.stream("GET", request_url) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._checked(response)
                    with tmp.open("wb") as out:
                        for chunk in response.iter_bytes(_CHUNK):
                            out.write(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return target

        return self._with_retries(attempt, what=f"GET {request_url}")

    def download_results(
        self,
        job_id: str,
        out_dir: str | os.PathLike[str],
        *,
        results_name: str = "results.json",
        overwrite: bool = False,
    ) -> ResultTree:
        """Download everything a succeeded job produced into a tidy tree::

            <out>/<study uid>/<series uid>/results.json
                masks/<model>/<sop>_<frame>.png  (+ <sop>_<frame>_overlay.png)
                saliency/<model>/<method>/<sop>_<frame>.npy  (+ <sop>_<frame>_overlay.png)
                dicom/seg_<model>.dcm, sr_<models>.dcm, pmap_<model>_<method>.dcm

        (characters other than letters, digits, ``.``, ``_`` and ``-`` in a name become ``_``:
        the series' one SR names its models ``classifier+segnet+unet``, saved as
        ``sr_classifier_segnet_unet.dcm``)

        Files already present are kept unless ``overwrite`` (every file is written by rename,
        so a present file is a complete one); this makes an interrupted download cheap to
        resume. Names that come from the server are reduced to safe characters.
        """
        raw = self.results_json(job_id)
        results = Results.model_validate(raw)
        root = (
            Path(out_dir)
            / _safe(results.series.study_instance_uid)
            / _safe(results.series.series_instance_uid)
        )
        root.mkdir(parents=True, exist_ok=True)
        planned: dict[Path, str] = {}

        def plan(rel: Path, url: str | None, unique: str) -> None:
            if not url:
                return
            path = root / rel
            if path in planned:  # two outputs would share a name: keep both, told apart by id
                path = path.with_name(f"{path.stem}_{_safe(unique)}{path.suffix}")
            planned[path] = url

        for mask in results.masks:
            base = Path("masks", _safe(mask.model))
            stem = f"{_safe(mask.sop_instance_uid)}_{mask.frame}"
            plan(base / f"{stem}.png", mask.url, mask.id)
            plan(base / f"{stem}_overlay.png", mask.overlay_url, mask.id)
        for sal in results.saliency:
            base = Path("saliency", _safe(sal.model), _safe(sal.method))
            stem = f"{_safe(sal.sop_instance_uid)}_{sal.frame}"
            plan(base / f"{stem}.npy", sal.url, sal.id)
            plan(base / f"{stem}_overlay.png", sal.overlay_url, sal.id)
        for kind, refs in (
            ("seg", results.dicom.seg),
            ("sr", results.dicom.sr),
            ("pmap", results.dicom.pmap),
        ):
            for ref in refs:
                name = "_".join(_safe(p) for p in (kind, ref.model, ref.method) if p)
                plan(Path("dicom", f"{name}.dcm"), ref.url, ref.url.rsplit("/", 1)[-1])

        files: list[Path] = []
        for path, url in planned.items():
            if overwrite or not path.exists():
                self.download(url, path)
            files.append(path)
        results_path = root / _safe(results_name)
        write_atomic(results_path, json.dumps(raw, indent=2, sort_keys=True).encode())
        files.append(results_path)
        return ResultTree(root=root, results=results, files=files)

    # -- plumbing --------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            return self._checked(self._http.request(method, path, **kwargs))

        return self._with_retries(attempt, what=f"{method} {path}")

    def _checked(self, response: httpx.Response) -> dict[str, Any]:
        """The decoded body of a 2xx answer; raises ``_Transient`` or ``ClientError`` otherwise."""
        status = response.status_code
        body = _decode(response)
        if 200 <= status < 300:
            return body if isinstance(body, dict) else {"value": body}
        error = _error_from(status, body, response.text)
        if status in RETRY_STATUSES:
            raise _Transient(error, parse_retry_after(response.headers.get("Retry-After")))
        raise error

    def _with_retries(self, attempt: Callable[[], T], *, what: str) -> T:
        retry = 0
        while True:
            try:
                try:
                    return attempt()
                except _TRANSIENT_ERRORS as exc:
                    error = ClientError(
                        0, "connection_error", f"{type(exc).__name__} on {what}: {exc}"
                    )
                    raise _Transient(error, None) from exc
            except _Transient as transient:
                retry += 1
                delay = retry_delay(
                    retry, self._policy, retry_after=transient.retry_after, rng=self._rng
                )
                if delay is None:
                    raise transient.error from transient.__cause__
                logger.info(
                    "%s failed (%s); retry %d in %.1f s", what, transient.error, retry, delay
                )
                time.sleep(delay)

    def _own_url(self, url: str) -> str:
        """Refuse URLs on another origin: the API key must never travel to a third party."""
        parsed = httpx.URL(url)
        if not parsed.is_absolute_url:
            return url
        if (parsed.scheme, parsed.host, parsed.port) != self._origin:
            raise ClientError(
                0, "foreign_url", f"refusing to fetch {parsed.host!r}: not the server {self.server}"
            )
        return str(parsed)


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str) -> str:
    """A file-name component from a server-provided string (UIDs, model names, methods)."""
    cleaned = _UNSAFE.sub("_", text).lstrip(".")
    return cleaned[:128] or "_"


def _segment(value: str) -> str:
    """A URL path segment: ids are opaque, so escape anything that could change the route."""
    return urllib.parse.quote(value, safe="")


def _decode(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _error_from(status: int, body: Any, text: str) -> ClientError:
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return ClientError(status, body["error"], str(body.get("detail", "")), body=body)
    return ClientError(status, f"http_{status}", text[:300].strip())


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
