"""Helpers the browser tests share: where Chromium and the screenshots are, a dashboard
health probe, a headless Chromium page, and the New run form's launch-and-open steps."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SPEC_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"


def dashboard_healthy(url: str) -> bool:
    """Streamlit's own health endpoint answers 200."""
    try:
        return urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200
    except OSError:
        return False


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make test-deps` (or set SPEC_CHROMIUM)")


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000) -> Iterator:
    """A page in headless Chromium (Debian's, no browser download); closed afterwards."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def shot(page, name: str) -> Path:
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


def launch_from_form(page, url: str, name: str, timeout_ms: int = 60_000) -> None:
    """New run page: type the run name, keep every other default, launch, open the run page."""
    page.goto(url + "/New_run")
    box = page.get_by_role("textbox", name="Run name")
    box.wait_for(timeout=timeout_ms)
    box.fill(name)
    box.press("Enter")
    page.get_by_role("button", name="Launch run").click()
    page.get_by_text("saved").wait_for(timeout=30_000)


def open_run(page, name: str, timeout_ms: int = 30_000) -> None:
    """From the New run page's confirmation: follow "Open the run" to the run's page."""
    page.get_by_role("link", name="Open the run").click()
    page.get_by_role("heading", name=name).wait_for(timeout=timeout_ms)
