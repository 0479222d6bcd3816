"""OTLP/HTTP wire behaviour: status codes, encodings, limits, TLS, per the OTLP spec.

Every refusal is followed by a good request on the same server, which must be served.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl

import aiohttp
import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)

from collector.config import ConfigError, parse_config
from collector.otlp_json import encode_request
from collector.spans import ExportTraceServiceRequest
from tests.conftest import memory_pipeline
from tests.processors._util import resource_spans

PROTOBUF = "application/x-protobuf"
KEY = {"Authorization": "Bearer test-key"}


def request_with(spans: int = 2, **span_fields) -> ExportTraceServiceRequest:
    rs = resource_spans({"service.name": "agent", "livekit.room.id": "RM_1"}, [{}] * spans)
    for field, value in span_fields.items():
        setattr(rs.scope_spans[0].spans[0], field, value)
    return ExportTraceServiceRequest(resource_spans=[rs])


def http_receiver(port: int, **settings) -> dict:
    return {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}", **settings}}}}


@pytest.fixture
async def collector(make_service, free_port):
    """A collector with header auth and a memory exporter; yields (url, exporter)."""
    port = free_port()
    config = memory_pipeline(
        http_receiver(port, max_request_body_size="64KiB"),
        {"auth": {"type": "tests.conftest:HeaderAuthProcessor"}},
    )
    service = await make_service(config)
    yield f"http://127.0.0.1:{port}/v1/traces", service.exporters["memory"]


async def post(url: str, body: bytes, content_type: str = PROTOBUF, **headers: str):
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=body, headers={"Content-Type": content_type, **KEY, **headers}
        ) as response,
    ):
        return response.status, response.headers, await response.read()


async def assert_still_serving(url: str, exporter, before: int) -> None:
    status, _, body = await post(url, request_with(3).SerializeToString())
    assert status == 200
    assert ExportTraceServiceResponse.FromString(body) == ExportTraceServiceResponse()
    assert exporter.span_count == before + 3


async def test_protobuf_export_answers_empty_response(collector):
    url, exporter = collector
    status, headers, body = await post(url, request_with(2).SerializeToString())
    assert status == 200
    assert headers["Content-Type"] == PROTOBUF
    assert not ExportTraceServiceResponse.FromString(body).HasField("partial_success")
    assert exporter.span_count == 2
    assert exporter.batches[0].project == "test-project"


async def test_alternate_path_and_json_answer_in_json(collector):
    url, exporter = collector
    alternate = url.replace("/v1/traces", "/v1/otel/v1/traces")
    status, headers, body = await post(
        alternate, encode_request(request_with(2)), "application/json"
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {}
    assert exporter.span_count == 2


async def test_json_int64_as_numbers_and_unknown_fields(collector):
    url, exporter = collector
    document = json.loads(encode_request(request_with(1)))
    span = document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    span["startTimeUnixNano"] = 1700000000000000000  # a number, not a string
    span["endTimeUnixNano"] = "1700000000500000000"
    span["someFutureField"] = {"x": 1}
    span["kind"] = 2
    status, _, body = await post(url, json.dumps(document).encode(), "application/json")
    assert status == 200, body
    stored = exporter.request().resource_spans[0].scope_spans[0].spans[0]
    assert stored.start_time_unix_nano == 1700000000000000000
    assert stored.end_time_unix_nano == 1700000000500000000
    assert stored.kind == 2


async def test_gzip_body_is_inflated(collector):
    url, exporter = collector
    body = gzip.compress(request_with(4).SerializeToString())
    status, _, _ = await post(url, body, **{"Content-Encoding": "gzip"})
    assert status == 200
    assert exporter.span_count == 4


@pytest.mark.parametrize(
    "body,content_type,expected",
    [
        (b"\xff\xff\xff\xff not protobuf", PROTOBUF, 400),
        (b'{"resourceSpans": [', "application/json", 400),
        (b'{"resourceSpans": [{"scopeSpans": "nope"}]}', "application/json", 400),
        (b"hello", "text/plain", 415),
    ],
)
async def test_malformed_or_unsupported_body_is_refused(collector, body, content_type, expected):
    url, exporter = collector
    status, _headers, answer = await post(url, body, content_type)
    assert status == expected
    if content_type == PROTOBUF:
        assert status_pb2.Status.FromString(answer).message  # a google.rpc.Status body
    assert exporter.span_count == 0
    await assert_still_serving(url, exporter, 0)


async def test_oversized_body_is_413(collector):
    url, exporter = collector
    status, _, _ = await post(url, request_with(1).SerializeToString() + b"\x00" * 70_000)
    assert status == 413
    await assert_still_serving(url, exporter, 0)


async def test_gzip_bomb_is_413(collector):
    url, exporter = collector
    bomb = gzip.compress(b"\x00" * (50 * 1024 * 1024))  # 50 MiB of zeros in ~50 KiB
    assert len(bomb) < 64 * 1024
    status, _, _ = await post(url, bomb, **{"Content-Encoding": "gzip"})
    assert status == 413
    status, _, _ = await post(url, b"\x1f\x8b not gzip", **{"Content-Encoding": "gzip"})
    assert status == 400
    await assert_still_serving(url, exporter, 0)


async def test_missing_key_is_401_before_the_body_is_read(collector):
    url, exporter = collector
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=b"garbage", headers={"Content-Type": PROTOBUF}) as response,
    ):
        assert response.status == 401  # not 400: the body was never decoded
        assert response.headers["WWW-Authenticate"] == "Bearer"
    await assert_still_serving(url, exporter, 0)


async def test_invalid_trace_id_is_rejected_in_partial_success(collector):
    url, exporter = collector
    request = request_with(3, trace_id=b"\x01" * 15)
    status, _, body = await post(url, request.SerializeToString())
    assert status == 200
    response = ExportTraceServiceResponse.FromString(body)
    assert response.partial_success.rejected_spans == 1
    assert "trace_id must be 16 bytes" in response.partial_success.error_message
    assert exporter.span_count == 2


async def test_invalid_hex_id_in_json_is_rejected_in_partial_success(collector):
    url, exporter = collector
    document = json.loads(encode_request(request_with(2)))
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] = "zz"
    status, _, body = await post(url, json.dumps(document).encode(), "application/json")
    assert status == 200
    answer = json.loads(body)
    assert answer["partialSuccess"]["rejectedSpans"] == "1"
    assert exporter.span_count == 1


@pytest.mark.parametrize("throttled,expected", [(False, 503), (True, 429)])
async def test_refusal_carries_retry_after(make_service, free_port, throttled, expected):
    port = free_port()
    config = memory_pipeline(
        http_receiver(port),
        {
            "refuse": {
                "type": "tests.conftest:RefusingProcessor",
                "throttled": throttled,
                "retry_after": 7,
            }
        },
    )
    await make_service(config)
    status, headers, _body = await post(
        f"http://127.0.0.1:{port}/v1/traces", request_with(1).SerializeToString()
    )
    assert status == expected
    assert headers["Retry-After"] == "7"


async def test_crashing_processor_with_on_error_refuse_answers_retryable_503(
    make_service, free_port
):
    port = free_port()
    config = memory_pipeline(
        http_receiver(port),
        {
            "crash": {
                "type": "tests.conftest:RefusingProcessor",
                "error": "crash",
                "on_error": "refuse",
            }
        },
    )
    await make_service(config)
    status, headers, _ = await post(
        f"http://127.0.0.1:{port}/v1/traces", request_with(1).SerializeToString()
    )
    assert status == 503 and "Retry-After" in headers


async def test_health_and_metrics_on_the_same_port(collector):
    url, _exporter = collector
    base = url.removesuffix("/v1/traces")
    await post(url, request_with(2).SerializeToString())
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 200
        async with session.get(f"{base}/readyz") as response:
            assert response.status == 200
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
    assert 'calltrace_receiver_accepted_spans_total{receiver="otlp",transport="http"} 2.0' in text


def test_non_loopback_without_tls_is_refused_at_config_load():
    config = memory_pipeline(http_receiver(4318) | {})
    config["receivers"]["otlp"]["protocols"]["http"]["endpoint"] = "0.0.0.0:4318"
    with pytest.raises(ConfigError) as info:
        parse_config(config, environ={})
    assert any(
        e.startswith("receivers.otlp.protocols.http.endpoint:") and "tls" in e
        for e in info.value.errors
    ), info.value.errors
    config["receivers"]["otlp"]["protocols"]["http"]["insecure"] = True
    parse_config(config, environ={})


async def test_mutual_tls_requires_a_client_certificate(make_service, free_port, tls_files):
    port = free_port()
    config = memory_pipeline(http_receiver(port, tls=tls_files.server_tls(mtls=True)))
    await make_service(config)
    url = f"https://127.0.0.1:{port}/v1/traces"
    body = request_with(1).SerializeToString()

    without = ssl.create_default_context(cafile=str(tls_files.ca_file))
    with pytest.raises(aiohttp.ClientError):
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, headers={"Content-Type": PROTOBUF}, ssl=without) as r,
        ):
            await r.read()

    with_cert = ssl.create_default_context(cafile=str(tls_files.ca_file))
    with_cert.load_cert_chain(str(tls_files.client_cert_file), str(tls_files.client_key_file))
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": PROTOBUF}, ssl=with_cert) as r,
    ):
        assert r.status == 200


async def test_shutdown_waits_for_in_flight_requests(make_service, free_port):
    port = free_port()
    config = memory_pipeline(
        http_receiver(port), {"slow": {"type": "tests.conftest:SlowProcessor", "delay": 0.3}}
    )
    service = await make_service(config)
    url = f"http://127.0.0.1:{port}/v1/traces"
    sending = asyncio.create_task(post(url, request_with(2).SerializeToString()))
    await asyncio.sleep(0.1)
    await service.shutdown()
    status, _, _ = await sending
    assert status == 200
    assert service.exporters["memory"].span_count == 2


async def test_failed_start_releases_what_started(free_port, tmp_path):
    """A port in use stops start-up with a clear error, and the exporters that did start
    are shut down (the SQLite writer thread and file are released)."""
    import socket

    from collector.service import Service

    port = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        config = memory_pipeline(http_receiver(port))
        config["exporters"]["sqlite"] = {"path": str(tmp_path / "db.sqlite")}
        config["service"]["pipelines"]["traces"]["exporters"].append("sqlite")
        service = Service(parse_config(config, environ={}))
        with pytest.raises(RuntimeError, match="address already in use"):
            await service.start()
        assert service.exporters["sqlite"]._pool is None
        assert not service.ready
    finally:
        blocker.close()


# -- the body budget: how many bytes of requests are decoded at once --------------------


async def test_the_body_budget_lets_requests_in_by_size_in_arrival_order():
    from collector.receivers.otlp_http import BodyBudget

    budget = BodyBudget(100)
    order: list[str] = []
    release = {name: asyncio.Event() for name in "abcde"}

    async def request(name: str, size: int) -> None:
        async with budget.hold(size):
            order.append(name)
            await release[name].wait()

    tasks = [asyncio.create_task(request("a", 60))]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(request("b", 50)))  # 110 > 100: waits for a
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(request("c", 10)))  # would fit, but b is first
    await asyncio.sleep(0)
    assert order == ["a"] and budget.used == 60
    release["a"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "c"] and budget.used == 60
    tasks.append(asyncio.create_task(request("d", 500)))  # larger than the budget: alone
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "c"]
    release["b"].set()
    release["c"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "c", "d"] and budget.used == 100
    release["d"].set()
    await asyncio.gather(*tasks)
    assert budget.used == 0


async def test_a_waiter_that_gives_up_takes_no_share_and_blocks_no_one():
    from collector.receivers.otlp_http import BodyBudget

    budget = BodyBudget(100)
    held = asyncio.Event()
    entered: list[str] = []

    async def request(name: str, size: int, hold: asyncio.Event | None = None) -> None:
        async with budget.hold(size):
            entered.append(name)
            if hold is not None:
                await hold.wait()

    first = asyncio.create_task(request("first", 100, held))
    await asyncio.sleep(0)
    gone = asyncio.create_task(request("gone", 100))  # its client hangs up while waiting
    await asyncio.sleep(0)
    after = asyncio.create_task(request("after", 40))
    await asyncio.sleep(0)
    gone.cancel()
    held.set()
    await asyncio.gather(first, after, return_exceptions=True)
    assert entered == ["first", "after"]
    assert gone.cancelled() and budget.used == 0
    # Granted a turn, then cancelled before it ran: the share comes back.
    blocker = asyncio.Event()
    holder = asyncio.create_task(request("holder", 100, blocker))
    await asyncio.sleep(0)
    late = asyncio.create_task(request("late", 100))
    await asyncio.sleep(0)
    blocker.set()
    await asyncio.sleep(0)  # holder leaves and grants late its turn...
    assert holder.done() and budget.used == 100 and "late" not in entered
    late.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(holder, late, return_exceptions=True)
    assert budget.used == 0
    async with budget.hold(100):
        assert budget.used == 100


async def test_a_share_resized_to_its_decoded_size_lets_the_next_one_in():
    """A JSON body counts as its length until decoded, then as its (smaller) protobuf."""
    from collector.receivers.otlp_http import BodyBudget

    budget = BodyBudget(100)
    entered = asyncio.Event()
    done = asyncio.Event()

    async def waiter() -> None:
        async with budget.hold(60):
            entered.set()
            await done.wait()

    async with budget.hold(90) as share:
        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        assert not entered.is_set()
        share.resize(30)  # decoded: 30 + 60 fit
        await asyncio.sleep(0.01)
        assert entered.is_set() and budget.used == 90
        share.resize(500)  # a gzip body grows past the budget: held, counted as all of it
        assert budget.used == 160
    done.set()
    await task
    assert budget.used == 0
