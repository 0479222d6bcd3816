"""Shared test helpers: free ports, fixture files, an in-process collector, polling, an
OpenTelemetry SDK set up to export to calltrace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
POSTGRES_DSN = os.environ.get(
    "CALLTRACE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


def missing_service(reason: str) -> NoReturn:
    """A test needs a server or tool that is not here: in CI (``CI=true``), where it must
    be, the test fails; on a developer's machine it is skipped with the reason."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fixture_requests(framework: str) -> list[Path]:
    """The captured ``NNN.pb`` request bodies of one framework, in arrival order."""
    paths = sorted((FIXTURES / framework).glob("*.pb"))
    if not paths:
        pytest.fail(f"no fixtures under {FIXTURES / framework}")
    return paths


def pipeline_config(port: int, db: Path, **overrides: Any) -> dict[str, Any]:
    """The default pipeline (auth, skip, correlate, batch -> sqlite) on a test port."""
    config: dict[str, Any] = {
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}},
        "processors": {
            "auth": {"key_store": str(db)},
            "skip": {},
            "correlate": {"store": str(db)},
            "batch": {"timeout": "5ms"},
        },
        "exporters": {"sqlite": {"path": str(db)}},
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["auth", "skip", "correlate", "batch"],
                    "exporters": ["sqlite"],
                }
            }
        },
    }
    for key, value in overrides.items():
        config[key] = value
    return config


@contextlib.asynccontextmanager
async def running_service(config: dict[str, Any]) -> AsyncIterator[Any]:
    from collector.config import parse_config
    from collector.service import Service

    service = Service(parse_config(config, environ=dict(os.environ)))
    await service.start()
    try:
        yield service
    finally:
        await service.shutdown()


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll ``check`` until it returns a truthy value; fail with its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")


def query(db: Path, sql: str, *args: Any) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


async def once_stored(db: Path, spans: int, sql: str) -> list[tuple]:
    """The rows of ``sql`` on ``db`` once its spans table holds ``spans`` rows (polled)."""
    return await eventually(
        lambda: query(db, sql) if len(query(db, "SELECT 1 FROM spans")) == spans else None
    )


def postgres_execute(sql: str) -> None:
    """Run ``sql`` on the test PostgreSQL server; skip, or fail when CI=true, if unreachable.

    For module-scoped fixtures, which run outside the tests' event loops: it runs in a
    thread with its own loop.
    """
    import asyncpg

    unreachable: list[BaseException] = []
    failure: list[BaseException] = []

    async def run() -> None:
        try:
            conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            unreachable.append(exc)
            return
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def in_thread() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    if unreachable:
        missing_service(f"PostgreSQL at {POSTGRES_DSN} is unreachable: {unreachable[0]}")
    if failure:
        raise failure[0]


def sdk_provider(
    endpoint: str, key: str, resource: dict[str, Any], ca_file: Path | None = None
) -> Any:
    """A TracerProvider exporting with the OpenTelemetry SDK's OTLP/HTTP exporter to
    ``endpoint`` (``.../v1/traces``) with ``key``, as agents are told to set it up;
    ``ca_file`` for an HTTPS endpoint of a test CA (see ``no_ca_bundle_override``)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create(resource))
    exporter = OTLPSpanExporter(
        endpoint=endpoint,
        headers={"Authorization": f"Bearer {key}"},
        certificate_file=str(ca_file) if ca_file is not None else None,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def emit_session(provider: Any) -> None:
    """Record an ``agent_session`` span with an ``llm_node`` child through ``provider``,
    flush them and shut it down (blocking: run it in a thread from async tests)."""
    tracer = provider.get_tracer("livekit-agents")
    with tracer.start_as_current_span("agent_session"), tracer.start_as_current_span("llm_node"):
        pass
    assert provider.force_flush(10_000)
    provider.shutdown()
