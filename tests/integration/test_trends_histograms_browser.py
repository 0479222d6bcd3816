"""Issue 19: the explorer's trends page in headless Chromium (Debian's, driven by
Playwright) draws livekit-agents' ``lk.agents.turn.*`` histograms when the range has no
turn spans (a session recorded without traces: here the livekit_native capture's
metrics and logs, not its traces), says so, and keeps an explicit source in the URL.
A screenshot goes to tests/artifacts/."""

from __future__ import annotations

import aiohttp
import pytest

from tests.integration.test_livekit_native_replay import (
    NATIVE,
    QUERY_KEY,
    captured,
    fixture_secret,  # noqa: F401  (autouse: the secret's environment variable)
    fresh_token,
    native_config,
    replay,
)
from tests.integration.test_session_page_browser import ARTIFACTS, CHROMIUM_ARGS, _chromium
from tests.support import eventually, free_port, query, running_service

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

RANGE = "start=2026-12-08T00:00:00.000Z&end=2026-12-08T01:00:00.000Z&step=10m"


async def test_trends_fall_back_to_livekit_turn_histograms(tmp_path):
    from playwright.async_api import async_playwright, expect

    executable = _chromium()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "calltrace.db"
    async with running_service(native_config(port, tmp_path)), aiohttp.ClientSession() as http:
        token = fresh_token()
        for meta, body in captured(NATIVE):
            if "/traces/" in meta["path"]:
                continue  # the session's metrics and logs only: no turn spans
            status, _ = await replay(http, base, meta, body, token)
            assert status == 200
        await eventually(
            lambda: query(db, "SELECT 1 FROM metric_points WHERE name LIKE 'lk.agents.turn.%'")
        )
        assert query(db, "SELECT count(*) FROM spans") == [(0,)]
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=executable, args=CHROMIUM_ARGS
            )
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(base + "/")
                await page.evaluate(f"localStorage.setItem('calltrace.apiKey', '{QUERY_KEY}')")
                await page.goto(f"{base}/#/trends?{RANGE}")
                panel = page.locator("#trends-a")
                await expect(panel).to_have_attribute("data-source", "metrics")
                await expect(panel.locator("h3")).to_contain_text("lk.agents.turn.*")
                # One point per 10-minute bucket; the session's bucket has a value.
                await expect(panel.locator("circle.pt")).to_have_count(6)
                await expect(panel.locator("circle.pt:not(.empty)")).to_have_count(1)
                counts = panel.locator("table.counts tbody tr")
                await expect(counts).to_have_count(1)
                cells = await counts.first.locator("td").all_inner_texts()
                assert cells[2:6] == ["1", "3", "–", "–"], cells  # calls, turns; no error counts
                assert 700 <= float(cells[6].split()[0]) <= 730, cells  # e2e p50, ms
                await expect(page.locator("#status")).to_have_text("")
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "trends_histograms.png"), full_page=True)

                # By LLM model, from the histograms' model_name.
                await page.goto(f"{base}/#/trends?{RANGE}&group_by=model")
                await expect(panel.locator(".series-legend")).to_contain_text("fake-llm")

                # Turn spans asked for explicitly: none in range, said as a notice.
                await page.goto(f"{base}/#/trends?{RANGE}")
                await page.select_option("#trends-filter select[name=source]", "spans")
                await page.click("#trends-filter button[type=submit]")
                await expect(panel).to_have_attribute("data-source", "spans")
                assert "source=spans" in page.url
                await expect(page.locator("#notice")).to_have_text("No calls in this range.")
                assert errors == []
            finally:
                await browser.close()
