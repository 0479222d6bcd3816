"""The explorer in headless Chromium (Debian's, driven by Playwright) with odd data and
odd links: a trace whose spans all start at time 0, and URL hashes with a malformed
percent escape. Each renders something sensible, raises no uncaught error, and leaves a
screenshot under ``tests/artifacts/``."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from collector.keys import KeyStore
from tests.support import ROOT, free_port, missing_service, pipeline_config, running_service

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
ARTIFACTS = ROOT / "tests" / "artifacts"
TRACE_ID = bytes.fromhex("0123456789abcdef0123456789abcdef")
ROOM = "RM_epoch"


def chromium() -> str:
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if found is None:
        missing_service("Debian chromium is not installed (make browser installs it)")
    return found


def epoch_trace() -> bytes:
    """A call of three spans that all start (and end) at Unix time 0."""
    spans = [
        Span(trace_id=TRACE_ID, span_id=bytes([1] * 8), name="agent_session"),
        Span(
            trace_id=TRACE_ID,
            span_id=bytes([2] * 8),
            parent_span_id=bytes([1] * 8),
            name="llm_node",
        ),
        Span(
            trace_id=TRACE_ID,
            span_id=bytes([3] * 8),
            parent_span_id=bytes([1] * 8),
            name="tts_node",
        ),
    ]
    resource_spans = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    resource_spans.resource.attributes.append(
        KeyValue(key="livekit.room.id", value=AnyValue(string_value=ROOM))
    )
    return ExportTraceServiceRequest(resource_spans=[resource_spans]).SerializeToString()


@dataclass
class Explorer:
    page: Any
    base: str
    errors: list[str]
    """Uncaught errors (and unhandled rejections) on the page."""

    async def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)


@pytest.fixture
async def explorer(tmp_path: Path) -> AsyncIterator[Explorer]:
    from playwright.async_api import async_playwright

    executable = chromium()
    port = free_port()
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    base = f"http://127.0.0.1:{port}"
    async with running_service(pipeline_config(port, db)), async_playwright() as playwright:
        headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {key}"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{base}/v1/traces", data=epoch_trace(), headers=headers) as response,
        ):
            assert response.status == 200
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(f"{error.name}: {error.message}"))
            await page.goto(base + "/")
            await page.fill("#api-key", key)
            await page.click("#key-form button")
            await page.locator("#calls-table tbody tr").first.wait_for()
            yield Explorer(page, base, errors)
        finally:
            await browser.close()


async def test_trace_whose_spans_all_start_at_time_zero_shows_its_waterfall(
    explorer: Explorer,
) -> None:
    from playwright.async_api import expect

    page = explorer.page
    await page.goto(f"{explorer.base}/#/traces/{TRACE_ID.hex()}")
    await expect(page.locator("#detail-title")).to_have_text(f"Trace {TRACE_ID.hex()}")
    rows = page.locator("#waterfall .wf-row")
    await expect(rows).to_have_count(3)
    await expect(rows.first).to_contain_text("agent_session")
    await expect(page.locator("#status")).to_have_text("")
    # Every bar is drawn at the left edge (all spans start at the trace's start).
    for i in range(3):
        bar = rows.nth(i).locator(".wf-bar")
        await expect(bar).to_be_visible()
        assert await bar.evaluate("b => b.style.left") == "0%"
    await explorer.screenshot("explorer-epoch-trace.png")

    # The call the spans belong to opens the same way.
    await page.goto(f"{explorer.base}/#/calls")
    await page.locator("#calls-table tbody tr", has_text=ROOM).click()
    await expect(page.locator("#detail-title")).to_have_text(f"Call {ROOM}")
    await expect(rows).to_have_count(3)
    await expect(page.locator("#status")).to_have_text("")
    await explorer.screenshot("explorer-epoch-call.png")
    assert explorer.errors == []


@pytest.mark.parametrize(
    ("fragment", "message"),
    [
        ("#/calls/%E0%A4%A", "no call '%E0%A4%A'"),
        ("#/traces/%zz", "trace_id: expected 32 hex digits, got '%zz'"),
        ("#/calls/%", "no call '%'"),
    ],
    ids=["call-id", "trace-id", "lone-percent"],
)
async def test_malformed_percent_escape_in_a_link_says_what_is_wrong(
    explorer: Explorer, fragment: str, message: str
) -> None:
    """Opened as a link (a fresh page load): the API's answer for the id as typed."""
    from playwright.async_api import expect

    page = explorer.page
    await page.goto("about:blank")
    await page.goto(explorer.base + "/" + fragment)
    await expect(page.locator("#status")).to_contain_text(message)
    name = fragment.strip("#/").replace("/", "-").replace("%", "pct")
    await explorer.screenshot(f"explorer-malformed-{name}.png")
    assert explorer.errors == []
    # The explorer still works: the calls list opens from the nav bar.
    await page.click("#nav-calls")
    await expect(page.locator("#calls-table tbody tr", has_text=ROOM)).to_have_count(1)
    await expect(page.locator("#status")).to_have_text("")


async def test_malformed_percent_escape_in_the_view_name_shows_the_calls(
    explorer: Explorer,
) -> None:
    from playwright.async_api import expect

    page = explorer.page
    await page.goto("about:blank")
    await page.goto(explorer.base + "/#/%E0%A4%A")
    await expect(page.locator("#calls-table tbody tr", has_text=ROOM)).to_have_count(1)
    await expect(page.locator("#calls-view")).to_be_visible()
    await explorer.screenshot("explorer-malformed-view.png")
    assert explorer.errors == []
