"""Browser test fixtures: Debian's chromium driven by Playwright, and a page-only server.

Chromium comes from the system package (``apt-get install chromium``), never from
``playwright install``. Without it the browser tests skip, except in CI where they fail.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import Browser, Playwright, sync_playwright

from app.web import mount_static, router

from .support import CHROMIUM_ARGS, find_chromium


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    path = find_chromium()
    if path is None:
        reason = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; browser tests must run in CI")
        pytest.skip(f"{reason}; browser tests skipped outside CI")
    return path


# Package scope, not session: Playwright's sync API keeps an asyncio loop running on the main
# thread while it is open, which would break every later test that calls ``asyncio.run``.
@pytest.fixture(scope="package")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright_driver: Playwright, chromium_executable: str) -> Iterator[Browser]:
    instance = playwright_driver.chromium.launch(
        executable_path=chromium_executable, headless=True, args=CHROMIUM_ARGS
    )
    yield instance
    instance.close()


@pytest.fixture(scope="session")
def screenshot_dir(artifacts_dir: Path) -> Path:
    """``test-artifacts/screenshots`` at the repository root (git-ignored)."""
    path = artifacts_dir / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def page_server() -> Iterator[str]:
    """Serve only the browser page (no API) with uvicorn on a free 127.0.0.1 port."""
    app = FastAPI()
    app.include_router(router)
    mount_static(app)
    sock = _free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the page server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
