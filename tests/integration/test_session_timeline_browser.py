"""Issue 19 in headless Chromium (Debian's, driven by Playwright) after the livekit_native
capture and a Pipecat call were stored: the calls list shows and filters by outcome and
session tags (state in the URL); the call page links its session page and back; on the
session page the audio position moves one cursor over the timeline, the span waterfall
and the transcript, and a click on either seeks the audio; the log level filter hides
records in the list and on the timeline and is kept in the URL. Screenshots go to
tests/artifacts/."""

from __future__ import annotations

import json

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
from tests.integration.test_session_page_browser import ARTIFACTS, CHROMIUM_ARGS, _chromium
from tests.support import eventually, fixture_requests, free_port, query, running_service

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


async def test_outcome_filters_session_link_and_shared_cursor(tmp_path):
    from playwright.async_api import async_playwright, expect

    executable = _chromium()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "calltrace.db"
    call_id = call_id_for(PROJECT, ROOM)
    chat = json.loads((NATIVE / "007.part-chat_history.json").read_bytes())
    async with running_service(native_config(port, tmp_path)), aiohttp.ClientSession() as http:
        token = fresh_token()
        for meta, body in captured(NATIVE):
            status, _ = await replay(http, base, meta, body, token)
            assert status == 200
        for path in fixture_requests("pipecat"):  # a call without a LiveKit session
            async with http.post(
                f"{base}/v1/traces",
                data=path.read_bytes(),
                headers={
                    "Content-Type": "application/x-protobuf",
                    "Authorization": f"Bearer {QUERY_KEY}",
                },
            ) as response:
                assert response.status == 200
        await eventually(lambda: len(query(db, "SELECT 1 FROM log_records")) == 21)
        await eventually(lambda: len(query(db, "SELECT 1 FROM calls")) == 2)
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

                # The calls list: outcome and session tags on the LiveKit call only.
                await page.goto(base + "/#/calls")
                rows = page.locator("#calls-table tbody tr")
                await expect(rows).to_have_count(2)
                native = page.locator(f"#calls-table tr[data-call-id='{call_id}']")
                await expect(native.locator("td.outcome")).to_have_text("success")
                await expect(native.locator("td.tags")).to_contain_text("language:en")
                await expect(native.locator("td.tags")).to_contain_text("fixture:weather")
                other = page.locator(f"#calls-table tbody tr:not([data-call-id='{call_id}'])")
                await expect(other.locator("td.outcome")).to_have_text("")

                # Filter by outcome: one row, the state in the URL, kept on reload.
                await page.select_option("#calls-filter select[name=outcome]", "success")
                await page.click("#calls-filter button[type=submit]")
                await expect(rows).to_have_count(1)
                assert "outcome=success" in page.url
                await page.reload()
                await expect(rows).to_have_count(1)
                await expect(page.locator("#calls-filter select[name=outcome]")).to_have_value(
                    "success"
                )
                await page.select_option("#calls-filter select[name=outcome]", "fail")
                await page.click("#calls-filter button[type=submit]")
                await expect(page.locator("#notice")).to_have_text("No calls match.")
                await expect(rows).to_have_count(0)
                # By session tag, typed or clicked on a call's tag.
                await page.select_option("#calls-filter select[name=outcome]", "")
                await page.fill("#calls-filter input[name=session_tag]", "nope:none")
                await page.click("#calls-filter button[type=submit]")
                await expect(rows).to_have_count(0)
                await page.goto(base + "/#/calls")
                await expect(rows).to_have_count(2)
                await native.locator("a.session-tag", has_text="language:en").click()
                await expect(rows).to_have_count(1)
                assert "session_tag=language%3Aen" in page.url
                await expect(page.locator("#calls-filter input[name=session_tag]")).to_have_value(
                    "language:en"
                )
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "calls_outcome_filter.png"))

                # The call page links its session; the session page links back.
                await native.click()
                await expect(page.locator("#detail-summary")).to_contain_text("success")
                await page.click("#session-link")
                await expect(page.locator("body[data-ready=true]")).to_have_count(1)
                assert page.url == f"{base}/session/{call_id}"
                transcript = page.locator("#transcript li")
                await expect(transcript).to_have_count(len(chat["items"]))
                wf_rows = page.locator("#session-waterfall .sw-row")
                assert await wf_rows.count() > 10
                await expect(page.locator("#session-waterfall")).to_contain_text("agent_turn")

                # A transcript line seeks: audio, timeline cursor and waterfall cursor move
                # to the same time, and the spans running then are marked.
                line = transcript.nth(4)
                offset = float(await line.get_attribute("data-offset"))
                await line.click()
                position = await page.evaluate("document.querySelector('#player').currentTime")
                assert abs(position - offset) < 0.5
                await expect(line).to_have_class("item-message current")
                await expect(
                    page.locator("#session-waterfall .sw-row.current").first
                ).to_be_visible()
                cursor_x = await _cursor_x(page, "#cursor", "#timeline")
                wf_cursor_x = await _cursor_x(page, "#waterfall-cursor", "#session-waterfall")
                assert abs(cursor_x - wf_cursor_x) < 0.01

                # Playing the audio moves the cursors by themselves.
                await page.evaluate("document.querySelector('#player').muted = true")
                await page.evaluate("document.querySelector('#player').play()")
                for _ in range(200):  # (the page's CSP forbids wait_for_function's eval)
                    moved = await page.evaluate("Number(document.body.dataset.position)")
                    if moved > offset + 0.5:
                        break
                    await page.wait_for_timeout(50)
                assert moved > offset + 0.5
                await page.evaluate("document.querySelector('#player').pause()")
                assert await _cursor_x(page, "#cursor", "#timeline") > cursor_x

                # A click on the waterfall seeks there, and the transcript follows.
                track = page.locator("#session-waterfall .sw-track").first
                box = await track.bounding_box()
                await page.mouse.click(box["x"] + box["width"] * 0.1, box["y"] + box["height"] / 2)
                length = await page.evaluate(
                    "Math.max(...[...document.querySelectorAll('#transcript li')]"
                    ".map((li) => Number(li.dataset.offset)))"
                )
                position = await page.evaluate("document.querySelector('#player').currentTime")
                assert 0 < position < length
                assert abs(await _cursor_x(page, "#cursor", "#timeline") - 0.1) < 0.02
                current = page.locator("#transcript li.current")
                if await current.count():
                    first = float(await current.first.get_attribute("data-offset"))
                    assert first <= position + 0.01

                # Logs: the level filter hides records in the list and on the timeline,
                # and is kept in the URL.
                marks = page.locator("#timeline .mark.log")
                total = await marks.count()
                assert total == 5
                await page.select_option("#level", "13")
                assert "level=13" in page.url
                visible = await page.locator("#timeline .mark.log:not([hidden])").count()
                assert 0 < visible < total
                await page.reload()
                await expect(page.locator("body[data-ready=true]")).to_have_count(1)
                await expect(page.locator("#level")).to_have_value("13")
                assert await page.locator("#logs li:not([hidden])").count() == visible
                await page.screenshot(
                    path=str(ARTIFACTS / "session_timeline_cursor.png"), full_page=True
                )

                await page.click("#call-link")
                await expect(page.locator("#detail-title")).to_have_text("Call " + ROOM)
                assert outside == [] and errors == []
            finally:
                await browser.close()


async def _cursor_x(page, cursor: str, box: str) -> float:
    """Where a cursor stands across the time axis of its box, as a fraction."""
    return await page.evaluate(
        """([cursor, box]) => {
            const c = document.querySelector(cursor).getBoundingClientRect();
            const b = document.querySelector(box).getBoundingClientRect();
            const label = box === '#session-waterfall' ? 220 : 0;
            return (c.left - b.left - label) / (b.width - label);
        }""",
        [cursor, box],
    )
