"""A new user's path through the page against a live ``medcad serve`` with a worker.

Sign in with a key, drop a demo series folder in through the folder picker, watch the job run,
open the viewer, move through window presets and slices, toggle the mask and the heatmap,
download results, and check the page at tablet width. Screenshots go to
``test-artifacts/screenshots``.

Needs the ``medcad_server`` fixture (``.url``, ``.api_key``; API + worker + shipped models)
and ``demo_series_dir`` (a folder of demo DICOM files) from ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from .support import CONTRAST_SCRIPT, VIEWPORTS, horizontal_overflow, watch_console

pytestmark = [pytest.mark.browser, pytest.mark.slow]

JOB_TIMEOUT_MS = 360_000

CANVAS_DIGEST = """
() => {
  const c = document.getElementById('image-canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let sum = 0, sq = 0, hash = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i] + d[i + 1] + d[i + 2];
    sum += v; sq += v * v;
    hash = (hash * 31 + d[i] * 7 + d[i + 1] * 3 + d[i + 2]) >>> 0;
  }
  const n = d.length / 4;
  return { mean: sum / n, std: Math.sqrt(Math.max(0, sq / n - (sum / n) ** 2)), hash };
}
"""


@pytest.fixture()
def context(browser: Browser) -> Iterator[BrowserContext]:
    width, height = VIEWPORTS["desktop"]
    ctx = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    yield ctx
    ctx.close()


def _sign_in(page: Page, url: str, key: str) -> None:
    page.goto(f"{url}/", wait_until="networkidle")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    expect(page.locator("#view-work")).to_be_visible()


def _upload_folder(page: Page, folder: Path) -> list[str]:
    """Pick `folder` with the folder picker, upload it, and return each row's outcome."""
    page.locator("#folder-input").set_input_files(folder)
    expect(page.locator("#selection-summary")).to_contain_text("chosen")
    start = page.get_by_role("button", name=re.compile(r"^Upload \d+ files?$"))
    expect(start).to_be_enabled()
    start.click()
    expect(page.locator("#upload-summary")).to_contain_text("Upload finished", timeout=120_000)
    outcomes: list[str] = page.locator("#upload-file-rows tr").evaluate_all(
        "(rows) => rows.map((r) => r.dataset.outcome || '')"
    )
    return outcomes


def _canvas(page: Page) -> dict[str, Any]:
    page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
    digest: dict[str, Any] = page.evaluate(CANVAS_DIGEST)
    return digest


def _wait_for_drawn_slice(page: Page) -> None:
    expect(page.locator("#image-canvas")).to_have_attribute("data-drawn", re.compile(r"^\d+$"))


def _slice_has_mask_pixels(page: Page) -> bool:
    texts = page.locator("#mask-legend li").all_inner_texts()
    return any(re.search(r"\b[1-9]\d* px\b", text) for text in texts)


def test_upload_demo_series_and_review_results(
    context: BrowserContext,
    medcad_server: Any,
    demo_series_dir: Path,
    screenshot_dir: Path,
) -> None:
    page = context.new_page()
    console = watch_console(page)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    _sign_in(page, medcad_server.url, medcad_server.api_key)
    expect(page.locator("#model-list input[type=checkbox]").first).to_be_visible()
    boxes = page.locator("#model-list input[type=checkbox]")
    offered = {
        boxes.nth(i).get_attribute("value"): boxes.nth(i).is_checked() for i in range(boxes.count())
    }
    # the served releases are preselected; earlier releases and INT8 builds are offered by
    # version (a bare name would run the newest release instead of the one ticked)
    defaults = {key for key, checked in offered.items() if checked}
    assert {key.split(":")[0] for key in defaults} == {"unet", "segnet", "classifier"}, offered
    assert all(":" in str(key) for key in offered), offered
    assert any(str(key).endswith("-int8") for key in offered.keys() - defaults), offered
    page.screenshot(path=str(screenshot_dir / "flow-01-signed-in.png"))

    # Upload: every demo file is stored (or was already stored by an earlier run on this server).
    outcomes = _upload_folder(page, demo_series_dir)
    assert outcomes, "no file rows were shown"
    assert set(outcomes) <= {"stored", "duplicate"}, outcomes
    page.screenshot(path=str(screenshot_dir / "flow-02-uploaded.png"), full_page=True)

    # Jobs: the list shows live status until a job succeeds.
    succeeded = page.locator("#job-list li[data-status=succeeded]").first
    expect(succeeded).to_be_visible(timeout=JOB_TIMEOUT_MS)
    expect(succeeded).to_contain_text("Results ready")
    page.screenshot(path=str(screenshot_dir / "flow-03-jobs.png"), full_page=True)
    job_id = succeeded.get_attribute("data-job-id")

    # Filter and paging: only succeeded jobs, a range that matches the list.
    page.get_by_label("Status", exact=True).select_option("succeeded")
    expect(page.locator(f"#job-list li[data-job-id='{job_id}']")).to_be_visible()
    statuses = page.locator("#job-list li[data-status]").evaluate_all(
        "(items) => items.map((li) => li.dataset.status)"
    )
    assert statuses and set(statuses) == {"succeeded"}
    shown = len(statuses)
    expect(page.locator("#jobs-range")).to_have_text(re.compile(rf"^1–{shown} of \d+$"))
    total = int(page.locator("#jobs-range").inner_text().rsplit(" ", 1)[1])
    page_size = int(page.get_by_label("Per page").input_value())
    assert shown == min(total, page_size)
    expect(page.get_by_role("button", name="Previous")).to_be_disabled()
    if total > page_size:
        page.get_by_role("button", name="Next").click()
        expect(page.locator("#jobs-range")).to_have_text(
            re.compile(rf"^{page_size + 1}–\d+ of {total}$")
        )
        page.get_by_role("button", name="Previous").click()
    else:
        expect(page.get_by_role("button", name="Next")).to_be_disabled()
    succeeded = page.locator(f"#job-list li[data-job-id='{job_id}']")
    succeeded.get_by_role("link").click()

    # Viewer: a real slice is drawn.
    expect(page.locator("#view-viewer")).to_be_visible()
    assert page.url.endswith(f"#/jobs/{job_id}")
    expect(page.locator("#viewer-grid")).to_be_visible(timeout=60_000)
    _wait_for_drawn_slice(page)
    first = _canvas(page)
    assert first["std"] > 5, "the slice looks blank"
    expect(page.get_by_role("note")).to_contain_text("Not for clinical use")

    # Window presets by button and by key.
    page.get_by_role("button", name=re.compile(r"^Lung")).click()
    expect(page.locator("#wl-center")).to_have_value("-600")
    expect(page.locator("#wl-width")).to_have_value("1500")
    expect(page.get_by_role("button", name=re.compile(r"^Lung"))).to_have_attribute(
        "aria-pressed", "true"
    )
    lung = _canvas(page)
    canvas = page.locator("#image-canvas")
    canvas.focus()
    page.keyboard.press("3")
    expect(page.locator("#wl-center")).to_have_value("40")
    expect(page.locator("#wl-width")).to_have_value("400")
    assert _canvas(page)["hash"] != lung["hash"]

    # Mouse drag to the right widens the window.
    box = canvas.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 80, box["y"] + box["height"] / 2, steps=4)
    page.mouse.up()
    assert int(page.locator("#wl-width").input_value()) > 400

    # Slices: keyboard, in series order.
    total = int(page.locator("#slice-slider").get_attribute("max") or "0") + 1
    canvas.focus()
    page.keyboard.press("Home")
    expect(page.locator("#slice-label")).to_have_text(f"1 / {total}")
    if total > 1:
        page.keyboard.press("ArrowDown")
        expect(page.locator("#slice-label")).to_have_text(f"2 / {total}")
    findings_buttons = page.locator("#finding-slices button")
    if findings_buttons.count():
        findings_buttons.first.click()
    _wait_for_drawn_slice(page)

    # Mask overlay: the legend lists the labels; hiding the mask changes the picture when this
    # slice has labelled pixels.
    mask_models = page.locator("#mask-model option").evaluate_all("(o) => o.map((x) => x.value)")
    assert len([m for m in mask_models if m]) >= 1, "no segmentation masks in the results"
    expect(page.locator("#mask-legend li").first).to_be_visible()
    page.wait_for_timeout(500)
    with_mask = _canvas(page)
    if _slice_has_mask_pixels(page):
        page.get_by_label("Segmentation model").select_option("")
        assert _canvas(page)["hash"] != with_mask["hash"]
        page.get_by_label("Segmentation model").select_option(mask_models[1])
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(screenshot_dir / "flow-04-viewer-mask.png"))

    # Saliency heatmap with its colour bar.
    toggle = page.get_by_label("Show heatmap")
    expect(toggle).to_be_enabled()
    toggle.check()
    expect(page.locator("#colorbar")).to_be_visible()
    expect(page.locator("#colorbar-img")).to_have_js_property("complete", True)
    assert page.locator("#colorbar-img").evaluate("(img) => img.naturalWidth") > 0
    note = page.locator("#saliency-note").inner_text()
    if "Suppressed" in note:
        expect(page.locator("#suppressed-badge")).to_be_visible()
    page.wait_for_timeout(500)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(screenshot_dir / "flow-05-viewer-heatmap.png"))

    # Findings with probabilities; the nodule both segmenters find in this series is listed
    # as a lesion with its size, and its button shows the lesion's largest cross-section.
    expect(page.locator("#findings-series li").first).to_contain_text("%")
    lesions = page.locator("#findings-lesions li.lesion")
    expect(lesions.first).to_contain_text(re.compile(r"nodule 1.*≈ \d+(\.\d)? mm.*mm³"))
    assert set(lesions.all_inner_texts()) and all("%" in t for t in lesions.all_inner_texts())
    go = lesions.first.get_by_role("button", name=re.compile(r"^Go to slice \d+, the largest"))
    key = int(re.search(r"slice (\d+)", go.inner_text()).group(1))  # type: ignore[union-attr]
    go.click()
    expect(page.locator("#slice-label")).to_have_text(re.compile(rf"^{key} / "))

    # The populated viewer (chips, badges, findings, legends) keeps AA contrast.
    contrast = page.evaluate(CONTRAST_SCRIPT)
    assert contrast["failures"] == []

    # Downloads carry the key in the header and save real files.
    with page.expect_download() as results_download:
        page.get_by_role("button", name="Results (JSON)").click()
    saved = Path(results_download.value.path())
    results = json.loads(saved.read_text(encoding="utf-8"))
    assert results["job_id"] == job_id
    seg_button = page.get_by_role("button", name=re.compile(r"^DICOM SEG"))
    if seg_button.count():
        with page.expect_download() as seg_download:
            seg_button.first.click()
        seg_bytes = Path(seg_download.value.path()).read_bytes()
        assert seg_bytes[128:132] == b"DICM"

    # Tablet width: everything still fits without sideways scrolling.
    page.set_viewport_size({"width": VIEWPORTS["tablet"][0], "height": VIEWPORTS["tablet"][1]})
    page.wait_for_timeout(300)
    assert horizontal_overflow(page) <= 0
    page.screenshot(path=str(screenshot_dir / "flow-06-viewer-tablet.png"), full_page=True)

    # The key never appears in a URL, and sign-out forgets it.
    assert all(medcad_server.api_key not in url for url in requested)
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#view-signin")).to_be_visible()
    assert page.evaluate("() => sessionStorage.getItem('medcad.apiKey')") is None
    assert console.errors == []


def test_reupload_reports_duplicates(
    context: BrowserContext, medcad_server: Any, demo_series_dir: Path, screenshot_dir: Path
) -> None:
    page = context.new_page()
    console = watch_console(page)
    _sign_in(page, medcad_server.url, medcad_server.api_key)
    expect(page.locator("#model-list input[type=checkbox]").first).to_be_visible()
    _upload_folder(page, demo_series_dir)
    again = _upload_folder(page, demo_series_dir)
    assert again and set(again) == {"duplicate"}, again
    expect(page.locator("#upload-summary")).to_contain_text("0 stored")
    page.screenshot(path=str(screenshot_dir / "flow-07-duplicates.png"), full_page=True)
    assert console.errors == []
