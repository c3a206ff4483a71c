"""End to end in a real browser: the local mode (`python -m worker.local`: dashboard, CPU
worker and the embedded filesystem broker, since no Redis is given) serves the dashboard;
headless Chromium fills the New run form, launches a tiny run, opens it and waits for the
live metrics chart. Screenshots go to test-artifacts/."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from speculators.vllm.readiness import free_port

from tests.support.browser_support import ARTIFACTS, CHROMIUM, ROOT, chromium_page, open_run
from tests.support.browser_support import dashboard_healthy as _healthy
from tests.support.workers import wait_for, worker_env

pytestmark = pytest.mark.slow


# a run name and a typed value with shell, Markdown and HTML syntax: shown as typed, nowhere a
# link, image or formatting (issue 19)
NAME = "e2e $(whoami) **b** [a](http://evil.example/a) ![i](http://evil.example/i.png) <img src=x>"
EVIL_LR = "[fast](http://evil.example/lr) <img src=http://evil.example/lr.png> www.evil.example"


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
        page.goto(url + "/Runs")
        # the table is a canvas grid; its accessible cells are attached but not "visible"
        page.locator("td", has_text=NAME).first.wait_for(state="attached", timeout=30_000)
        _assert_no_evil_markup(page)
        page.screenshot(path=str(ARTIFACTS / "e2e-runs.png"))
    assert (ARTIFACTS / "e2e-run-detail.png").stat().st_size > 10_000
