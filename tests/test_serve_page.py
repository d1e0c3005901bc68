"""The chat page in a real browser (Debian's headless Chromium driven by selenium): type a message, watch
the reply stream in with its stats line, reload (restored from local storage), change the cache policy
in the settings panel, and check that stored HTML is shown as text. Saves screenshots to
``$SINKLORA_ARTIFACTS`` (default: the test's tmp_path).

CI installs chromium and chromium-driver (``.ci/run``); elsewhere the test is skipped without them."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from serving import SYSTEM, reference, tiny_server, wait_until

from sinklora.defaults import CACHE_SLACK

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1000,900"]
MAX_NEW = 24

if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must install chromium and chromium-driver ({CHROMIUM}, {DRIVER}): see .ci/run")
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def _send(driver, text: str) -> list[int]:
    """Type ``text``, press Enter, and return the reply's lengths seen while it streamed (until its stats line)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    replies = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    box = driver.find_element(By.ID, "message")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    lengths = []
    deadline = time.monotonic() + 60
    for _ in range(3000):  # bounded: 60 s of 20 ms polls
        n, stats = _js(driver, """const r = document.querySelectorAll('.msg.assistant'), s = document.querySelectorAll('.stats');
            return [r.length > arguments[0] ? r[r.length - 1].textContent.length : 0,
                    s.length > arguments[0] ? s[s.length - 1].textContent : ''];""", replies)
        lengths.append(n)
        if stats or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return lengths


def test_page_streams_a_reply_with_stats_and_keeps_the_conversation_in_the_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    shots = Path(os.environ.get("SINKLORA_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with tiny_server(slow_s=0.05, max_new_tokens=MAX_NEW) as (url, _):
        browser.get(url + "/")
        assert wait_until(lambda: "tiny" in browser.find_element(By.ID, "model").text, timeout=20)
        assert "Welcome to sinklora chat" in browser.find_element(By.CSS_SELECTOR, ".welcome h4").text

        _send(browser, "Hello, page!")  # greedy: the tiny model repeats the template's last token, a newline
        stats = browser.find_elements(By.CSS_SELECTOR, ".stats")[-1].text
        for part in ("s to first token", "tokens/s", f"{MAX_NEW} tokens", "KV kept", "MiB", "full"):
            assert part in stats, stats
        stored = json.loads(_js(browser, "return localStorage.getItem('sinklora.conversation')"))
        want = reference([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello, page!"}], MAX_NEW)
        assert [m["role"] for m in stored] == ["user", "assistant"] and stored[1]["content"] == want
        browser.save_screenshot(str(shots / "chat_page.png"))

        browser.refresh()  # the conversation lives in the page: a reload restores it from local storage
        assert wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1, timeout=10)
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello, page!"
        assert browser.find_elements(By.CSS_SELECTOR, ".stats")[-1].text == stats

        browser.find_element(By.ID, "toggle-settings").click()
        Select(browser.find_element(By.ID, "cache")).select_by_value("sink")
        for field, value in (("budget", "40"), ("temperature", "1"), ("seed", "5")):  # sampled: visible text
            browser.find_element(By.ID, field).send_keys(value + "\t")  # leaving the field saves the change
        lengths = _send(browser, "Tell me more about the secret word, please.")
        assert any(0 < n < lengths[-1] for n in lengths), f"no partial reply was shown while streaming: {lengths}"
        stats = browser.find_elements(By.CSS_SELECTOR, ".stats")[-1].text
        kept, seen = map(int, re.search(r"KV kept (\d+) of (\d+)", stats).groups())
        assert 40 <= kept <= 40 + CACHE_SLACK and kept < seen and "sink budget 40" in stats, stats  # evicts in bursts
        browser.save_screenshot(str(shots / "chat_page_settings.png"))

        browser.find_element(By.ID, "new-chat").click()
        assert _js(browser, "return localStorage.getItem('sinklora.conversation')") == "[]"
        assert browser.find_elements(By.CSS_SELECTOR, ".welcome")


def test_stored_html_is_shown_as_text(browser):
    from selenium.webdriver.common.by import By

    with tiny_server() as (url, _):
        browser.get(url + "/")
        evil = [{"role": "user", "content": "<img src=x onerror=\"window.pwned=1\">"},
                {"role": "assistant", "content": "**bold** <script>window.pwned=2</script> [x](javascript:alert(1))"}]
        _js(browser, "localStorage.setItem('sinklora.conversation', arguments[0])", json.dumps(evil))
        browser.refresh()
        assert wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant strong"), timeout=10)
        assert not browser.find_elements(By.CSS_SELECTOR, "#log img, #log script, #log a")
        assert "<img src=x" in browser.find_element(By.CSS_SELECTOR, ".msg.user").text
        assert _js(browser, "return window.pwned === undefined")
