"""One error vocabulary for medcad.

Services raise these; the API renders every one as ``{"error": code, "detail": detail}`` with its
HTTP status, and the worker records ``code`` + ``detail`` on a failed job. No FastAPI import here:
services and the worker use the same classes.
"""

from __future__ import annotations


class MedcadError(Exception):
    """Base class: an expected failure with a stable code, an HTTP status and a human detail."""

    code: str = "error"
    status: int = 400

    def __init__(self, code: str | None = None, detail: str = "", *, status: int | None = None):
        self.code = code or type(self).code
        self.detail = detail
        if status is not None:
            self.status = status
        super().__init__(f"{self.code}: {detail}")


class IngestRejected(MedcadError):
    """An uploaded file cannot be stored (not DICOM, unsupported, over a budget...)."""

    code = "rejected"
    status = 422


class Conflict(MedcadError):
    """Same identity, different content (e.g. a SOP Instance UID re-used with other bytes)."""

    code = "conflict"
    status = 409


class NotFound(MedcadError):
    """The named resource does not exist (or is not visible to the caller)."""

    code = "not_found"
    status = 404


class Unauthorized(MedcadError):
    """No valid credentials."""

    code = "unauthorized"
    status = 401


class Forbidden(MedcadError):
    """Valid credentials without the required role."""

    code = "forbidden"
    status = 403


class PayloadTooLarge(MedcadError):
    """The request body is over the configured upload size limit."""

    code = "payload_too_large"
    status = 413


class Overloaded(MedcadError):
    """The queue is over its configured depth; retry later."""

    code = "overloaded"
    status = 503

    def __init__(self, detail: str = "", *, retry_after: int = 30, status: int | None = None):
        super().__init__(self.code, detail, status=status)
        self.retry_after = retry_after


class ServiceUnavailable(Overloaded):
    """A backing service (database, storage) is unreachable; retry later."""

    code = "service_unavailable"


class InsufficientStorage(MedcadError):
    """The blob store is full; nothing was stored."""

    code = "insufficient_storage"
    status = 507


class UnknownModel(MedcadError):
    """A requested model name or version is not registered."""

    code = "unknown_model"
    status = 422


class BadRequest(MedcadError):
    """A malformed request (bad parameter value, malformed multipart...)."""

    code = "bad_request"
    status = 400


class PipelineError(MedcadError):
    """A known, permanent failure while processing a job (recorded on the job, not retried)."""

    code = "pipeline_error"
    status = 422
