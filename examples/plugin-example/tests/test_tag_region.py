from collector.testing import assert_attribute, make_batch, run_processor

from calltrace_plugin_example.tag_region import TagRegionProcessor

BATCH = make_batch(
    [
        {"resource": {"service.name": "agent"}, "spans": [{"name": "llm"}]},
        {"resource": {"cloud.region": "us-east-1"}, "spans": [{"name": "tts"}]},
    ]
)


def test_sets_the_region_where_the_agent_did_not():
    out = run_processor(TagRegionProcessor, {"region": "eu-west-1"}, BATCH)
    first, second = out.resource_spans
    assert_attribute(first, "cloud.region", "eu-west-1")
    assert_attribute(second, "cloud.region", "us-east-1")


def test_overwrite_and_attribute_name():
    config = {"region": "eu", "attribute": "deployment.region", "overwrite": True}
    out = run_processor(TagRegionProcessor, config, BATCH)
    for rs in out.resource_spans:
        assert_attribute(rs, "deployment.region", "eu")
