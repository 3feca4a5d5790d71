"""Serve the single-page browser app and its static assets.

The page is a static shell: it renders without the API, then talks to ``/api/v1`` from the
browser with the user's API key. Nothing here touches the database or the services.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.responses import Response
from starlette.types import Scope

WEB_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"

# The page loads only same-origin scripts and styles, draws fetched images through blob: URLs,
# and may not be framed (a viewer of patient images must not be click-jacked).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

templates = Jinja2Templates(directory=TEMPLATES_DIR)
router = APIRouter(include_in_schema=False)


@router.get("/")
def get_page(request: Request) -> Response:
    """Serve the browser app shell (sign-in, upload, jobs and viewer are drawn by its scripts)."""
    root_path = str(request.scope.get("root_path", "")).rstrip("/")
    return templates.TemplateResponse(
        request, "index.html", {"root_path": root_path}, headers=PAGE_HEADERS
    )


class RevalidatedStaticFiles(StaticFiles):
    """Static files that browsers revalidate on every load.

    The ES modules import each other by plain relative names, so a version query on the entry
    point alone could mix old and new modules from the cache; ``no-cache`` plus the ETag that
    Starlette already sends makes every check a cheap 304 instead.
    """

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def mount_static(app: FastAPI) -> None:
    """Mount the page's CSS, JavaScript modules and icons under ``/static``."""
    app.mount("/static", RevalidatedStaticFiles(directory=STATIC_DIR), name="static")
