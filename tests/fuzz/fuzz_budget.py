"""How long the fuzz targets here run: a few hundred examples each in the normal suite,
``CALLTRACE_FUZZ_EXAMPLES`` each under ``make fuzz`` (the C extension built with
AddressSanitizer and UBSan)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["fuzz_settings"]


def fuzz_settings(examples: int = 300) -> settings:
    """Hypothesis settings for a fuzz target: ``examples`` in the suite, or as many as
    ``CALLTRACE_FUZZ_EXAMPLES`` says; no deadline (sanitizers slow everything down)."""
    wanted = os.environ.get("CALLTRACE_FUZZ_EXAMPLES")
    return settings(
        max_examples=int(wanted) if wanted else examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None if wanted else settings.default.database,
    )
