"""``tag_region``: stamp every resource with the region the collector runs in."""

from __future__ import annotations

from collector import ComponentConfig, Processor, SpanBatch, get_attribute, set_attribute
from pydantic import Field


class TagRegionConfig(ComponentConfig):
    region: str = Field(min_length=1)
    """The value to set, e.g. ``eu-west-1``."""
    attribute: str = "cloud.region"
    """The resource attribute to set."""
    overwrite: bool = False
    """Replace a value the agent set itself."""


class TagRegionProcessor(Processor):
    type_name = "tag_region"
    Config = TagRegionConfig
    config: TagRegionConfig

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        for rs in batch.resource_spans:
            attributes = rs.resource.attributes
            if self.config.overwrite or get_attribute(attributes, self.config.attribute) is None:
                set_attribute(attributes, self.config.attribute, self.config.region)
        return batch
