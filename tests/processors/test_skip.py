import pytest

from processors.skip import SkipConfig, SkipProcessor
from tests.processors._util import FakeTelemetryHost, batch, resource_spans


@pytest.fixture
async def skip():
    host = FakeTelemetryHost()
    processor = SkipProcessor("skip", SkipConfig())
    await processor.start(host)
    processor.host = host
    yield processor
    await processor.shutdown()


@pytest.mark.parametrize("flag", [True, "true", "TRUE", " True "])
async def test_drops_resources_marked_skip(skip, flag):
    marked = resource_spans({"roark.skip": flag, "livekit.room.id": "RM_a"}, [{}, {}, {}])
    kept = resource_spans({"roark.skip": False, "livekit.room.id": "RM_b"}, [{}])
    out = await skip.process(batch(marked, kept))
    assert out is not None and out.resource_spans == [kept]
    assert (
        skip.host.telemetry.value("calltrace_processor_dropped_spans_total", processor="skip") == 3
    )


@pytest.mark.parametrize("flag", [False, "false", "yes", 1, ""])
async def test_keeps_resources_not_marked(skip, flag):
    rs = resource_spans({"roark.skip": flag}, [{}])
    out = await skip.process(batch(rs))
    assert out is not None and len(out.resource_spans) == 1


async def test_whole_batch_skipped_returns_none(skip):
    assert await skip.process(batch(resource_spans({"roark.skip": True}, [{}]))) is None


async def test_attribute_names_configurable():
    processor = SkipProcessor("skip", SkipConfig(attributes=["my.skip"]))
    out = await processor.process(
        batch(resource_spans({"my.skip": True}, [{}]), resource_spans({"roark.skip": True}, [{}]))
    )
    assert out is not None and len(out.resource_spans) == 1


async def test_span_level_flag_is_not_a_resource_flag(skip):
    rs = resource_spans({}, [{"attributes": {"roark.skip": True}}])
    assert await skip.process(batch(rs)) is not None
