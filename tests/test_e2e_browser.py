"""End to end in a real browser: the local mode (`python -m worker.local`: dashboard, CPU
worker and the embedded filesystem broker, since no Redis is given) serves the dashboard;
headless Chromium fills the New run form, launches a tiny run, opens it, waits for the live
metrics charts and the acceptance curve (measured at the first epoch end), switches the x
axis, and opens the compare page on the run. Screenshots go to test-artifacts/."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from speculators.vllm.readiness import free_port

from tests.support.browser_support import ARTIFACTS, CHROMIUM, ROOT, chromium_page, open_run
from tests.support.browser_support import dashboard_healthy as _healthy
from tests.support.wait import wait_for
from tests.support.workers import worker_env

pytestmark = pytest.mark.slow


# a run name and a typed value with shell, Markdown and HTML syntax: shown as typed, nowhere a
# link, image or formatting (issue 19)
NAME = "e2e $(whoami) **b** [a](http://evil.example/a) ![i](http://evil.example/i.png) <img src=x>"
EVIL_LR = "[fast](http://evil.example/lr) <img src=http://evil.example/lr.png> www.evil.example"


def _settled(page, timeout_ms: int = 30_000) -> None:
    """Wait until no element is shown stale (Streamlit fades what a running rerun has not redrawn
    yet), for the screenshots; on a machine so loaded that the refreshes overlap, go on after `timeout_ms`."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.wait_for_timeout(500)
    try:
        page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]')", timeout=timeout_ms)
    except PlaywrightTimeout:
        pass
    page.wait_for_timeout(800)  # let the charts draw


def _assert_no_evil_markup(page) -> None:
    for sel in ('a[href*="evil.example"]', 'img[src*="evil.example"]', 'img[src="x"]'):
        assert page.locator(sel).count() == 0, sel


@pytest.fixture()
def local_mode(tmp_path, tiny_llama):
    home = tmp_path / "home"
    shutil.copytree(tiny_llama, home / "models" / "tiny-llama")  # skip the first-start build
    port = free_port()
    env = worker_env(home, "")
    env.pop("SPEC_BROKER_URL")  # let the launcher choose: no Redis at --redis-url -> filesystem broker
    log = open(tmp_path / "local.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "worker.local", "--home", str(home), "--port", str(port),
                             "--redis-url", "redis://127.0.0.1:1/0"], cwd=str(ROOT), env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url) or proc.poll() is not None, 90, what="dashboard health")
        assert proc.poll() is None, (tmp_path / "local.log").read_text()[-3000:]
        yield url, home, tmp_path / "local.log"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_submit_from_form_and_see_live_chart(local_mode):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set SPEC_CHROMIUM)")
    url, _home, log = local_mode
    assert "filesystem broker" in log.read_text()
    with chromium_page() as page:
        page.goto(url + "/New_run")
        name = page.get_by_role("textbox", name="Run name")
        name.wait_for(timeout=60_000)
        # a bad value first: the error appears next to its field and nothing is launched
        # (its message quotes the value typed: Markdown/HTML in it stays text)
        lr = page.get_by_role("textbox", name="Learning rate")
        lr.fill(EVIL_LR)
        lr.press("Enter")
        page.get_by_role("button", name="Launch run").click()
        page.get_by_text("must be a number").wait_for(timeout=30_000)
        assert EVIL_LR in page.get_by_text("must be a number").inner_text()
        _assert_no_evil_markup(page)
        lr.fill("0.003")
        lr.press("Enter")
        name.fill(NAME)
        name.press("Enter")
        page.get_by_role("button", name="Launch run").click()
        page.get_by_text("saved").wait_for(timeout=30_000)
        _assert_no_evil_markup(page)
        page.screenshot(path=str(ARTIFACTS / "e2e-new-run.png"))
        open_run(page, NAME)
        _assert_no_evil_markup(page)
        page.locator('[data-testid="stVegaLiteChart"]').first.wait_for(timeout=240_000)
        page.wait_for_timeout(1500)  # let the chart draw
        page.screenshot(path=str(ARTIFACTS / "e2e-run-detail.png"))
        assert page.get_by_text("Training metrics").is_visible()
        console: list[str] = []
        page.on("console", lambda msg: console.append(msg.text) if msg.type == "error" else None)
        # the acceptance measured while training appears live, at the first epoch end (issue 23)
        page.get_by_text("Acceptance (held-out prompts)").wait_for(timeout=300_000)
        page.get_by_text("Per-position rates at").wait_for(timeout=30_000)
        # the chart controls: x axis by epoch, no smoothing; the charts redraw without a Vega error
        controls = page.locator('[data-testid="stRadio"]').filter(has_text="x axis")
        epoch = controls.get_by_role("radio", name="epoch")
        for _ in range(3):  # a click landing while the fragment redraws is lost: try again
            controls.get_by_text("epoch", exact=True).click()
            page.wait_for_timeout(1500)
            if epoch.is_checked():
                break
        assert epoch.is_checked()
        _settled(page)
        charts = page.locator('[data-testid="stVegaLiteChart"]')
        charts.nth(7).wait_for(timeout=90_000)  # 6 train, >= 1 validation, acceptance curve and bars
        page.get_by_text("Validation (at each epoch end)").wait_for(timeout=60_000)
        page.get_by_text("Hyperparameters").scroll_into_view_if_needed()
        assert page.get_by_role("button", name="Metrics as CSV").is_visible()
        page.get_by_text("Acceptance (held-out prompts)").scroll_into_view_if_needed()
        _settled(page)
        page.screenshot(path=str(ARTIFACTS / "e2e-run-acceptance.png"))
        run_id = parse_qs(urlparse(page.url).query)["run"][0]
        # compare: the run's loss, accuracy and acceptance overlaid (one run here), its best figures in the table
        page.goto(url + f"/Compare?runs={run_id}")
        page.get_by_role("heading", name="Compare runs").wait_for(timeout=30_000)
        page.locator('[data-testid="stVegaLiteChart"]').nth(2).wait_for(timeout=60_000)  # loss, full_acc_0, acceptance
        page.get_by_text("Only the settings that differ").wait_for(timeout=60_000)
        _settled(page)
        _assert_no_evil_markup(page)
        page.screenshot(path=str(ARTIFACTS / "e2e-compare.png"), full_page=True)
        vega_errors = [m for m in console if "vega" in m.lower() or "signal" in m.lower() or "param" in m.lower()]
        assert not vega_errors, vega_errors
        page.goto(url + "/Runs")
        # the table is a canvas grid; its accessible cells are attached but not "visible"
        page.locator("td", has_text=NAME).first.wait_for(state="attached", timeout=30_000)
        _assert_no_evil_markup(page)
        page.screenshot(path=str(ARTIFACTS / "e2e-runs.png"))
    assert (ARTIFACTS / "e2e-run-detail.png").stat().st_size > 10_000
    assert (ARTIFACTS / "e2e-compare.png").stat().st_size > 10_000
