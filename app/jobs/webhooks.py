"""Webhooks: an HMAC-signed POST to the job's ``callback_url`` when it ends, with retries.

Signature: header ``X-Medcad-Signature: sha256=<hex>`` = HMAC-SHA256 of the raw body with the
configured ``MEDCAD_WEBHOOK_SECRET``. Attempts back off exponentially; the delivery status is
shown on the job.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from datetime import timedelta

import httpx
from sqlalchemy import select

from app.db.records import JobRecord, SeriesRecord, utcnow
from app.db.session import session_scope
from app.settings import Settings

log = logging.getLogger(__name__)


def sign(body: bytes, secret: str) -> str:
    """``sha256=<hex>`` HMAC of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _payload(job: JobRecord, series_uid: str) -> bytes:
    return json.dumps(
        {
            "event": "job.finished",
            "job_id": job.id,
            "status": job.status,
            "series_instance_uid": series_uid,
            "error": {"code": job.error_code, "detail": job.error_detail}
            if job.error_code
            else None,
            "results_url": f"/api/v1/jobs/{job.id}/results",
        },
        sort_keys=True,
    ).encode()


def deliver_due(settings: Settings, *, timeout: float = 5.0) -> int:
    """Deliver every due webhook once; returns the number delivered."""
    now = utcnow()
    with session_scope() as session:
        due = list(
            session.execute(
                select(JobRecord, SeriesRecord.series_instance_uid)
                .join(SeriesRecord, SeriesRecord.id == JobRecord.series_id)
                .where(
                    JobRecord.webhook_status == "pending",
                    JobRecord.status.in_(("succeeded", "failed")),
                    JobRecord.webhook_next_at <= now,
                )
                .limit(50)
            ).tuples()
        )
        work = [(job.id, job.callback_url, _payload(job, uid)) for job, uid in due]
    delivered = 0
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    for job_id, url, body in work:
        ok = False
        try:
            response = httpx.post(
                str(url),
                content=body,
                timeout=timeout,
                headers={
                    "Content-Type": "application/json",
                    "X-Medcad-Signature": sign(body, secret),
                },
            )
            ok = 200 <= response.status_code < 300
        except httpx.HTTPError:
            ok = False
        with session_scope() as session:
            job = session.get(JobRecord, job_id)
            if job is None:
                continue
            job.webhook_attempts += 1
            if ok:
                job.webhook_status = "delivered"
                delivered += 1
            elif job.webhook_attempts >= settings.webhook_max_attempts:
                job.webhook_status = "failed"
            else:
                job.webhook_next_at = utcnow() + timedelta(seconds=2**job.webhook_attempts)
    return delivered
