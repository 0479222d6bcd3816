"""``correlate``: link every span to the voice call it belongs to (see ``processor``).

- ``processor``: the component, ``CorrelateProcessor``, and its config;
- ``call_keys``: finding a call's key on a resource or its spans, and stamping the call;
- ``call_records``: the call records kept in the call store, created and flushed in the
  background.
"""

from processors.correlate.processor import CorrelateConfig, CorrelateProcessor

__all__ = ["CorrelateConfig", "CorrelateProcessor"]
