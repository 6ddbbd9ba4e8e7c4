"""Browser tests: Debian's chromium driven by Playwright against pytest-django's
live_server. Never downloads a browser: without /usr/bin/chromium they skip.

The job engine's fixtures (a real `celery worker` subprocess on the test
database and a private Redis database) are re-exported from tests/workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# A test run leaves the work tree clean: screenshots go to test-artifacts/ (ignored), and into
# docs/screenshots/ only when asked for with UPDATE_SCREENSHOTS=1.
_ROOT = Path(__file__).resolve().parents[2]
SHOTS = _ROOT / "docs" / "screenshots" if os.environ.get("UPDATE_SCREENSHOTS") == "1" else _ROOT / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PASSWORD = "pw-123456"  # tests/conftest.py's make_user default


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; Django's ORM
    # calls made by the test itself are still plain synchronous code.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield b
    b.close()
    pw.stop()
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(viewport=DESKTOP, base_url=live_server.url)
    context.set_default_timeout(15_000)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.js_errors = errors
    yield p
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture
def uploaded(db, tiny_base, user, make_peft_adapter):
    """alice/lora: a real PEFT adapter on tiny-base, uploaded through the service."""
    from hub.registry.services import IncomingFile, adapter_create_from_upload

    folder = make_peft_adapter("browser-lora")
    files = [IncomingFile(p.name, open(p, "rb")) for p in sorted(folder.iterdir()) if p.is_file()]
    try:
        rev = adapter_create_from_upload(owner="alice", name="lora", base=tiny_base, files=files, user=user,
                                         description="# alice/lora\n\nA random LoRA on the tiny base.",
                                         tags=["demo"])
    finally:
        for f in files:
            f.fileobj.close()
    return rev.adapter


def sign_in(page, username, password=PASSWORD, shot=None):
    page.goto("/login/")
    if shot:
        screenshot(page, shot)
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("text=Sign out")


def screenshot(page, name: str, full: bool = False) -> None:
    """<SHOTS>/<name>-desktop.png and -phone.png; at phone width the
    page must not scroll sideways."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        page.wait_for_timeout(50)
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name} scrolls sideways by {overflow}px at {size['width']}px"
        opts = {"path": str(SHOTS / f"{name}-{label}.png")}
        if full:
            height = min(page.evaluate("document.documentElement.scrollHeight"), 2 * size["height"])
            opts.update(full_page=True, clip={"x": 0, "y": 0, "width": size["width"], "height": height})
        page.screenshot(**opts)
    page.set_viewport_size(DESKTOP)
