"""The explorer's trace view, span search and trends pages in headless Chromium (Debian's,
driven by Playwright), on the calls of ``tests/query_dataset.py``: each interaction of
issue 18, asserting what a user sees. Screenshots go to ``tests/artifacts/``."""

from __future__ import annotations

import os
import time
from typing import Any

import aiohttp
import pytest

from collector.spans import ExportTraceServiceRequest
from tests.integration.test_explorer_browser import ARTIFACTS
from tests.integration.test_explorer_browser import dataset as dataset
from tests.integration.test_explorer_browser import page as page
from tests.query_dataset import Dataset
from tests.support import eventually, query

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

Page = tuple[Any, str, list[str]]


async def _signed_in(page: Page, dataset: Dataset, hash_: str = "#/calls") -> Any:
    from playwright.async_api import expect

    page_, base, _ = page
    await page_.goto(base + "/")
    await page_.evaluate("key => localStorage.setItem('calltrace.apiKey', key)", dataset.key)
    await page_.goto(base + "/" + hash_)
    await expect(page_.locator("#status")).to_have_text("")
    return page_


async def _open_call(page_: Any, room: str) -> None:
    from playwright.async_api import expect

    await page_.goto(page_.url.split("#")[0] + "#/calls")
    await page_.locator("#calls-table tbody tr", has_text=room).click()
    await expect(page_.locator("#detail-title")).to_have_text(f"Call {room}")


def _row(page_: Any, name: str) -> Any:
    return page_.locator("#waterfall .wf-row", has=page_.locator(".wf-name", has_text=name))


async def test_collapsing_a_subtree_hides_its_rows_and_the_url_keeps_it(
    page: Page, dataset: Dataset
) -> None:
    from playwright.async_api import expect

    page_ = await _signed_in(page, dataset)
    await _open_call(page_, "RM_test123")
    rows = page_.locator("#waterfall .wf-row:visible")
    await expect(rows).to_have_count(53)
    # The second agent_turn holds 15 descendants (INSPECT.txt): they disappear.
    tool_turn = _row(page_, "agent_turn").nth(1)
    await expect(_row(page_, "function_tool")).to_be_visible()
    await tool_turn.locator("button.wf-toggle").click()
    await expect(rows).to_have_count(53 - 15)
    await expect(_row(page_, "function_tool")).to_be_hidden()
    await expect(tool_turn.locator("button.wf-toggle")).to_have_attribute("aria-expanded", "false")
    # The state is in the URL: a reload (a shared link) shows the same.
    assert "collapsed=" in page_.url
    await page_.reload()
    await expect(page_.locator("#detail-title")).to_have_text("Call RM_test123")
    await expect(rows).to_have_count(53 - 15)
    await page_.screenshot(path=str(ARTIFACTS / "explorer-collapsed.png"), full_page=True)
    await _row(page_, "agent_turn").nth(1).locator("button.wf-toggle").click()
    await expect(rows).to_have_count(53)


async def test_axis_ticks_state_lanes_and_events_on_bars(page: Page, dataset: Dataset) -> None:
    from playwright.async_api import expect

    page_ = await _signed_in(page, dataset)
    await _open_call(page_, "RM_test123")
    # The session lasts 23.2 s: ticks every 5 s from 0 ms.
    ticks = page_.locator("#waterfall .wf-axis .wf-tick")
    assert await ticks.all_text_contents() == ["0.00 ms", "5.00 s", "10.00 s", "15.00 s", "20.00 s"]
    # agent_session's events: 12 agent_state_changed, 6 user_state_changed.
    agent_lane = page_.locator("#waterfall .wf-lane[data-lane=agent] .wf-state")
    user_lane = page_.locator("#waterfall .wf-lane[data-lane=user] .wf-state")
    await expect(agent_lane).to_have_count(12)
    await expect(user_lane).to_have_count(6)
    states = {await s.get_attribute("data-state") for s in await agent_lane.all()}
    assert {"listening", "thinking", "speaking"} <= states
    colours = set()
    for state in ("listening", "thinking", "speaking"):
        lane = page_.locator(f"#waterfall .wf-lane .wf-state[data-state={state}]").first
        colours.add(await lane.evaluate("e => getComputedStyle(e).backgroundColor"))
    assert len(colours) == 3
    # The first thinking stretch starts where the first agent_turn's user stopped
    # talking plus the end-of-turn wait: 2.51 s into the session (of 23.21 s).
    lane_box = await page_.locator("#waterfall .wf-lane[data-lane=agent] .wf-track").bounding_box()
    thinking = await page_.locator(
        "#waterfall .wf-lane .wf-state[data-state=thinking]"
    ).first.bounding_box()
    assert (thinking["x"] - lane_box["x"]) / lane_box["width"] == pytest.approx(
        2507.1 / 23213.9, abs=0.005
    )
    # Events are drawn on their bars: 18 on agent_session, one generation per agent_turn
    # (two on the tool turn).
    root_events = _row(page_, "agent_session").locator(".wf-event")
    await expect(root_events).to_have_count(18)
    turn_events = _row(page_, "agent_turn").nth(1).locator(".wf-event[data-event=generation]")
    await expect(turn_events).to_have_count(2)
    await page_.screenshot(path=str(ARTIFACTS / "explorer-lanes.png"), full_page=False)


async def test_detail_pane_stays_in_view_and_shows_pretty_copyable_values(
    page: Page, dataset: Dataset
) -> None:
    from playwright.async_api import expect

    page_, base, _ = page
    await page_.set_viewport_size({"width": 1400, "height": 700})
    page_ = await _signed_in(page, dataset)
    await _open_call(page_, "RM_test123")
    # The last span, far down the page: its details are in the viewport.
    last = page_.locator("#waterfall .wf-row").last
    await last.scroll_into_view_if_needed()
    await last.click()
    panel = page_.locator("#span-panel")
    await expect(page_.locator("#span-name")).to_have_text("drain_agent_activity")
    await expect(panel).to_be_in_viewport()
    box = await panel.bounding_box()
    assert 0 <= box["y"] < 700
    # A JSON attribute is pretty-printed, and copyable.
    await _row(page_, "llm_request").first.click()
    await expect(panel).to_be_in_viewport()
    messages = page_.locator('#span-attributes tr[data-key="gen_ai.input.messages"] pre')
    await expect(messages).to_contain_text('"role": "user"')
    assert "\n" in await messages.text_content()
    copy = page_.locator('#span-attributes tr[data-key="gen_ai.input.messages"] button.copy')
    await page_.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    await copy.click()
    await expect(copy).to_have_text("copied")
    copied = await page_.evaluate("navigator.clipboard.readText()")
    assert '"content": "Hello, can you hear me?"' in copied
    # Ids are copyable.
    span_id = await page_.locator("#span-facts button.copy").first.get_attribute("data-copy")
    await page_.locator("#span-facts button.copy").first.click()
    assert await page_.evaluate("navigator.clipboard.readText()") == span_id
    # The selection is in the URL.
    assert f"span={span_id}" in page_.url
    await page_.screenshot(path=str(ARTIFACTS / "explorer-detail-pane.png"))


async def test_a_turn_row_highlights_its_spans(page: Page, dataset: Dataset) -> None:
    from playwright.async_api import expect

    page_ = await _signed_in(page, dataset)
    await _open_call(page_, "RM_test123")
    turns = page_.locator("#turns-table tbody tr")
    await expect(turns).to_have_count(3)
    # What was said and answered, the end-of-turn wait, and the gap that is left.
    await expect(turns.first).to_contain_text("Hello, can you hear me?")
    await expect(turns.first).to_contain_text("Hi! Yes, I can hear you. How can I help?")
    await expect(turns.first.locator("td").nth(5)).to_have_text("501 ms")  # end of turn
    await expect(turns.first.locator("td").nth(3)).to_have_text("706 ms")  # end-to-end
    await expect(turns.first.locator("td").nth(11)).to_have_text("3.17 ms")  # the gap
    # The tool turn: the answer's first token 2.33 s after the user stopped.
    await expect(turns.nth(1).locator("td").nth(8)).to_have_text("2.33 s")
    await turns.nth(1).click()
    highlighted = page_.locator("#waterfall .wf-row.in-turn")
    # agent_turn 2 and its 15 descendants, user_turn 2 and its 3.
    await expect(highlighted).to_have_count(20)
    await expect(
        highlighted.filter(has=page_.locator(".wf-name", has_text="function_tool"))
    ).to_have_count(1)
    await expect(highlighted.first).to_be_in_viewport()
    await expect(turns.nth(1)).to_have_class("selected")
    assert "turn=2" in page_.url
    await page_.screenshot(path=str(ARTIFACTS / "explorer-turn.png"))
    # A shared link highlights the same turn.
    await page_.reload()
    await expect(highlighted).to_have_count(20)


async def test_jump_to_first_error_and_links_between_call_and_trace(
    page: Page, dataset: Dataset
) -> None:
    from playwright.async_api import expect

    page_ = await _signed_in(page, dataset)
    await _open_call(page_, "RM_errors")
    await page_.click("#jump-error")
    await expect(page_.locator("#span-name")).to_have_text("tts_request")
    await expect(page_.locator("#waterfall .wf-row.selected")).to_be_in_viewport()
    await expect(page_.locator("#span-facts")).to_contain_text("ERROR tts provider timed out")
    # No error in this call: no button.
    await _open_call(page_, "RM_test123")
    await expect(page_.locator("#jump-error")).to_be_hidden()
    # The call page links its trace; the trace page links back.
    [trace_link] = await page_.locator("#detail-summary a[href^='#/traces/']").all()
    await trace_link.click()
    await expect(page_.locator("#detail-title")).to_have_text(
        "Trace cb848013561485326542b6f88ecc42a0"
    )
    await page_.locator("#detail-summary a[href^='#/calls/']").click()
    await expect(page_.locator("#detail-title")).to_have_text("Call RM_test123")


async def test_list_state_is_in_the_url_times_name_their_zone_and_errors_clear(
    page: Page, dataset: Dataset
) -> None:
    from playwright.async_api import expect

    page_ = await _signed_in(page, dataset)
    await expect(page_.locator("#timezone")).to_contain_text("Times in ")
    await expect(page_.locator("#timezone")).to_contain_text("UTC")
    started = page_.locator("#calls-table tbody tr td").first
    # The browser's zone is UTC here: the time says so.
    await expect(started).to_contain_text("UTC")
    # Sort by worst turn: the Pipecat calls (4.08 s) come first, and the URL says so.
    await page_.select_option("#calls-filter select[name=sort]", "worst_turn")
    await page_.click("#calls-filter button")
    rows = page_.locator("#calls-table tbody tr")
    await expect(rows.first).to_contain_text("4.08 s")
    assert "sort=worst_turn" in page_.url
    shared = page_.url
    # A bad value: an error. The next request that succeeds clears it.
    await page_.fill("#calls-filter input[name=filters]", "colour=red")
    await page_.click("#calls-filter button")
    await expect(page_.locator("#status")).to_contain_text("colour: unknown parameter")
    await page_.fill("#calls-filter input[name=filters]", "tag.customer=nobody")
    await page_.click("#calls-filter button")
    await expect(page_.locator("#status")).to_have_text("")
    # No match is a notice, not an error.
    await expect(page_.locator("#notice")).to_have_text("No calls match.")
    await expect(rows).to_have_count(0)
    # The shared link restores the sort and its form.
    await page_.goto(shared)
    await expect(rows.first).to_contain_text("4.08 s")
    await expect(page_.locator("#calls-filter select[name=sort]")).to_have_value("worst_turn")
    # A malformed escape in the hash does not break the page.
    await page_.goto(shared.split("#")[0] + "#/calls/%E0%A4%A")
    await expect(page_.locator("#status")).to_contain_text("no call")


async def test_span_search_page(page: Page, dataset: Dataset) -> None:
    from playwright.async_api import expect

    page_ = await _signed_in(page, dataset, "#/spans")
    await page_.fill("#spans-filter input[name=name]", "llm_request")
    await page_.fill("#spans-filter input[name=min_duration_ms]", "300")
    await page_.fill("#spans-filter input[name=filters]", "attr.livekit.room.id=RM_test123")
    await page_.click("#spans-filter button")
    rows = page_.locator("#spans-table tbody tr")
    # Four llm_request and four llm_request_run spans over 300 ms in that call.
    await expect(rows).to_have_count(8)
    assert "name=llm_request" in page_.url and "min_duration_ms=300" in page_.url
    await page_.screenshot(path=str(ARTIFACTS / "explorer-span-search.png"))
    # A result opens its trace with the span selected.
    await rows.first.click()
    await expect(page_.locator("#detail-title")).to_contain_text("Trace ")
    await expect(page_.locator("#span-name")).to_have_text("llm_request")
    await expect(page_.locator("#waterfall .wf-row.selected")).to_have_count(1)


async def test_trends_chart_one_point_per_bucket_and_comparison(
    page: Page, dataset: Dataset
) -> None:
    from playwright.async_api import expect

    page_ = await _signed_in(
        page,
        dataset,
        "#/trends?start=2026-11-24T07:00:00.000Z&end=2026-11-24T10:00:00.000Z&step=30m"
        "&group_by=service&b_filters=tag.customer%3Dinitech",
    )
    panel_a, panel_b = page_.locator("#trends-a"), page_.locator("#trends-b")
    # Six 30-minute buckets; two services: one point per bucket on each line.
    series = panel_a.locator("svg.chart g.series-group")
    await expect(series).to_have_count(2)
    for group in await series.all():
        await expect(group.locator("circle.pt")).to_have_count(6)
    # Buckets without turns are hollow points: LiveKit calls start in 07:30 (the
    # capture) and 09:00 (three copies), so 07:00, 08:00, 08:30 and 09:30 are empty.
    livekit = panel_a.locator("g.series-group[data-group=livekit-voice-agent-fixture]")
    await expect(livekit.locator("circle.pt.empty")).to_have_count(4)
    await expect(livekit.locator("circle.pt:not(.empty)")).to_have_count(2)
    # The comparison panel: the tagged call alone, in its own chart.
    await expect(panel_b).to_be_visible()
    await expect(panel_b.locator("svg.chart g.series-group")).to_have_count(1)
    await expect(panel_b.locator("h3")).to_contain_text("tag.customer=initech")
    await expect(panel_b.locator("table.counts tbody tr")).to_have_count(1)
    boxes = [await panel_a.bounding_box(), await panel_b.bounding_box()]
    assert boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"]  # side by side
    await page_.screenshot(path=str(ARTIFACTS / "explorer-trends.png"), full_page=True)


def _big_call(spans: int, room: str) -> ExportTraceServiceRequest:
    """One LiveKit-shaped trace of ``spans`` spans: a session, turns with 17 children."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    for key, value in (("service.name", "big-agent"), ("livekit.room.id", room)):
        kv = resource_spans.resource.attributes.add()
        kv.key, kv.value.string_value = key, value
    scope = resource_spans.scope_spans.add()
    trace_id = os.urandom(16)
    start = time.time_ns() - 3_600 * 10**9

    def add(name: str, parent: bytes, begin: int, length: int) -> bytes:
        span = scope.spans.add()
        span.trace_id, span.span_id, span.parent_span_id = trace_id, os.urandom(8), parent
        span.name, span.start_time_unix_nano = name, begin
        span.end_time_unix_nano = begin + length
        return bytes(span.span_id)

    root = add("agent_session", b"", start, (spans // 18 + 1) * 3 * 10**9)
    count = 1
    turn_number = 0
    while count < spans:
        begin = start + turn_number * 3 * 10**9
        turn = add("agent_turn", root, begin, 2 * 10**9)
        count += 1
        for child in range(min(17, spans - count)):
            add(
                ("llm_node", "tts_node", "agent_speaking")[child % 3],
                turn,
                begin + child * 10**8,
                10**8,
            )
            count += 1
        turn_number += 1
    return request


async def test_a_call_of_2000_spans_renders_in_under_a_second(page: Page, dataset: Dataset) -> None:
    from playwright.async_api import expect

    page_, base, _ = page
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base + "/v1/traces",
            data=_big_call(2000, "RM_big").SerializeToString(),
            headers={
                "Authorization": f"Bearer {dataset.key}",
                "Content-Type": "application/x-protobuf",
            },
        ) as response,
    ):
        assert response.status == 200
    await eventually(
        lambda: (
            query(
                dataset.db,
                "SELECT count(*) FROM spans s JOIN calls c ON c.call_id = s.call_id"
                " WHERE c.room_id = 'RM_big'",
            )[0][0]
            == 2000
        )
    )
    page_ = await _signed_in(page, dataset)
    await page_.locator("#calls-table tbody tr", has_text="RM_big").click()
    await expect(page_.locator("#waterfall .wf-row")).to_have_count(2000)
    call_hash = page_.url.split("#", 1)[1]
    # From the navigation to 2,000 rows on screen: the request, the JSON, the DOM and the
    # first frame after it. The best of three: the 2-core machine is shared, and a burst
    # of other work is not the page's time.
    timings = []
    for _ in range(3):
        await page_.goto(base + "/#/calls")
        await expect(page_.locator("#calls-table tbody tr").first).to_be_visible()
        elapsed = await page_.evaluate(
            """async (hash) => {
                const started = performance.now();
                location.hash = hash;
                while (document.querySelectorAll('#waterfall .wf-row').length < 2000
                       || document.querySelector('#detail-view').hidden) {
                    await new Promise((resolve) => requestAnimationFrame(resolve));
                }
                await new Promise((resolve) => requestAnimationFrame(resolve));
                return performance.now() - started;
            }""",
            "#" + call_hash,
        )
        waterfall = page_.locator("#waterfall")
        fetch_ms = await waterfall.get_attribute("data-fetch-ms")
        render_ms = await waterfall.get_attribute("data-render-ms")
        timings.append(f"{elapsed:.0f} ms (fetch {fetch_ms}, draw {render_ms})")
        if elapsed < 1000:
            break
    print("2000-span call on screen in " + ", ".join(timings))
    assert elapsed < 1000, timings
    # Scrolling and collapsing stay usable: collapse the root, one row remains.
    await _row(page_, "agent_session").locator("button.wf-toggle").click()
    await expect(page_.locator("#waterfall .wf-row:visible")).to_have_count(1)


async def test_a_trace_found_by_search_marks_its_matched_spans(
    page: Page, dataset: Dataset
) -> None:
    from playwright.async_api import expect

    page_ = await _signed_in(page, dataset, "#/traces")
    await page_.fill("#traces-filter input[name=name]", "function_tool")
    await page_.uncheck("#traces-filter input[name=substring]")
    await page_.fill("#traces-filter input[name=filters]", "attr.livekit.room.id=RM_test123")
    await page_.click("#traces-filter button")
    rows = page_.locator("#traces-table tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first.locator("td").nth(5)).to_have_text("1")  # one span matched
    await rows.first.click()
    matched = page_.locator("#waterfall .wf-row.matched")
    await expect(matched).to_have_count(1)
    await expect(matched).to_contain_text("function_tool")
    await expect(page_.locator("#span-name")).to_have_text("function_tool")


async def test_a_trace_whose_spans_all_start_at_time_zero(page: Page, dataset: Dataset) -> None:
    """Unset times (0) are times too: the waterfall draws the trace, it does not fail."""
    from playwright.async_api import expect

    page_, base, _ = page
    request = _big_call(3, "RM_zero")
    for span in request.resource_spans[0].scope_spans[0].spans:
        span.start_time_unix_nano = span.end_time_unix_nano = 0
    trace_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base + "/v1/traces",
            data=request.SerializeToString(),
            headers={
                "Authorization": f"Bearer {dataset.key}",
                "Content-Type": "application/x-protobuf",
            },
        ) as response,
    ):
        assert response.status == 200
    await eventually(
        lambda: (
            query(
                dataset.db, "SELECT count(*) FROM traces WHERE hex(trace_id) = ?", trace_id.upper()
            )[0][0]
            == 1
        )
    )
    page_ = await _signed_in(page, dataset, f"#/traces/{trace_id}")
    await expect(page_.locator("#waterfall .wf-row")).to_have_count(3)
    await expect(page_.locator("#status")).to_have_text("")
