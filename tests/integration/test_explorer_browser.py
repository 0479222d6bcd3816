"""The explorer page in headless Chromium (Debian's, driven by Playwright) against a
running collector holding the calls of ``tests/query_dataset.py``."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.query_dataset import XSS_ATTRIBUTE, XSS_NAME, Dataset, make_dataset
from tests.support import ROOT, free_port, missing_service, running_service

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "tests" / "artifacts"


def _need_chromium() -> None:
    if Path(CHROMIUM).exists() or shutil.which("chromium"):
        return
    missing_service("Debian chromium is not installed (make browser installs it)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    _need_chromium()
    return make_dataset(tmp_path_factory.mktemp("explorer"))


@pytest.fixture
async def page(dataset: Dataset) -> AsyncIterator[tuple[Any, str, list[str]]]:
    from playwright.async_api import async_playwright

    port = free_port()
    async with running_service(dataset.config(port)), async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            args=CHROMIUM_ARGS,
        )
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            dialogs: list[str] = []

            async def on_dialog(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.dismiss()

            page.on("dialog", on_dialog)
            outside: list[str] = []
            base = f"http://127.0.0.1:{port}"
            page.on(
                "request",
                lambda request: (
                    None if request.url.startswith(base) else outside.append(request.url)
                ),
            )
            yield page, base, dialogs
            assert outside == [], f"the page fetched from outside: {outside}"
        finally:
            await browser.close()


async def test_explorer_calls_filters_waterfall_turns_and_span_attributes(
    page: tuple[Any, str, list[str]], dataset: Dataset
) -> None:
    from playwright.async_api import expect

    page_, base, dialogs = page
    await page_.goto(base + "/")
    # No key yet: the page says so.
    await expect(page_.locator("#status")).to_contain_text("valid API key")
    await page_.fill("#api-key", dataset.key)
    await page_.click("#key-form button")
    rows = page_.locator("#calls-table tbody tr")
    await expect(rows).to_have_count(len(dataset.rooms))
    # The key is kept in localStorage across reloads.
    await page_.reload()
    await expect(rows).to_have_count(len(dataset.rooms))

    # Filter the calls by a custom tag.
    await page_.fill("#calls-filter input[name=filters]", "tag.customer=initech")
    await page_.click("#calls-filter button")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("RM_tagged")
    await expect(rows.first).to_contain_text("customer=initech")
    # A bad filter shows the API's message.
    await page_.fill("#calls-filter input[name=filters]", "customer=initech")
    await page_.click("#calls-filter button")
    await expect(page_.locator("#status")).to_contain_text("customer: unknown parameter")
    await page_.fill("#calls-filter input[name=filters]", "")
    await page_.click("#calls-filter button")
    await expect(rows).to_have_count(len(dataset.rooms))

    # Open the call with the HTML-named span and the failed TTS request.
    await rows.filter(has_text="RM_errors").click()
    await expect(page_.locator("#detail-title")).to_have_text("Call RM_errors")
    turns = page_.locator("#turns-table tbody tr")
    await expect(turns).to_have_count(3)
    # agent_turn lk.e2e_latency 0.7056 s, user_turn lk.transcription_delay 0.2006 s.
    await expect(turns.first).to_contain_text("Hello, can you hear me?")
    await expect(turns.first).to_contain_text("706 ms")
    await expect(turns.first).to_contain_text("201 ms")
    await expect(turns.nth(1)).to_contain_text("get_weather")

    waterfall = page_.locator("#waterfall .wf-row")
    await expect(waterfall).to_have_count(54)
    # The span named like an HTML tag is text: no element, no script ran.
    html_row = page_.locator("#waterfall .wf-label", has_text=XSS_NAME)
    await expect(html_row).to_be_visible()
    await expect(html_row).to_have_text(XSS_NAME)
    assert await page_.locator("#waterfall img").count() == 0
    await html_row.click()
    await expect(page_.locator("#span-name")).to_have_text(XSS_NAME)
    await expect(page_.locator("#span-attributes")).to_contain_text(XSS_ATTRIBUTE)
    assert await page_.locator("#span-panel script").count() == 0

    # Click an LLM span and read its attributes.
    await page_.locator(
        "#waterfall .wf-row[data-category=llm] .wf-label", has_text="llm_node"
    ).first.click()
    attributes = page_.locator("#span-attributes")
    await expect(attributes).to_contain_text("lk.response.ttft")
    await expect(attributes).to_contain_text("0.10146902799897362")
    await expect(page_.locator("#span-resource")).to_contain_text("RM_errors")
    # The failed span is marked.
    await expect(page_.locator("#waterfall .wf-row.error")).to_have_count(1)
    await expect(page_.locator("#waterfall .wf-row.error")).to_contain_text("tts_request")

    # LLM, TTS and tool spans have colours of their own.
    colours = {}
    for category in ("llm", "tts", "tool", "turn"):
        bar = page_.locator(f"#waterfall .wf-row[data-category={category}] .wf-bar").first
        colours[category] = await bar.evaluate("b => getComputedStyle(b).backgroundColor")
    assert len(set(colours.values())) == 4, colours

    # Bars are to scale: the first agent_turn (2016.6 ms) against the session (23213.9 ms).
    root = await page_.locator("#waterfall .wf-row").first.locator(".wf-bar").bounding_box()
    turn = await (
        page_.locator("#waterfall .wf-row", has=page_.locator(".wf-label", has_text="agent_turn"))
        .first.locator(".wf-bar")
        .bounding_box()
    )
    assert turn["width"] / root["width"] == pytest.approx(2016.605 / 23213.924, abs=0.01)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page_.screenshot(path=str(ARTIFACTS / "explorer-call.png"), full_page=True)

    # Trace search by a span name substring, then a Pipecat call's STT spans.
    await page_.click("#nav-traces")
    await page_.fill("#traces-filter input[name=name]", "img src")
    await page_.click("#traces-filter button")
    traces = page_.locator("#traces-table tbody tr")
    await expect(traces).to_have_count(1)
    await page_.fill("#traces-filter input[name=name]", "")
    await page_.fill("#traces-filter input[name=filters]", "attr.livekit.room.id=RM_pc1")
    await page_.click("#traces-filter button")
    await expect(traces).to_have_count(1)
    await expect(traces.first).to_contain_text("conversation")
    await traces.first.click()
    await expect(page_.locator("#detail-title")).to_contain_text("Trace ")
    stt = page_.locator("#waterfall .wf-row[data-category=stt] .wf-bar").first
    colours["stt"] = await stt.evaluate("b => getComputedStyle(b).backgroundColor")
    assert len(set(colours.values())) == 5, colours
    await page_.screenshot(path=str(ARTIFACTS / "explorer-trace.png"), full_page=True)

    assert dialogs == []


async def test_explorer_shows_a_call_without_its_root(
    page: tuple[Any, str, list[str]], dataset: Dataset
) -> None:
    from playwright.async_api import expect

    page_, base, dialogs = page
    await page_.goto(base + "/")
    await page_.evaluate("key => localStorage.setItem('calltrace.apiKey', key)", dataset.key)
    await page_.reload()
    await page_.locator("#calls-table tbody tr", has_text="RM_orphan").click()
    placeholders = page_.locator("#waterfall .wf-row.placeholder")
    await expect(placeholders).to_have_count(2)
    await expect(placeholders.first).to_contain_text("(missing span)")
    await placeholders.first.click()
    await expect(page_.locator("#span-facts")).to_contain_text("never arrived")
    assert dialogs == []
