"""End to end in a real browser: sign in, upload a model and clean data, watch the repair finish,
open the report and download the repaired model (its bytes must match the server's checksum)."""
from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def until(condition: Callable[[], bool], timeout: float = 60) -> None:
    """Poll from Python: the pages' CSP (no eval) blocks Playwright's string-based wait_for_function."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        time.sleep(0.2)


def test_sign_in_rejects_a_bad_key(browser: Any, server: Any, artifacts: Path) -> None:
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_url(re.compile(r"/login"))
    page.fill("#api-key", "onp_not_a_key")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#login-error:not([hidden])")
    assert "not accepted" in page.inner_text("#login-error")
    page.screenshot(path=str(artifacts / "01-login-rejected.png"), full_page=True)


def test_repair_from_the_dashboard(browser: Any, server: Any, keys: Any, worker: Any, inputs: Any,
                                   alice: httpx.Client, artifacts: Path, tmp_path: Path) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("response", lambda resp: errors.append(f"{resp.status} {resp.url}") if resp.status >= 400 else None)
    external: list[str] = []
    page.on("request", lambda req: external.append(req.url) if not req.url.startswith((server.url, "blob:", "data:",
                                                                                           "about:")) else None)

    # sign in
    page.goto(server.url + "/login")
    page.fill("#api-key", keys.alice)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(server.url + "/")
    page.wait_for_selector("#jobs-body tr")
    page.screenshot(path=str(artifacts / "02-dashboard.png"), full_page=True)

    # upload a repair
    page.set_input_files("#f-model", str(inputs.model))
    page.set_input_files("#f-data", str(inputs.clean))
    page.select_option("#f-method", "clp")
    page.fill("#f-options", '{"u": 3.0}')
    if inputs.triggered:
        page.click("details summary")
        page.set_input_files("#f-triggered", str(inputs.triggered))
        page.fill("#f-target", str(inputs.target))
    page.screenshot(path=str(artifacts / "03-upload-form.png"), full_page=True)
    page.click("#submit-button")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]

    # watch it finish
    page.wait_for_selector("#j-status.badge.succeeded", timeout=150_000)
    assert page.inner_text("#j-pct") == "100%"
    assert re.fullmatch(r"\d+\.\d\d%", page.inner_text("#m-after-acc"))
    assert page.is_visible("#download-model") and not page.is_visible("#cancel")
    events = page.inner_text("#events")
    assert "queued" in events and "succeeded" in events

    # the report, embedded
    frame = page.frame_locator("#report-frame")
    frame.locator("#fig-metrics svg").wait_for()
    for fig in ("metrics", "trace", "accuracy", "layers"):
        assert frame.locator(f"#fig-{fig} svg").count() == 1, fig
    until(lambda: page.locator("#report-frame").bounding_box()["height"] > 900)
    page.screenshot(path=str(artifacts / "04-job-succeeded.png"), full_page=True)

    # ... and opened on its own
    with page.expect_popup() as popup_info:
        page.click("#open-report")
    report = popup_info.value
    report.wait_for_load_state()
    assert "Repair report" in report.inner_text("h1") and report.locator("svg.plot").count() == 4
    report.set_viewport_size({"width": 1200, "height": 900})
    report.screenshot(path=str(artifacts / "05-report.png"), full_page=True)
    report.close()

    # download the repaired model: same bytes as the server's checksum says
    with page.expect_download() as download_info:
        page.click("#download-model")
    download = download_info.value
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert download.suggested_filename == f"repaired-{job_id}.safetensors"
    served = alice.get(f"/v1/repairs/{job_id}/model").headers["X-Checksum-SHA256"]
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == served
    page.wait_for_selector("#download-note:has-text('sha256 verified')")

    with page.expect_download() as report_download:
        page.click("#download-report")
    html_path = tmp_path / "report.html"
    report_download.value.save_as(html_path)
    assert "<svg" in html_path.read_text()

    # the list shows it
    page.click("text=← all repairs")
    page.wait_for_selector(f"#job-{job_id}[data-status=succeeded]")
    page.screenshot(path=str(artifacts / "06-dashboard-after.png"), full_page=True)

    assert not external, f"the dashboard reached outside the server: {external}"
    assert not errors, f"browser errors: {errors}"


def test_rejected_upload_shows_the_reason(browser: Any, server: Any, keys: Any, inputs: Any, artifacts: Path,
                                          tmp_path: Path) -> None:
    page = browser.new_page()
    page.goto(server.url + "/login")
    page.fill("#api-key", keys.alice)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(server.url + "/")
    bad = tmp_path / "clean.npz"
    bad.write_bytes(b"not a data set")
    page.set_input_files("#f-model", str(inputs.model))
    page.set_input_files("#f-data", str(bad))
    page.select_option("#f-method", "clp")
    page.click("#submit-button")
    page.wait_for_selector("#submit-error:not([hidden])")
    assert "422" in page.inner_text("#submit-error")
    page.screenshot(path=str(artifacts / "07-upload-rejected.png"), full_page=True)


def test_running_job_page_and_cancel(browser: Any, server: Any, keys: Any, worker: Any, inputs: Any,
                                     alice: httpx.Client, artifacts: Path) -> None:
    """A long job shows live progress and its phase; Cancel (after the confirm dialog) stops it."""
    files = {"model": (inputs.model.name, inputs.model.read_bytes()),
             "data": (inputs.clean.name, inputs.clean.read_bytes()),
             "options": (None, '{"method": "slow", "options": {"steps": 600, "delay": 0.05}}')}
    job = alice.post("/v1/repairs", files=files).raise_for_status().json()
    page = browser.new_page()
    page.goto(server.url + "/login")
    page.fill("#api-key", keys.alice)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(server.url + "/")
    page.goto(f"{server.url}/jobs/{job['id']}")
    page.wait_for_selector("#j-status.badge.running", timeout=60_000)
    until(lambda: int(page.inner_text("#j-pct").rstrip("%")) >= 15)
    assert page.inner_text("#j-phase") == "waiting" and "left" in page.inner_text("#j-eta")
    page.screenshot(path=str(artifacts / "08-job-running.png"), full_page=True)
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")
    page.wait_for_selector("#j-status.badge.cancelled", timeout=60_000)
    assert not page.is_visible("#download-model") and not page.is_visible("#cancel")
