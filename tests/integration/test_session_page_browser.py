"""The session page (``/session/{call_id}``) in headless Chromium (Debian's, driven by
Playwright) after the livekit_native capture was replayed: transcript, audio player
(playable, moving the cursor and moved by it), evaluations, tags, outcome, and logs with
a level filter; a screenshot goes to tests/artifacts/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import aiohttp
import pytest

from collector.calls import call_id_for
from tests.integration.test_livekit_native_replay import (
    NATIVE,
    PROJECT,
    QUERY_KEY,
    ROOM,
    captured,
    fixture_secret,  # noqa: F401  (autouse: the secret's environment variable)
    fresh_token,
    native_config,
    replay,
)
from tests.support import ROOT, eventually, free_port, missing_service, query, running_service

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
ARTIFACTS = ROOT / "tests" / "artifacts"


def _chromium() -> str:
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not found:
        missing_service("Debian chromium is not installed (make browser installs it)")
    return found


async def test_session_page_shows_transcript_audio_evaluations_and_logs(tmp_path):
    from playwright.async_api import async_playwright, expect

    executable = _chromium()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "calltrace.db"
    chat = json.loads((NATIVE / "007.part-chat_history.json").read_bytes())
    async with running_service(native_config(port, tmp_path)), aiohttp.ClientSession() as http:
        token = fresh_token()
        for meta, body in captured(NATIVE):
            status, _ = await replay(http, base, meta, body, token)
            assert status == 200
        await eventually(lambda: len(query(db, "SELECT 1 FROM log_records")) == 21)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=executable, args=CHROMIUM_ARGS
            )
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 1000})
                outside: list[str] = []
                page.on(
                    "request",
                    lambda r: None if r.url.startswith((base, "blob:")) else outside.append(r.url),
                )
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(base + "/")
                await page.evaluate(f"localStorage.setItem('calltrace.apiKey', '{QUERY_KEY}')")
                await page.goto(f"{base}/session/{call_id_for(PROJECT, ROOM)}")
                await expect(page.locator("body[data-ready=true]")).to_have_count(1)

                transcript = page.locator("#transcript li")
                await expect(transcript).to_have_count(len(chat["items"]))
                await expect(page.locator("#transcript")).to_contain_text("Hello, can you hear me?")
                await expect(page.locator("#transcript")).to_contain_text("get_weather")
                await expect(page.locator("#evaluations li")).to_have_count(2)
                await expect(page.locator("#evaluations .verdict-fail")).to_have_count(1)
                await expect(page.locator("#outcome")).to_contain_text("outcome: success")
                await expect(page.locator("#tags")).to_contain_text("language:en")
                await expect(page.locator("#summary")).to_contain_text(ROOM)

                # The audio plays from the stored file (Ogg/Opus, ~23 s).
                duration = await page.evaluate(
                    """() => new Promise((resolve) => {
                        const a = document.querySelector('#player');
                        if (a.readyState >= 1) resolve(a.duration);
                        a.addEventListener('loadedmetadata', () => resolve(a.duration));
                    })"""
                )
                assert 20 < duration < 26
                # A transcript line moves the audio and the cursor there, and is marked.
                third = transcript.nth(2)
                offset = float(await third.get_attribute("data-offset"))
                await third.click()
                position = await page.evaluate("document.querySelector('#player').currentTime")
                assert abs(position - offset) < 0.5
                await expect(third).to_have_class("item-message current")
                left = await page.evaluate("document.querySelector('#cursor').style.left")
                assert left.endswith("%") and float(left[:-1]) > 0

                # Logs: the Python records, a level filter that hides the INFO ones.
                logs = page.locator("#logs li")
                total = await logs.count()
                assert total == 5
                await page.select_option("#level", "13")
                visible = await page.locator("#logs li:not([hidden])").count()
                assert 0 < visible < total

                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "session_page.png"), full_page=True)
                assert outside == [] and errors == []
            finally:
                await browser.close()
