"""The page at / in a real headless Chromium: ask for a piece, watch it stream, keep it, copy it."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

from pastiche.config import ServeConfig
from pastiche.serve import create_app, running

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                                "(apt-get install chromium)")


@pytest.fixture(scope="module")
def url(tiny_run):
    app = create_app(tiny_run, ServeConfig(model=str(tiny_run), max_tokens_limit=64))
    with running(app) as address:
        yield address


@pytest.fixture()
def page(url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        page = context.new_page()
        page.requested = []
        page.on("request", lambda request: page.requested.append(request.url))
        yield page
        browser.close()


def test_write_a_piece_streams_side_by_side_and_is_kept(page, url, tiny_run, tmp_path):
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#models').children.length === 2")  # tuned + base pills
    page.fill("#title", "The Glass Harbour")
    page.fill("#max-tokens", "24")
    page.click("#generate")
    # Text appears while the button is still disabled, i.e. before the answer is complete.
    page.wait_for_function("document.querySelector('#out-tuned .text').textContent.length > 0")
    page.wait_for_function("!document.querySelector('#generate').disabled", timeout=120_000)
    tuned = page.inner_text("#out-tuned .text")
    base = page.inner_text("#out-base .text")
    assert tuned and base and page.is_visible("#out-base")
    assert page.inner_text("#out-tuned .heading") == "The Glass Harbour"
    tokens = int(re.match(r"(\d+) tokens · \d+\.\d s", page.inner_text("#out-tuned .stats")).group(1))
    assert 1 <= tokens <= 24
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000

    page.click("#out-tuned .copy")
    assert page.evaluate("navigator.clipboard.readText()") == page.evaluate(
        "document.querySelector('#out-tuned .text').textContent")

    page.reload()
    page.wait_for_selector("#history li")
    assert page.locator("#history li").count() == 1
    assert page.inner_text("#history li .t") == "The Glass Harbour"
    hosts = {urlparse(u).netloc for u in page.requested}
    assert hosts == {urlparse(url).netloc}, "the page must load nothing from elsewhere"


def test_page_asks_for_a_key_when_the_server_has_one(tiny_run, page):
    app = create_app(tiny_run, ServeConfig(model=str(tiny_run), api_key="sesame", max_tokens_limit=16))
    with running(app) as address:
        page.goto(address + "/")
        page.wait_for_selector("#api-key", state="visible")
        assert "API key" in page.inner_text("#hint")
        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.querySelector('#models').children.length === 2")
        assert page.inner_text("#hint") == ""
