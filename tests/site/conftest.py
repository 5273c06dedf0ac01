"""Fixtures for the site tests: the built site served on 127.0.0.1, and Debian's Chromium.

The tests read the site the way a reader does: `_build/html` (made by
`python3 tools/dev.py book`, which `dev test` runs before these tests) is served by a
local HTTP server bound to 127.0.0.1 that stops itself, and headless Chromium from Debian's
package (/usr/bin/chromium, installed by `dev setup`) is driven by Playwright. Playwright's own
browser download is never used. Every request the pages make to anything but the local server is
refused and recorded, so a page that needs a CDN fails its test.
"""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from tools import book_site as site

ROOT = site.ROOT
HTML = ROOT / "_build" / "html"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("QLORA_CHROMIUM", "/usr/bin/chromium")
# Flags that keep Chromium quiet on a machine with no network (see the README's test section).
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SERVER_LIFETIME_S = 300  # the server shuts itself down after this, whatever happens to the tests
VIEWPORT = {"width": 1280, "height": 860}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the tests report what matters; no access log
        pass


# The test command sets this: there, a site that is not built fails these tests instead of skipping them.
SITE_REQUIRED = os.environ.get("QLORA_SITE_REQUIRED") == "1"
NEEDS_THE_BUILD = {"built_site", "base_url", "context", "reader", "browser"}


def pytest_collection_modifyitems(config, items):
    """Without a built site (a fresh clone, plain `pytest`), skip the tests that read it, saying why."""
    if SITE_REQUIRED or (HTML / "index.html").exists():
        return
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason=f"the site is not built ({HTML.relative_to(ROOT)}/index.html is missing): "
                                   "`python3 tools/dev.py book` builds it; `python3 tools/dev.py test` builds it "
                                   "and runs these tests")
    for item in items:
        if here in Path(item.path).resolve().parents and NEEDS_THE_BUILD & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def built_site() -> Path:
    if not (HTML / "index.html").exists():
        pytest.fail(f"{HTML} holds no built site: run `python3 tools/dev.py book` first")
    return HTML


@pytest.fixture(scope="session")
def base_url(built_site):
    """http://127.0.0.1:PORT/ serving _build/html, for this test session only."""
    handler = functools.partial(_QuietHandler, directory=str(built_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="site-server", daemon=True)
    thread.start()
    deadline = threading.Timer(SERVER_LIFETIME_S, server.shutdown)
    deadline.daemon = True
    deadline.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `python3 tools/dev.py setup` "
                    "(it installs Debian's chromium), or set QLORA_CHROMIUM to a Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Playwright starts Chromium headless with a fresh temporary profile (user data dir).
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                      timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


class Reader:
    """One browser tab, with what went wrong on it: console errors, failed and outside requests."""

    def __init__(self, context, base_url: str):
        self.base_url = base_url
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.page = context.new_page()
        self.page.set_default_timeout(15_000)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on("requestfailed", self._failed)
        self.page.on("response", self._response)

    def _console(self, message) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} ({message.location.get('url', '')})")

    def _failed(self, request) -> None:
        # ERR_ABORTED: a request cut short because the tab moved on (a click on "next"); a file
        # that is missing shows up as an HTTP 404 in _response instead.
        if request.url.startswith(self.base_url) and "ERR_ABORTED" not in (request.failure or ""):
            self.errors.append(f"request failed: {request.url} ({request.failure})")

    def _response(self, response) -> None:
        if response.url.startswith(self.base_url) and response.status >= 400:
            self.errors.append(f"HTTP {response.status}: {response.url}")

    def url_of(self, page: site.Page) -> str:
        return self.base_url + page.html


@pytest.fixture(scope="session")
def context(browser, base_url):
    ctx = browser.new_context(viewport=VIEWPORT, service_workers="block")
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith(base_url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort("blockedbyclient")

    ctx.route("**/*", only_local)
    ctx.outside = outside
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def reader(context, base_url):
    """A fresh tab; the test fails if the site asked anything of a host other than the local one."""
    before = len(context.outside)
    tab = Reader(context, base_url)
    try:
        yield tab
    finally:
        tab.page.close()
    asked = context.outside[before:]
    assert not asked, f"the site requested outside hosts (a CDN?): {asked[:5]}"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS / "site", ignore_errors=True)
    (ARTIFACTS / "site").mkdir(parents=True)
    return ARTIFACTS / "site"
