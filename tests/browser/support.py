"""Helpers shared by the browser tests (plain functions; the fixtures live in conftest)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from playwright.sync_api import ConsoleMessage, Page

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

VIEWPORTS = {"desktop": (1280, 800), "tablet": (768, 1024)}


def find_chromium() -> str | None:
    """Path of the system chromium, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class ConsoleWatch:
    """Console errors and uncaught exceptions seen by a page."""

    errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} @ {message.location}")

    def on_page_error(self, error: Exception) -> None:
        self.errors.append(f"pageerror: {error}")


def watch_console(page: Page) -> ConsoleWatch:
    """Collect console errors and page errors of `page` from now on."""
    watch = ConsoleWatch()
    page.on("console", watch.on_console)
    page.on("pageerror", watch.on_page_error)
    return watch


def horizontal_overflow(page: Page) -> int:
    """Pixels by which the document is wider than the viewport (0 when nothing scrolls sideways)."""
    return int(
        page.evaluate(
            "() => Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
            " - document.documentElement.clientWidth"
        )
    )
