"""The page against a live ``medcad serve`` with the tiny fixture models (fast, exact outputs).

A real drag and drop (chromium's own drag events, carrying a folder and a zip from disk) fills
the selection; every file gets its progress bar and its outcome, a rejected one with the reason;
the jobs wait in the queue with their positions until a worker starts; then the viewer's overlay
opacity sliders, heatmap colour bar, "uncertain — review" flag and a PNG download are driven.
Screenshots go to ``test-artifacts/screenshots``.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.services import MedcadProcesses, medcad_deployment

from .support import VIEWPORTS, drop_paths, horizontal_overflow, watch_console

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

JOB_TIMEOUT_MS = 120_000

CANVAS_HASH = """
() => {
  const c = document.getElementById('image-canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let hash = 0;
  for (let i = 0; i < d.length; i += 4) hash = (hash * 31 + d[i] * 7 + d[i + 1] * 3 + d[i + 2]) >>> 0;
  return hash;
}
"""


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[MedcadProcesses]:
    """API only at first: jobs stay queued until the test starts a worker."""
    with medcad_deployment(
        tmp_path_factory.mktemp("browser-tiny"), tiny_models_dir, embedded=False
    ) as deployment:
        yield deployment


@pytest.fixture()
def context(browser: Browser) -> Iterator[BrowserContext]:
    width, height = VIEWPORTS["desktop"]
    ctx = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    yield ctx
    ctx.close()


def _write_series(folder: Path, *, radius: float, seed: int, n: int = 3) -> None:
    folder.mkdir(parents=True)
    blobs, _ = bright_disc_series(n=n, radius=radius, seed=seed)
    for i, blob in enumerate(blobs):
        (folder / f"IM{i + 1:04d}.dcm").write_bytes(blob)


def _canvas_hash(page: Page) -> int:
    page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return int(page.evaluate(CANVAS_HASH))


def _rows(page: Page) -> dict[str, dict[str, Any]]:
    rows: list[dict[str, Any]] = page.locator("#upload-file-rows tr").evaluate_all(
        """(rows) => rows.map((r) => ({
             name: r.querySelector('.file-name span').textContent,
             outcome: r.dataset.outcome || '',
             progress: r.querySelector('progress').value,
             text: r.querySelector('.outcome').textContent.trim(),
           }))"""
    )
    return {row["name"]: row for row in rows}


def test_drop_a_folder_and_a_zip_follow_the_queue_and_review_overlays(
    context: BrowserContext, server: MedcadProcesses, tmp_path: Path, screenshot_dir: Path
) -> None:
    # On disk: a study folder with two series, a broken file and a note; a zipped third series.
    study = tmp_path / "drop" / "study"
    _write_series(study / "plain", radius=6, seed=1)
    _write_series(study / "review", radius=20, seed=2)  # mean CAM near 0: probability ≈ 0.3
    (study / "broken.dcm").write_bytes(bytes(128) + b"DICM" + os.urandom(64))
    (study / "notes.txt").write_text("not an image")
    zipped = tmp_path / "drop" / "zipped-series.zip"
    blobs, _ = bright_disc_series(n=2, radius=6, seed=3)
    with zipfile.ZipFile(zipped, "w") as archive:
        for i, blob in enumerate(blobs):
            archive.writestr(f"series/IM{i + 1}.dcm", blob)

    page = context.new_page()
    console = watch_console(page)
    page.goto(f"{server.url}/", wait_until="networkidle")
    page.get_by_label("API key").fill(server.api_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    for key in ("tinyseg:1.0.0", "tinycls:1.0.0"):
        page.locator(f'#model-list input[value="{key}"]').check()
    # One extra explanation on top of the models' own: flip uncertainty for the segmenter.
    page.get_by_label("Flip uncertainty").check()

    # Drop the folder and the zip together, as from a file manager.
    drop_paths(page, "#dropzone", [study, zipped])
    expect(page.locator("#selection-summary")).to_have_text(
        re.compile(r"^8 files chosen \(.+\), including 1 zip archive\.$")
    )
    expect(page.locator("#skipped-summary")).to_have_text("1 file left out")
    expect(page.locator("#skipped-list li")).to_contain_text("study/notes.txt")

    page.get_by_role("button", name="Upload 8 files").click()
    expect(page.locator("#upload-summary")).to_contain_text("Upload finished", timeout=60_000)
    rows = _rows(page)
    assert len(rows) == 8, rows
    assert all(row["progress"] == 1 for row in rows.values()), rows
    series_rows = {k: v for k, v in rows.items() if k.endswith("dcm") and "broken" not in k}
    assert len(series_rows) == 6 and {r["outcome"] for r in series_rows.values()} == {"stored"}
    broken = rows["study/broken.dcm"]
    assert broken["outcome"] == "rejected" and re.search(r"rejected\s+\w+ — \S", broken["text"])
    assert rows["zipped-series.zip"]["outcome"] == "stored"
    assert "2 stored" in rows["zipped-series.zip"]["text"]
    page.screenshot(path=str(screenshot_dir / "drop-01-uploaded.png"), full_page=True)

    # No worker yet: three jobs wait, each showing its place in the queue.
    queued = page.locator("#job-list li[data-status=queued]")
    expect(queued).to_have_count(3, timeout=30_000)
    details = sorted(queued.locator(".job-detail").all_inner_texts())
    assert details == [f"Position {n} in the queue" for n in (1, 2, 3)], details
    page.screenshot(path=str(screenshot_dir / "drop-02-queued.png"), full_page=True)

    # A worker starts; the list follows the jobs live to the end.
    server.start_worker()
    expect(page.locator("#job-list li[data-status=succeeded]")).to_have_count(
        3, timeout=JOB_TIMEOUT_MS
    )
    flagged = page.locator("#job-list li[data-status=succeeded]").filter(
        has=page.locator(".badge-review")
    )
    expect(flagged).to_have_count(1)
    expect(flagged).to_contain_text("Uncertain — please review")
    page.screenshot(path=str(screenshot_dir / "drop-03-done.png"), full_page=True)

    # The flagged job's viewer: the flag, then the overlays and their opacity sliders.
    flagged.get_by_role("link").click()
    expect(page.locator("#viewer-grid")).to_be_visible(timeout=30_000)
    expect(page.locator("#image-canvas")).to_have_attribute("data-drawn", re.compile(r"^\d+$"))
    expect(page.locator("#viewer-uncertain")).to_be_visible()
    expect(page.locator("#findings-series")).to_contain_text("Uncertain — please review")
    # Findings per slice (this one) and per series, each with its probability.
    expect(page.locator("#findings-slice li").first).to_contain_text("%")
    expect(page.locator("#findings-series li").first).to_contain_text("%")
    expect(page.get_by_role("note")).to_contain_text("Not for clinical use")

    # The bone preset (the other two are driven in the full flow).
    page.get_by_role("button", name=re.compile(r"^Bone")).click()
    expect(page.locator("#wl-center")).to_have_value("400")
    expect(page.locator("#wl-width")).to_have_value("1800")

    mask_opacity = page.get_by_label(re.compile(r"^Mask opacity"))
    mask_opacity.fill("0")
    expect(page.locator("#mask-opacity-value")).to_have_text("0 %")
    without_mask = _canvas_hash(page)
    mask_opacity.fill("100")
    expect(page.locator("#mask-opacity-value")).to_have_text("100 %")
    full_mask = _canvas_hash(page)
    mask_opacity.fill("50")
    assert len({without_mask, full_mask, _canvas_hash(page)}) == 3

    page.get_by_label("Show heatmap").check()
    expect(page.locator("#colorbar")).to_be_visible()
    # The colour bar is fetched with the key, then shown: wait for the decoded image.
    page.wait_for_function("() => document.getElementById('colorbar-img').naturalWidth > 0")
    expect(page.locator("#colorbar-caption")).not_to_be_empty()
    # The classifier calls this series negative: its CAM is shown greyed, and says so.
    choice = page.get_by_label("Model and method")
    choice.select_option("tinycls|cam")
    expect(page.locator("#suppressed-badge")).to_be_visible()
    # The segmenter's uncertainty map is a real heatmap, with its own colour bar.
    choice.select_option("tinyseg|entropy")
    expect(page.locator("#suppressed-badge")).to_be_hidden()
    expect(page.locator("#colorbar-caption")).to_contain_text("entropy")
    page.wait_for_function("() => document.getElementById('colorbar-img').naturalWidth > 0")
    # The flip uncertainty asked for on upload came back as a map of its own.
    choice.select_option("tinyseg|tta_std")
    expect(page.locator("#colorbar-caption")).to_contain_text("tta_std")
    choice.select_option("tinyseg|entropy")
    heat_opacity = page.get_by_label(re.compile(r"^Heatmap opacity"))
    heat_opacity.fill("0")
    no_heat = _canvas_hash(page)
    heat_opacity.fill("100")
    expect(page.locator("#saliency-opacity-value")).to_have_text("100 %")
    assert _canvas_hash(page) != no_heat
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(screenshot_dir / "drop-04-viewer-overlays.png"))

    # The mask of this slice as a PNG: a label image of the slice's size.
    with page.expect_download() as download:
        page.get_by_role("button", name=re.compile(r"^Mask PNG \(tinyseg")).click()
    with Image.open(io.BytesIO(Path(download.value.path()).read_bytes())) as png:
        assert png.size == (64, 64)
        assert set(np.unique(np.asarray(png)).tolist()) <= {0, 1, 2}

    page.set_viewport_size({"width": VIEWPORTS["tablet"][0], "height": VIEWPORTS["tablet"][1]})
    page.wait_for_timeout(300)
    assert horizontal_overflow(page) <= 0
    page.screenshot(path=str(screenshot_dir / "drop-05-viewer-tablet.png"), full_page=True)
    assert console.errors == []


def test_job_lines_say_queue_position_eta_stage_and_failure_reason(
    browser: Browser, page_server: str
) -> None:
    """The one line each job shows in the list, for every state the API reports."""
    page = browser.new_page()
    try:
        page.goto(f"{page_server}/", wait_until="networkidle")
        lines = page.evaluate(
            """async () => {
              const { describeJob } = await import('/static/jobs.js');
              return [
                describeJob({ status: 'queued', queue_position: 3, eta_seconds: 95 }),
                describeJob({ status: 'queued', queue_position: 1, eta_seconds: null }),
                describeJob({ status: 'running', stage: 'infer:unet', attempts: 2, eta_seconds: 12 }),
                describeJob({ status: 'running', stage: 'dicom', attempts: 1,
                              results_at: '2026-01-05T09:00:41Z' }),
                describeJob({ status: 'failed', error: { code: 'worker_lost', detail: 'ended its worker 3 times' } }),
                describeJob({ status: 'succeeded', started_at: '2026-01-05T09:00:00Z',
                              finished_at: '2026-01-05T09:00:42Z' }),
              ];
            }"""
        )
    finally:
        page.close()
    queued_eta, queued, running, dicom, failed, succeeded = lines
    assert queued_eta == "Position 3 in the queue · starts in about 2 min"
    assert queued == "Position 1 in the queue"  # no finished job yet: no basis for an ETA
    assert running == "Stage: infer:unet · attempt 2 · about 12 s left"
    assert dicom == "Results ready · building the DICOM objects"
    assert failed == "Failed: worker_lost — ended its worker 3 times"
    assert succeeded == "Results ready · took 42 s"
