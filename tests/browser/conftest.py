"""The browser tests' fixtures (tests/browser/): one real `genq up` and one headless Chromium per
test module, and a page per test: a fresh browser context logged in as the stack's admin.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, need_browser
from tests.support.stackproc import StackProcess, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    need_browser()
    base = tmp_path_factory.mktemp("dashboard-stack")
    env = {"GENQ_RAY_NUM_CPUS": "2", "GENQ_CLUSTER_SNAPSHOT_INTERVAL_S": "1"}
    with running_stack(base / "var", env) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, stack: StackProcess, tmp_path: Path) -> Iterator[Any]:
    """A fresh browser context (no cookies), logged in as the stack's admin."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(30_000)
    tab = context.new_page()
    tab.goto(stack.url + "/admin/login")
    tab.fill("#key", stack.admin_key)
    tab.click("button[type=submit]")
    tab.wait_for_url(stack.url + "/admin/")
    tab.shots_dir = tmp_path  # type: ignore[attr-defined]
    yield tab
    context.close()
