"""``redis_streams`` against a throwaway redis-server: entry format, trimming, errors, TLS."""

from __future__ import annotations

import json

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from collector import PermanentError, RetryableError
from collector.config import ConfigError, parse_config
from collector.spans import CALL_ID_ATTRIBUTE, get_attribute
from exporters.redis_streams import RedisStreamsConfig, RedisStreamsExporter
from tests.processors._util import FakeTelemetryHost, batch, resource_spans
from tests.redis_support import throwaway_redis
from tests.support import free_port

pytestmark = pytest.mark.redis


async def started(**config):
    exporter = RedisStreamsExporter("redis_streams", RedisStreamsConfig(**config))
    await exporter.start(FakeTelemetryHost())
    return exporter


def entries(server, stream):
    return [
        {k.decode(): v for k, v in fields.items()} for _id, fields in server.client().xrange(stream)
    ]


async def test_one_entry_per_span_with_documented_fields(redis_server):
    exporter = await started(url=redis_server.url)
    trace_id = bytes(range(16))
    rs = resource_spans(
        {"service.name": "voice-agent", CALL_ID_ATTRIBUTE: "call_abc"},
        [{"name": "llm_node"}, {"name": "tts_node"}],
        trace_id=trace_id,
    )
    rs.scope_spans[0].spans[1].parent_span_id = rs.scope_spans[0].spans[0].span_id
    rs.scope_spans[0].spans[1].status.code = 2
    try:
        await exporter.export(batch(rs, project="acme"))
    finally:
        await exporter.shutdown()
    got = entries(redis_server, "calltrace:spans:acme")
    assert len(got) == 2
    first, second = got
    sent = rs.scope_spans[0].spans
    assert first["trace_id"] == trace_id.hex().encode()
    assert first["span_id"] == sent[0].span_id.hex().encode()
    assert first["parent_span_id"] == b""
    assert second["parent_span_id"] == sent[0].span_id.hex().encode()
    assert (first["name"], second["name"]) == (b"llm_node", b"tts_node")
    assert second["status_code"] == b"2"
    assert first["start_ns"] == b"1" and first["end_ns"] == b"2"
    assert first["project"] == b"acme"
    assert first["service"] == b"voice-agent"
    assert first["call_id"] == b"call_abc"
    assert first["encoding"] == b"protobuf"
    assert Span.FromString(second["span"]) == sent[1]
    resource = Resource.FromString(first["resource"])
    assert get_attribute(resource.attributes, "service.name") == "voice-agent"


async def test_json_encoding_and_stream_template(redis_server):
    exporter = await started(
        url=redis_server.url, encoding="json", stream="traces.{project}", include_resource=False
    )
    try:
        await exporter.export(batch(resource_spans({}, [{"name": "stt"}]), project=None))
    finally:
        await exporter.shutdown()
    (entry,) = entries(redis_server, "traces.default")
    assert entry["encoding"] == b"json"
    assert "resource" not in entry
    span = json.loads(entry["span"])
    assert span["name"] == "stt"
    assert span["traceId"] == entry["trace_id"].decode()  # OTLP/JSON: hex ids


async def test_streams_are_trimmed_approximately(redis_server):
    exporter = await started(url=redis_server.url, maxlen=100)
    try:
        for _ in range(20):
            await exporter.export(batch(resource_spans({}, [{}] * 100)))
    finally:
        await exporter.shutdown()
    length = redis_server.client().xlen("calltrace:spans:p1")
    assert 100 <= length < 2000


@pytest.mark.parametrize("maxlen", [0, 10_000])
async def test_a_large_batch_arrives_whole_and_in_order(redis_server, maxlen):
    """Thousands of XADD replies are counted as they arrive, read a few bytes at a time
    (replies cut anywhere); several resources, each with its own fields."""
    exporter = await started(url=redis_server.url, maxlen=maxlen)
    exporter.REPLY_READ_SIZE = 7
    per_call = 500
    services = [f"agent-{i}" for i in range(3)]
    batches = [
        resource_spans({"service.name": service}, [{"name": f"{service} {j}"} for j in range(per_call // 2 + 107)])
        for service in services
    ]  # fmt: skip
    try:
        await exporter.export(batch(*batches, project="acme"))
    finally:
        await exporter.shutdown()
    got = entries(redis_server, "calltrace:spans:acme")
    sent = [(rs, span) for rs in batches for span in rs.scope_spans[0].spans]
    assert len(got) == len(sent) > 2 * per_call
    for entry, (rs, span) in zip(got, sent, strict=True):
        assert entry["name"] == span.name.encode()
        assert entry["service"] == rs.resource.attributes[0].value.string_value.encode()
        assert entry["span_id"] == span.span_id.hex().encode()
        assert Span.FromString(entry["span"]) == span


async def test_unreachable_redis_is_retryable():
    exporter = await started(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout="200ms")
    try:
        with pytest.raises(RetryableError):
            await exporter.export(batch(resource_spans({}, [{}])))
    finally:
        await exporter.shutdown()


async def test_wrong_key_type_is_permanent(redis_server):
    redis_server.client().set("calltrace:spans:p1", "not a stream")
    exporter = await started(url=redis_server.url)
    try:
        with pytest.raises(PermanentError, match="WRONGTYPE"):
            await exporter.export(batch(resource_spans({}, [{}])))
    finally:
        await exporter.shutdown()


async def test_password(tmp_path):
    with throwaway_redis(tmp_path, "--requirepass", "s3cret") as server:
        exporter = await started(url=server.url, password="s3cret")
        try:
            await exporter.export(batch(resource_spans({}, [{}])))
        finally:
            await exporter.shutdown()
        assert server.client().xlen("calltrace:spans:p1") == 1

        # the password option wins over one in the url; without it the url's is used
        in_url = server.url.replace("redis://", "redis://:s3cret@")
        stale = server.url.replace("redis://", "redis://:old@")
        for url, password in [(stale, "s3cret"), (in_url, None), (in_url, "")]:
            exporter = await started(url=url, password=password)
            try:
                await exporter.export(batch(resource_spans({}, [{}])))
            finally:
                await exporter.shutdown()
        assert server.client().xlen("calltrace:spans:p1") == 4

        wrong = await started(url=server.url, password="wrong")
        try:
            with pytest.raises(RetryableError):
                await wrong.export(batch(resource_spans({}, [{}])))
        finally:
            await wrong.shutdown()


async def test_tls_with_client_certificate(tmp_path):
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("calltrace@test")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "ccert", "ckey")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server_cert.private_key_pem.write_to_path(str(files["key"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["ccert"]))
    client_cert.private_key_pem.write_to_path(str(files["ckey"]))
    tls_port = free_port()
    args = (
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(files["cert"]),
        "--tls-key-file", str(files["key"]),
        "--tls-ca-cert-file", str(files["ca"]),
        "--tls-auth-clients", "yes",
    )  # fmt: skip
    with throwaway_redis(tmp_path, *args) as server:
        exporter = await started(
            url=f"rediss://127.0.0.1:{tls_port}/0",
            tls={"ca_file": files["ca"], "cert_file": files["ccert"], "key_file": files["ckey"]},
        )
        try:
            await exporter.export(batch(resource_spans({}, [{}, {}])))
        finally:
            await exporter.shutdown()
        assert server.client().xlen("calltrace:spans:p1") == 2

        untrusted = await started(url=f"rediss://127.0.0.1:{tls_port}/0")  # system CAs only
        try:
            with pytest.raises(RetryableError):
                await untrusted.export(batch(resource_spans({}, [{}])))
        finally:
            await untrusted.shutdown()


def test_config_errors_name_the_path():
    document = {
        "receivers": {"otlp": {}},
        "exporters": {
            "redis_streams": {
                "url": "http://redis:6379",
                "stream": "spans:{tenant}",
                "maxlen": -1,
                "tls": {"cert_file": __file__},
            }
        },
        "service": {
            "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["redis_streams"]}}
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(document, environ={})
    text = "\n".join(caught.value.errors)
    assert "exporters.redis_streams.url: expected a url like" in text
    assert "exporters.redis_streams.stream: expected only the {project} placeholder" in text
    assert "exporters.redis_streams.maxlen:" in text
    assert "exporters.redis_streams.tls: expected both cert_file and key_file" in text


async def test_lifecycle_start_export_shutdown_twice(redis_server):
    exporter = await started(url=redis_server.url)
    await exporter.export(batch(resource_spans({"service.name": "x"}, [{}])))
    await exporter.shutdown()
    await exporter.shutdown()
    with pytest.raises(RetryableError):  # a stopped exporter refuses, the helper retries
        await exporter.export(batch(resource_spans({}, [{}])))
    assert redis_server.client().xlen("calltrace:spans:p1") == 1


async def test_starts_while_redis_is_down_and_delivers_once_it_is_up(tmp_path):
    from tests.redis_support import RedisServer

    server = RedisServer(tmp_path)
    exporter = await started(url=server.url, connect_timeout="200ms")
    try:
        with pytest.raises(RetryableError):
            await exporter.export(batch(resource_spans({}, [{}])))
        server.start()
        await exporter.export(batch(resource_spans({}, [{}])))
        assert server.client().xlen("calltrace:spans:p1") == 1
    finally:
        await exporter.shutdown()
        server.kill()


@pytest.mark.parametrize("native", [True, False])
def test_replies_are_counted_however_the_bytes_are_cut(native):
    from redis.exceptions import InvalidResponse, ResponseError

    from exporters.redis_streams import _ReplyCounter

    replies = b"$15\r\n1700000000000-0\r\n-WRONGTYPE Operation against a key\r\n$-1\r\n:3\r\n"
    for cut in range(len(replies) + 1):
        counter = _ReplyCounter(4, native)
        counter.feed(replies[:cut])
        counter.feed(replies[cut:])
        assert counter.missing == 0
        assert isinstance(counter.error, ResponseError)
        assert "Operation against a key" in str(counter.error)
    one_byte_at_a_time = _ReplyCounter(4, native)
    for i in range(len(replies)):
        assert one_byte_at_a_time.missing > 0
        one_byte_at_a_time.feed(replies[i : i + 1])
    assert one_byte_at_a_time.missing == 0
    with pytest.raises(InvalidResponse, match="more replies"):
        _ReplyCounter(1, native).feed(b":1\r\n:2\r\n")
    for malformed in (b"*2\r\n", b"$x1\r\nab\r\n", b"$-\r\n", b"$\r\n"):
        with pytest.raises(InvalidResponse, match="unexpected reply"):
            _ReplyCounter(1, native).feed(malformed)


reply_lists = st.lists(
    st.one_of(
        st.binary(max_size=20).map(lambda b: b"$%d\r\n%b\r\n" % (len(b), b)),
        st.just(b"$-1\r\n"),
        st.text(alphabet="ABCZ xyz-", min_size=1, max_size=12).map(
            lambda t: b"-" + t.encode() + b"\r\n"
        ),
        st.integers(-5, 10**6).map(lambda n: b":%d\r\n" % n),
        st.just(b"+OK\r\n"),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(reply_lists, st.data())
def test_replies_are_counted_alike_in_c_and_in_python(replies, data):
    from exporters.redis_streams import _ReplyCounter

    stream = b"".join(replies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    wanted = data.draw(st.integers(1, len(replies)))
    outcomes = []
    for native in (True, False):
        counter = _ReplyCounter(wanted, native)
        try:
            for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
                counter.feed(stream[start:end])
            outcome = (counter.missing, str(counter.error), type(counter.error))
        except Exception as exc:  # both ways must raise the same
            outcome = (type(exc), str(exc))
        outcomes.append(outcome)
    assert outcomes[0] == outcomes[1]


async def test_the_connection_is_reused_after_a_batch(redis_server):
    """Every reply of a batch is read: the pooled connection answers the next command."""
    exporter = await started(url=redis_server.url)
    try:
        await exporter.export(batch(resource_spans({}, [{"name": f"s{i}"} for i in range(50)])))
        await exporter.export(batch(resource_spans({}, [{"name": "again"}])))
        assert await exporter._client.ping()
        assert await exporter._client.xlen("calltrace:spans:p1") == 51
    finally:
        await exporter.shutdown()


async def test_a_resource_seen_again_is_packed_for_its_own_project(redis_server):
    """A resource's fields are packed once and kept for later batches: the same resource
    in another project's batch still gets that project."""
    from collector.spans import SpanBatch, serialize_resource_spans

    exporter = await started(url=redis_server.url)
    rs = resource_spans({"service.name": "agent", CALL_ID_ATTRIBUTE: "call_1"}, [{}, {}])
    payload = serialize_resource_spans([rs])
    try:
        for project in ("acme", "beta", "acme"):
            await exporter.export(SpanBatch.from_bytes(payload, project))
    finally:
        await exporter.shutdown()
    for project, count in (("acme", 4), ("beta", 2)):
        got = entries(redis_server, f"calltrace:spans:{project}")
        assert [e["project"] for e in got] == [project.encode()] * count
        assert {e["call_id"] for e in got} == {b"call_1"}
