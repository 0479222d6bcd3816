"""Fixtures for any test: free ports, a running collector, TLS certificates, and tiny
components (an in-memory exporter, header-checking and refusing processors) to build
pipelines without the built-in storage.

Components are named in a config dict by class path, e.g.
``{"exporters": {"memory": {"type": "tests.conftest:MemoryExporter"}}}``.
"""

from __future__ import annotations

import asyncio
import os

# Every serialization that reuses received bytes is compared with the messages (in this
# process and in the collectors the tests start, which inherit the environment).
os.environ.setdefault("CALLTRACE_CHECK_BATCHES", "1")

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from pydantic import Field

from collector.components import (
    ComponentConfig,
    Exporter,
    Processor,
    RefusedError,
    RequestInfo,
    UnauthenticatedError,
)
from collector.exporterhelper import ExporterConfig, QueueSettings
from collector.spans import ExportTraceServiceRequest, SpanBatch
from tests.support import FIXTURES, ROOT, SHARED, free_port

__all__ = [
    "FIXTURES",
    "ROOT",
    "SHARED",
    "HeaderAuthProcessor",
    "MemoryExporter",
    "RefusingProcessor",
    "TLSFiles",
    "memory_pipeline",
]

# -- components ---------------------------------------------------------------------


class MemoryExporterConfig(ExporterConfig):
    # No sending queue by default: ``export`` runs inside ``consume``, so a test sees the
    # data as soon as the receiver has answered.
    sending_queue: QueueSettings = Field(default_factory=lambda: QueueSettings(enabled=False))


class MemoryExporter(Exporter):
    """Keeps every exported batch in ``batches``."""

    Config = MemoryExporterConfig

    def __init__(self, component_id: str, config: MemoryExporterConfig):
        super().__init__(component_id, config)
        self.batches: list[SpanBatch] = []

    async def export(self, batch: SpanBatch) -> None:
        self.batches.append(batch)

    @property
    def span_count(self) -> int:
        return sum(batch.span_count for batch in self.batches)

    def request(self) -> ExportTraceServiceRequest:
        """Everything exported, as one request."""
        return ExportTraceServiceRequest(
            resource_spans=[rs for batch in self.batches for rs in batch.resource_spans]
        )


class HeaderAuthConfig(ComponentConfig):
    header: str = "authorization"
    value: str = "Bearer test-key"
    project: str = "test-project"


class HeaderAuthProcessor(Processor):
    """Admits a request only when ``header`` equals ``value``; sets the project."""

    Config = HeaderAuthConfig
    config: HeaderAuthConfig

    async def admit(self, request: RequestInfo) -> None:
        if request.headers.get(self.config.header) != self.config.value:
            raise UnauthenticatedError(f"missing or wrong {self.config.header}")
        request.project = self.config.project


class RefusingConfig(ComponentConfig):
    stage: str = Field(default="process", pattern="^(admit|process)$")
    retry_after: float = 1.0
    throttled: bool = False
    error: str = Field(default="refused", pattern="^(refused|crash)$")
    """``crash`` raises an unexpected exception instead of ``RefusedError``."""


class RefusingProcessor(Processor):
    """Refuses every request at ``stage`` (or crashes, with ``error: crash``)."""

    Config = RefusingConfig
    config: RefusingConfig

    def _fail(self) -> None:
        if self.config.error == "crash":
            raise ZeroDivisionError("a bug in a processor")
        raise RefusedError(
            "test pipeline is full", self.config.retry_after, throttled=self.config.throttled
        )

    async def admit(self, request: RequestInfo) -> None:
        if self.config.stage == "admit":
            self._fail()

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        self._fail()
        return batch


class SlowConfig(ComponentConfig):
    delay: float = 0.5


class SlowProcessor(Processor):
    """Holds every batch for ``delay`` seconds (in-flight requests for shutdown tests)."""

    Config = SlowConfig
    config: SlowConfig

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        await asyncio.sleep(self.config.delay)
        return batch


def memory_pipeline(
    receivers: dict[str, Any], processors: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A config: ``receivers`` -> ``processors`` (in order) -> one ``memory`` exporter."""
    processors = processors or {}
    return {
        "receivers": receivers,
        "processors": processors,
        "exporters": {"memory": {"type": "tests.conftest:MemoryExporter"}},
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": list(receivers),
                    "processors": list(processors),
                    "exporters": ["memory"],
                }
            }
        },
    }


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """A function returning a free TCP port on 127.0.0.1."""
    return free_port


@pytest.fixture
async def make_service() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Any]]]:
    """``await make_service(config_dict)``: a started ``Service``, shut down after the test."""
    from collector.config import parse_config
    from collector.service import Service

    services: list[Service] = []

    async def make(config: dict[str, Any]) -> Service:
        service = Service(parse_config(config, environ=dict(os.environ)))
        services.append(service)
        await service.start()
        return service

    yield make
    for service in reversed(services):
        await service.shutdown()


@dataclass
class TLSFiles:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path

    def server_tls(self, mtls: bool = False) -> dict[str, str]:
        """The ``tls:`` block of a listener."""
        tls = {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}
        if mtls:
            tls["client_ca_file"] = str(self.ca_file)
        return tls


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@calltrace.test")
    directory = tmp_path / "tls"
    directory.mkdir()
    files = TLSFiles(
        ca=ca,
        ca_file=directory / "ca.pem",
        cert_file=directory / "cert.pem",
        key_file=directory / "key.pem",
        client_cert_file=directory / "client-cert.pem",
        client_key_file=directory / "client-key.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca_file))
    server.cert_chain_pems[0].write_to_path(str(files.cert_file))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(files.cert_file), append=True)
    server.private_key_pem.write_to_path(str(files.key_file))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert_file))
    client.private_key_pem.write_to_path(str(files.client_key_file))
    return files


@pytest.fixture
def no_ca_bundle_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, which would replace an exporter's own
    ``certificate_file`` (the rule of ``requests``)."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture
async def pg_schema() -> AsyncIterator[tuple[str, Any]]:
    """A schema of its own on the test PostgreSQL server, dropped afterwards, with a
    connection: ``(schema, conn)``. Fails under ``CI=true`` when the server is
    unreachable, skips elsewhere."""
    import uuid

    import asyncpg

    from tests.support import POSTGRES_DSN, missing_service

    try:
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        missing_service(f"PostgreSQL at {POSTGRES_DSN} is unreachable: {exc}")
    schema = f"ct_test_{uuid.uuid4().hex[:12]}"
    try:
        yield schema, conn
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    """A throwaway ``redis-server`` on a free port (``tests.redis_support.RedisServer``)."""
    from tests.redis_support import throwaway_redis

    directory = tmp_path / "redis"
    directory.mkdir()
    with throwaway_redis(directory) as server:
        yield server


class SpanRenamingProcessor(Processor):
    """A plugin that edits spans in place (it keeps ``edits_spans`` True, the default)."""

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        for rs in batch.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    span.name = f"renamed {span.name}"
        return batch
