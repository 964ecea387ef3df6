"""The web UI (`--ui`) in a real headless browser (Debian's chromium, driven by playwright): the page loads, a
generation shows the same image `POST /generate` makes for the same request, through the same worker queue, and
its cancel button stops a running job. With an API key the UI sits behind a login that takes the key."""

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from tests.helpers import running_server

CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it)


@pytest.fixture(scope="module")
def ui_server():
    with running_server("--ui") as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def fill(page, width: int, height: int, steps: int, seed: int, prompt: str) -> None:
    page.fill("#prompt textarea", prompt)
    for selector, value in (("#width", width), ("#height", height), ("#steps", steps)):
        box = page.locator(f"{selector} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
    page.locator("#seed input").fill(str(seed))
    page.locator("#seed input").press("Tab")


def test_a_generation_in_the_browser_matches_the_api(ui_server, browser):
    page = browser.new_page()
    page.goto(f"{ui_server.url}/ui/")
    fill(page, 160, 128, 3, 11, "a lighthouse at dusk")
    page.click("#generate")
    image = page.locator("#result img")
    expect(image).to_be_visible(timeout=60_000)
    expect(page.locator("#used-seed textarea")).to_have_value("11")
    src = image.get_attribute("src")
    shown = Image.open(io.BytesIO(page.request.get(src).body() if not src.startswith("data:") else b""))
    request = {"prompt": "a lighthouse at dusk", "width": 160, "height": 128, "num_steps": 3, "seed": 11}
    api = ui_server.post("/generate", json=dict(request, output_format="png"))
    assert api.status_code == 200
    assert shown.size == (160, 128)
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(Image.open(io.BytesIO(api.content))))
    page.close()


def test_cancel_stops_the_running_job(ui_server, browser):
    before = ui_server.health()
    page = browser.new_page()
    page.goto(f"{ui_server.url}/ui/")
    fill(page, 512, 512, 100, 3, "a slow one")
    page.click("#generate")
    deadline = time.monotonic() + 30
    while ui_server.health()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ui_server.health()["running"] == 1  # on the server's one worker, as an API request would be
    # an API request meanwhile waits in the same queue
    with httpx.Client(timeout=120) as client:
        started = time.monotonic()
        page.click("#cancel")
        while ui_server.health()["running"] == 1 and time.monotonic() - started < 30:
            time.sleep(0.05)
        stopped_after = time.monotonic() - started
        after = ui_server.health()
        assert after["cancelled"] == before["cancelled"] + 1 and after["running"] == 0
        assert stopped_after < 10  # between steps, not at the end of 100 steps
        assert client.get(f"{ui_server.url}/health").status_code == 200
    expect(page.get_by_text("cancelled").first).to_be_visible(timeout=10_000)
    page.close()


def test_with_an_api_key_the_ui_asks_for_it(browser):
    with running_server("--ui", "--api-key", "k3y") as server:
        assert httpx.post(f"{server.url}/generate", json={"prompt": "x"}).status_code == 401  # the API still
        page = browser.new_page()
        page.goto(f"{server.url}/ui/")

        def log_in(password: str) -> None:
            page.get_by_role("textbox", name="username").fill("me")  # any user name
            page.locator("input[type=password]").fill(password)
            page.get_by_role("button", name="Login").click()

        log_in("wrong")
        expect(page.get_by_text("Incorrect", exact=False)).to_be_visible(timeout=10_000)
        assert page.locator("#prompt").count() == 0
        log_in("k3y")
        expect(page.locator("#prompt textarea")).to_be_visible(timeout=30_000)
        page.close()
