"""An example calltrace plugin: the ``tag_region`` processor and the ``jsonl`` exporter."""
