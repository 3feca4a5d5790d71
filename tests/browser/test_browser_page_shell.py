"""The browser page on its own: served by the web router alone, loaded in a real chromium.

These tests need no API: they check the shell (notice, labelled sign-in, layout at desktop and
tablet widths, contrast, keyboard focus), the sign-in request itself, and the page's pure
JavaScript helpers against references computed here in Python.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from .support import CONTRAST_SCRIPT, VIEWPORTS, horizontal_overflow, watch_console

pytestmark = pytest.mark.browser

NOTICE = "Not for clinical use — research and demonstration only"

SHOW_ALL_VIEWS = """
() => {
  for (const id of ['view-work', 'view-viewer', 'viewer-grid', 'upload-results', 'app-nav',
                    'account', 'colorbar', 'skipped']) {
    document.getElementById(id).hidden = false;
  }
}
"""


@pytest.fixture()
def context(browser: Browser) -> Iterator[BrowserContext]:
    width, height = VIEWPORTS["desktop"]
    ctx = browser.new_context(viewport={"width": width, "height": height})
    yield ctx
    ctx.close()


@pytest.fixture()
def page(context: BrowserContext) -> Page:
    return context.new_page()


def test_page_and_assets_are_served_with_safe_headers(page_server: str) -> None:
    page = httpx.get(f"{page_server}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    # No inline script or style: the policy above would block them.
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)
    assert "style=" not in page.text
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        response = httpx.get(f"{page_server}{asset}")
        assert response.status_code == 200, asset
        assert response.headers["cache-control"] == "no-cache"
    module = httpx.get(f"{page_server}/static/viewer.js")
    assert "javascript" in module.headers["content-type"]


@pytest.mark.parametrize("viewport", sorted(VIEWPORTS))
def test_shell_renders_without_the_api(
    browser: Browser, page_server: str, screenshot_dir: Path, viewport: str
) -> None:
    width, height = VIEWPORTS[viewport]
    ctx = browser.new_context(viewport={"width": width, "height": height})
    try:
        page = ctx.new_page()
        console = watch_console(page)
        page.goto(f"{page_server}/", wait_until="networkidle")

        notice = page.get_by_role("note")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text(NOTICE)
        key = page.get_by_label("API key")
        expect(key).to_be_visible()
        expect(key).to_have_attribute("type", "password")
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        expect(page.get_by_role("heading", name="Sign in to medcad")).to_be_visible()
        assert horizontal_overflow(page) <= 0
        page.screenshot(path=str(screenshot_dir / f"shell-signin-{width}x{height}.png"))

        # Every view, revealed as it is laid out for a signed-in user, still fits the width.
        page.evaluate(SHOW_ALL_VIEWS)
        expect(page.locator("#dropzone")).to_be_visible()
        expect(page.locator("#image-canvas")).to_be_visible()
        assert horizontal_overflow(page) <= 0
        page.screenshot(
            path=str(screenshot_dir / f"shell-all-views-{width}x{height}.png"), full_page=True
        )
        assert console.errors == []
    finally:
        ctx.close()


def test_notice_is_on_every_view(page: Page, page_server: str) -> None:
    page.goto(f"{page_server}/", wait_until="networkidle")
    for view in ("view-signin", "view-work", "view-viewer"):
        page.evaluate(
            "(shown) => document.querySelectorAll('.view').forEach((v) => { v.hidden = v.id !== shown; })",
            view,
        )
        expect(page.locator("#clinical-notice")).to_be_visible()
        expect(page.locator("#clinical-notice")).to_contain_text(NOTICE)
    page.evaluate("() => { document.getElementById('viewer-grid').hidden = false; }")
    expect(page.locator(".watermark")).to_have_text("Not for clinical use")


def test_text_meets_wcag_aa_contrast(page: Page, page_server: str) -> None:
    page.goto(f"{page_server}/", wait_until="networkidle")
    page.evaluate(SHOW_ALL_VIEWS)
    page.evaluate(
        "() => document.getElementById('job-list').insertAdjacentHTML('beforeend', "
        "'<li class=\"job-empty muted\">No jobs yet</li>')"
    )
    result = page.evaluate(CONTRAST_SCRIPT)
    assert result["checked"] > 40
    assert result["failures"] == []


def test_every_form_control_has_a_label(page: Page, page_server: str) -> None:
    page.goto(f"{page_server}/", wait_until="networkidle")
    page.evaluate(SHOW_ALL_VIEWS)
    unlabeled = page.evaluate(
        """() => Array.from(document.querySelectorAll('input, select, textarea, button, canvas[tabindex]'))
              .filter((el) => el.type !== 'hidden' && !(el.name === 'username'))
              .filter((el) => {
                const labelled = (el.labels && el.labels.length) || el.getAttribute('aria-label')
                  || el.getAttribute('aria-labelledby') || (el.tagName === 'BUTTON' && el.textContent.trim());
                return !labelled;
              })
              .map((el) => el.id || el.outerHTML.slice(0, 80))"""
    )
    assert unlabeled == []


def test_keyboard_reaches_sign_in_with_visible_focus(page: Page, page_server: str) -> None:
    console = watch_console(page)
    page.goto(f"{page_server}/", wait_until="networkidle")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "skip-link"
    expect(page.locator(".skip-link")).to_be_in_viewport()
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "api-key"
    outline = page.evaluate(
        "() => { const s = getComputedStyle(document.activeElement);"
        " return [s.outlineStyle, parseFloat(s.outlineWidth)]; }"
    )
    assert outline[0] != "none" and outline[1] >= 2
    # Enter on an empty key explains itself without calling the server.
    page.keyboard.press("Enter")
    expect(page.locator("#signin-error")).to_have_text("Enter an API key.")
    assert console.errors == []


def test_sign_in_sends_the_key_only_in_the_authorization_header(
    page: Page, page_server: str
) -> None:
    """The page-only server has no API, so sign-in fails; the request itself is what we check."""
    secret = "mk_test_0123456789abcdef"
    seen: list[tuple[str, str | None]] = []
    page.on("request", lambda r: seen.append((r.url, r.headers.get("authorization"))))
    page.goto(f"{page_server}/", wait_until="networkidle")
    page.get_by_label("API key").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("Sign-in failed")
    me_calls = [(url, auth) for url, auth in seen if url.endswith("/api/v1/me")]
    assert me_calls == [(f"{page_server}/api/v1/me", f"Bearer {secret}")]
    assert all(secret not in url for url, _ in seen)
    assert secret not in page.url
    # A key the server did not accept is not kept.
    assert page.evaluate("() => sessionStorage.getItem('medcad.apiKey')") is None
    assert page.evaluate("() => localStorage.length") == 0
    expect(page.locator("#view-signin")).to_be_visible()


def _reference_window(center: float, width: float) -> list[int]:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function over every int16 value, 8-bit output."""
    x = np.arange(-32768, 32768, dtype=np.float64)
    if width <= 1:
        y = np.where(x <= center - 0.5, 0.0, 255.0)
    else:
        inside = np.floor(((x - (center - 0.5)) / (width - 1) + 0.5) * 255 + 0.5)
        y = np.where(
            x <= center - 0.5 - (width - 1) / 2,
            0.0,
            np.where(x > center - 0.5 + (width - 1) / 2, 255.0, inside),
        )
    return [int(v) for v in np.clip(y, 0, 255)]


@pytest.mark.parametrize(
    ("center", "width"), [(-600, 1500), (40, 400), (400, 1800), (0, 1), (10.5, 2), (-1024, 4096)]
)
def test_window_lut_follows_the_dicom_linear_function(
    page: Page, page_server: str, center: float, width: float
) -> None:
    page.goto(f"{page_server}/", wait_until="networkidle")
    lut = page.evaluate(
        "async ([c, w]) => { const m = await import('/static/viewer.js');"
        " return Array.from(m.windowLut(c, w)); }",
        [center, width],
    )
    assert lut == _reference_window(center, width)


def test_viewer_helpers_decode_pixels_colour_labels_and_order_slices(
    page: Page, page_server: str
) -> None:
    page.goto(f"{page_server}/", wait_until="networkidle")
    values = [-32768, -1024, -1, 0, 1, 40, 3071, 32767]
    raw = list(struct.pack(f"<{len(values)}h", *values))
    result = page.evaluate(
        """async ([raw]) => {
          const m = await import('/static/viewer.js');
          const pixels = Array.from(m.int16FromBuffer(new Uint8Array(raw).buffer));
          const colors = new Map([[1, [10, 20, 30]], [2, m.parseColor('#ff8000')]]);
          const rgba = Array.from(m.colorizeLabels(new Uint8Array([0, 1, 2, 3, 2]), colors, new Set([1, 3])));
          const slices = m.buildSlices({ instances: [
            { sop_instance_uid: 'a', instance_number: 5, frames: 1, rows: 4, columns: 3, window: null },
            { sop_instance_uid: 'b', instance_number: 2, frames: 3, rows: 4, columns: 3, window: { center: 1, width: 2 } },
          ] }).map((s) => `${s.sop}:${s.frame}`);
          const fit = m.fitRect(800, 600, 512, 256);
          return { pixels, rgba, slices, fit, list: m.parseColor([1, 2, 300]), bad: m.parseColor('red') };
        }""",
        [raw],
    )
    assert result["pixels"] == values
    background, red_label, hidden_label, fallback, hidden_again = (
        result["rgba"][i : i + 4] for i in range(0, 20, 4)
    )
    assert background == [0, 0, 0, 0]
    assert red_label == [10, 20, 30, 255]
    assert hidden_label == [0, 0, 0, 0] and hidden_again == [0, 0, 0, 0]
    assert fallback[3] == 255  # label 3 has no colour in the manifest: a palette colour is used
    assert result["slices"] == ["a:0", "b:0", "b:1", "b:2"]  # server order, frames expanded
    assert result["fit"] == {"x": 0, "y": 100, "width": 800, "height": 400, "scale": 800 / 512}
    assert result["list"] == [1, 2, 255]
    assert result["bad"] is None


def test_upload_helpers_filter_batch_and_match_outcomes(page: Page, page_server: str) -> None:
    page.goto(f"{page_server}/", wait_until="networkidle")
    result = page.evaluate(
        """async () => {
          const m = await import('/static/upload.js');
          const names = ['s1/IM0001', 's1/IM0002.dcm', 's1/1.2.840.10008.5', 'a.zip', 's1/mask.png',
                         's1/.DS_Store', 'DICOMDIR', 's1/notes.txt', 'x.IMA'];
          const classified = Object.fromEntries(names.map((n) => [n, m.classifyFile(n).ok]));
          const items = [];
          for (let i = 0; i < 5; i += 1) items.push({ name: `s1/${i}.dcm`, size: 10 });
          for (let i = 0; i < 3; i += 1) items.push({ name: `s2/${i}.dcm`, size: 10 });
          items.push({ name: 'big/0.dcm', size: 100 }, { name: 'big/1.dcm', size: 100 });
          const batches = m.planBatches(items, { maxFiles: 8, maxBytes: 150 })
            .map((b) => b.map((i) => i.name));
          const fractions = [m.fileFractions([100, 100, 200], 220, 400), m.fileFractions([100, 100, 200], 55, 440)];
          const sent = ['s1/IM1.dcm', 's2/IM1.dcm', 'study.zip', 'other.dcm'];
          const reported = [
            { filename: 'IM1.dcm', outcome: 'stored' },
            { filename: 'IM1.dcm', outcome: 'duplicate' },
            { filename: 'study.zip/a.dcm', outcome: 'stored' },
            { filename: 'b.dcm', outcome: 'rejected', error: 'not_dicom', detail: 'no DICM' },
            { filename: 'other.dcm', outcome: 'stored' },
          ];
          const matched = m.matchOutcomes(sent, reported);
          return {
            classified, batches, fractions,
            perFile: matched.perFile.map((list) => list.map((e) => `${e.filename}=${e.outcome}`)),
            unmatched: matched.unmatched.length,
            counts: m.countOutcomes(matched.perFile),
          };
        }"""
    )
    assert result["classified"] == {
        "s1/IM0001": True,
        "s1/IM0002.dcm": True,
        "s1/1.2.840.10008.5": True,
        "a.zip": True,
        "s1/mask.png": False,
        "s1/.DS_Store": False,
        "DICOMDIR": False,
        "s1/notes.txt": False,
        "x.IMA": True,
    }
    # Whole folders share a request while they fit; a folder that does not fit starts a new
    # request, and one larger than the byte limit is cut.
    assert result["batches"] == [
        [f"s1/{i}.dcm" for i in range(5)] + [f"s2/{i}.dcm" for i in range(3)],
        ["big/0.dcm"],
        ["big/1.dcm"],
    ]
    # 440 bytes on the wire for 400 bytes of files: the framing is spread evenly.
    assert result["fractions"] == [pytest.approx([1, 1, 0.1]), pytest.approx([0.5, 0, 0])]
    # Equal base names keep request order; the zip collects its member; the stray name goes
    # to the only zip of the request.
    assert result["perFile"] == [
        ["IM1.dcm=stored"],
        ["IM1.dcm=duplicate"],
        ["study.zip/a.dcm=stored", "b.dcm=rejected"],
        ["other.dcm=stored"],
    ]
    assert result["unmatched"] == 0
    assert result["counts"] == {"stored": 3, "duplicate": 1, "rejected": 1}


def test_dropped_files_and_picked_folders_fill_the_selection(
    page: Page, page_server: str, tmp_path: Path, screenshot_dir: Path
) -> None:
    console = watch_console(page)
    page.goto(f"{page_server}/", wait_until="networkidle")
    # Signed-out pages keep the upload view hidden; reveal it to drive the real handlers.
    page.evaluate("() => { document.getElementById('view-work').hidden = false; }")

    page.locator("#dropzone").drop(
        {
            "files": [
                {"name": "IM0001.dcm", "mimeType": "application/dicom", "buffer": b"\0" * 132},
                {"name": "series.zip", "mimeType": "application/zip", "buffer": b"PK\3\4"},
            ]
        }
    )
    expect(page.locator("#selection-summary")).to_have_text(
        "2 files chosen (136 B), including 1 zip archive."
    )

    folder = tmp_path / "study"
    (folder / "series1").mkdir(parents=True)
    for name in ("series1/IM1", "series1/IM2.dcm", "series1/mask.png", "series1/.DS_Store"):
        (folder / name).write_bytes(b"\0" * 10)
    page.locator("#folder-input").set_input_files(folder)
    expect(page.locator("#selection-summary")).to_contain_text("4 files chosen")
    expect(page.locator("#skipped-summary")).to_have_text("2 files left out")
    expect(page.locator("#skipped-list li")).to_have_count(2)
    # No model list came from a server, so nothing can be sent yet.
    expect(page.locator("#upload-start")).to_have_text("Upload 4 files")
    expect(page.locator("#upload-start")).to_be_disabled()
    page.screenshot(path=str(screenshot_dir / "shell-selection-1280x800.png"))

    page.get_by_role("button", name="Clear").click()
    expect(page.locator("#selection-summary")).to_have_text("No files chosen yet.")
    assert console.errors == []
