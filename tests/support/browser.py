"""Helpers of the browser tests (tests/browser/): where Debian's Chromium is and how it is
started, whether this machine can run it (skipped locally without it, a failure under CI),
waiting on a page's state without eval (the dashboard's CSP refuses it), screenshots for a
person to look at (test-output/dashboard/), and the job page's state badge.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.stackproc import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SHOTS = ROOT / "test-output" / "dashboard"


def wait_js(page: Any, expression: str, timeout: float = 30_000) -> None:
    """`page.wait_for_function` without eval: the dashboard's Content-Security-Policy
    (script-src 'self') refuses the string predicates Playwright compiles inside the page, so
    the expression is evaluated through DevTools (`page.evaluate`, which the page's CSP does
    not govern) until it holds."""
    from playwright.sync_api import Error

    deadline = time.monotonic() + timeout / 1000
    while True:
        try:
            if page.evaluate(expression):
                return
        except Error as exc:  # the page navigated (a form posted): look again at the new one
            if "context was destroyed" not in str(exc):
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        page.wait_for_timeout(100)


def need_browser() -> None:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(CHROMIUM)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need {', '.join(missing)} under CI")
        pytest.skip(f"no {', '.join(missing)}")


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = page.shots_dir / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    shutil.copy(path, SHOTS / f"{name}.png")


def state_badge(page: Any) -> str:
    return str(page.inner_text("h1 [data-state]"))
