"""The Spaces demo in a real browser: headless Chromium drives the app on localhost."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = REPO / "results" / "screenshots" / "demo.png"
# Flags for a closed network and no display (see the machine notes): no background traffic, no sandbox as root.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="chromium is not installed (apt-get install chromium); the browser test needs it")


@pytest.fixture(scope="module")
def app_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Fixed draft lengths: the machine's calibrated ones may turn drafting off, and this test checks drafted tokens.
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False",
           "WHIFLASH_EAGLE_STEPS": "2", "WHIFLASH_BLOCK_SIZE": "8"}
    server = subprocess.Popen([sys.executable, str(REPO / "demo" / "app.py")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"the demo did not start:\n{server.stdout.read()[-3000:]}")
            time.sleep(1)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url)
        yield page
        browser.close()


def test_generation_shows_coloured_tokens_and_statistics(page):
    page.fill("#prompt textarea", "Write a Python function that returns the sum of a list of numbers.")
    page.fill("#max-tokens input", "48")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#stats').innerText.includes('→ WhiFlash')",
                           timeout=240_000)
    drafted = page.locator("#output .tok-eagle3, #output .tok-dflash, #output .tok-lookup").count()
    tokens = page.locator("#output .tok").count()
    stats = page.inner_text("#stats")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert tokens >= 40 and drafted > 0, f"{drafted} drafted of {tokens} tokens"
    assert "tok/s" in stats and "acceptance length" in stats and "rounds:" in stats and "x" in stats


def test_empty_prompt_gets_a_message_not_a_crash(page):
    page.fill("#prompt textarea", "   ")
    page.click("#generate")
    page.wait_for_selector("#output >> text=Please enter a prompt", timeout=60_000)
    page.fill("#prompt textarea", "Hello")
    page.fill("#max-tokens input", "5000")
    page.click("#generate")
    page.wait_for_selector("#output >> text=Max tokens must be between 1 and 512", timeout=60_000)

