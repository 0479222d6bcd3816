"""Fuzzing the OTLP/HTTP receiver at the request level, with hypothesis.

A collector runs in-process (its own event loop in a thread); each example is one raw
HTTP/1.1 request over a fresh socket: a method, a path, a content type, a content
encoding, extra headers and a body, the body a valid OTLP request (protobuf or JSON), a
mutation of one, random bytes, or any of these gzip- or deflate-compressed, sent with a
Content-Length or chunked.

Invariants: the answer is never a 5xx other than 503/429 with ``Retry-After`` (and never
the 503 of an internal error), and the next valid request is then answered 200 and its
spans are stored.

``CALLTRACE_FUZZ_EXAMPLES`` sets the number of examples (default 150 in the suite; the
``make fuzz`` profile raises it).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import socket
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from google.rpc import status_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from collector.otlp_json import encode_request
from collector.spans import ExportTraceServiceRequest
from tests.conftest import memory_pipeline
from tests.processors._util import resource_spans
from tests.support import free_port

EXAMPLES = int(os.environ.get("CALLTRACE_FUZZ_EXAMPLES", "150"))
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
KEY = "Bearer test-key"
BODY_LIMIT = 256 * 1024

pytestmark = pytest.mark.timeout(max(120, EXAMPLES))


@dataclass
class Running:
    port: int
    exporter: Any


@pytest.fixture(scope="module")
def collector() -> Iterator[Running]:
    """A collector serving in a thread of its own until the module's tests are done."""
    from collector.config import parse_config
    from collector.service import Service

    port = free_port()
    config = memory_pipeline(
        {
            "otlp": {
                "protocols": {
                    "http": {
                        "endpoint": f"127.0.0.1:{port}",
                        "max_request_body_size": BODY_LIMIT,
                        "read_timeout": "2s",
                    }
                }
            }
        },
        {"auth": {"type": "tests.conftest:HeaderAuthProcessor"}},
    )
    loop = asyncio.new_event_loop()
    service = Service(parse_config(config, environ={}))
    started = threading.Event()
    stop: asyncio.Future[None] = loop.create_future()
    failure: list[BaseException] = []

    async def serve() -> None:
        try:
            await service.start()
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        await stop
        await service.shutdown()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    started.wait(30)
    if failure:
        raise failure[0]
    try:
        yield Running(port, service.exporters["memory"])
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(30)
        loop.close()


# -- requests ----------------------------------------------------------------------


def valid_request(spans: int, name: str = "span") -> ExportTraceServiceRequest:
    """The same bytes for the same arguments (hypothesis replays what it draws)."""
    rs = resource_spans(
        {"service.name": "fuzz", "livekit.room.id": "RM_fuzz"}, [{}] * spans, b"\x01" * 16
    )
    for number, span in enumerate(rs.scope_spans[0].spans, 1):
        span.name = name
        span.span_id = number.to_bytes(8, "big")
    return ExportTraceServiceRequest(resource_spans=[rs])


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, inserted, removed, or cut short."""
    body = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        if not body:
            break
        at = draw(st.integers(0, len(body) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        if action == "flip":
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del body[at : at + draw(st.integers(1, 8))]
        elif action == "truncate":
            del body[at:]
        else:
            body[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x22, 0x7B]))
    return bytes(body)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def json_document(draw: st.DrawFn) -> bytes:
    """An OTLP/JSON request with some of its fields replaced by arbitrary JSON."""
    document = json.loads(encode_request(valid_request(draw(st.integers(0, 3)))))
    span_fields = [
        "traceId",
        "spanId",
        "parentSpanId",
        "name",
        "kind",
        "startTimeUnixNano",
        "endTimeUnixNano",
        "attributes",
        "events",
        "status",
        "links",
    ]
    spans = document["resourceSpans"][0]["scopeSpans"][0].get("spans", [])
    for span in spans:
        for key in draw(st.lists(st.sampled_from(span_fields), max_size=3)):
            span[key] = draw(json_values)
    if draw(st.booleans()):
        document["resourceSpans"][0]["resource"] = draw(json_values)
    return json.dumps(document).encode()


@st.composite
def body_and_type(draw: st.DrawFn) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["protobuf", "protobuf-mutated", "json", "json-mutated", "bytes"]))
    if kind.startswith("protobuf"):
        data = valid_request(draw(st.integers(0, 5))).SerializeToString()
        body = draw(mutated(data)) if kind.endswith("mutated") else data
        content_type = PROTOBUF
    elif kind == "json":
        body, content_type = draw(json_document()), JSON
    elif kind == "json-mutated":
        body, content_type = draw(mutated(draw(json_document()))), JSON
    else:
        body = draw(st.binary(max_size=512))
        content_type = draw(st.sampled_from([PROTOBUF, JSON]))
    content_type = draw(
        st.sampled_from(
            [
                content_type,
                content_type,
                content_type + "; charset=utf-8",
                content_type.upper(),
                "text/plain",
                "",
                "multipart/form-data; boundary=x",
                "application/x-protobuf; proto=opentelemetry.proto",
                "application/json;;;=",
            ]
        )
    )
    return body, content_type


@st.composite
def encoded(draw: st.DrawFn, body: bytes) -> tuple[bytes, str]:
    coding = draw(st.sampled_from(["", "identity", "gzip", "x-gzip", "deflate", "GZIP", "br"]))
    if coding.lower() in ("gzip", "x-gzip"):
        members = draw(st.integers(1, 3))
        body = gzip.compress(body, mtime=0) + gzip.compress(b"", mtime=0) * (members - 1)
    elif coding == "deflate":
        raw = draw(st.booleans())
        compressor = zlib.compressobj(wbits=-15 if raw else 15)
        body = compressor.compress(body) + compressor.flush()
    if coding and draw(st.booleans()):
        body = draw(mutated(body))
    return body, coding


header_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    min_size=1,
    max_size=20,
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@dataclass
class Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool

    def wire(self, port: int) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
            payload = b"".join(
                b"%x\r\n%s\r\n" % (len(self.body[i : i + 100]), self.body[i : i + 100])
                for i in range(0, len(self.body), 100)
            )
            payload += b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(self.body)}")
            payload = self.body
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


@st.composite
def requests(draw: st.DrawFn) -> Request:
    body, content_type = draw(body_and_type())
    body, coding = draw(encoded(body))
    headers: list[tuple[str, str]] = []
    auth = draw(st.sampled_from([KEY, KEY, KEY, "", "Bearer wrong", "Basic eA=="]))
    if auth:
        headers.append(("Authorization", auth))
    if content_type:
        headers.append(("Content-Type", content_type))
    if coding:
        headers.append(("Content-Encoding", coding))
    headers += draw(st.lists(st.tuples(header_names, header_values), max_size=3))
    return Request(
        method=draw(st.sampled_from(["POST"] * 6 + ["GET", "PUT", "HEAD", "OPTIONS", "PATCH"])),
        path=draw(
            st.sampled_from(
                ["/v1/traces"] * 6
                + ["/v1/otel/v1/traces", "/v1/traces/", "/v1/traces?x=1", "/healthz", "/nope"]
            )
        ),
        headers=headers,
        body=body,
        chunked=draw(st.booleans()),
    )


# -- sending -----------------------------------------------------------------------


def send(port: int, raw: bytes, method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def check_answer(status: int, headers: dict[str, str], body: bytes) -> None:
    if status < 500:
        return
    assert status in (429, 503), f"answered {status}: {body[:200]!r}"
    assert "retry-after" in headers, headers
    if headers.get("content-type", "").startswith(PROTOBUF):
        message = status_pb2.Status.FromString(body).message
    else:
        message = json.loads(body).get("message", "")
    assert not message.startswith("internal error"), message


def assert_still_serving(running: Running) -> None:
    before = running.exporter.span_count
    good = Request(
        "POST",
        "/v1/traces",
        [("Authorization", KEY), ("Content-Type", PROTOBUF)],
        valid_request(2, "after-fuzz").SerializeToString(),
        chunked=False,
    )
    status, _, body = send(running.port, good.wire(running.port))
    assert status == 200, body
    assert running.exporter.span_count == before + 2


# Regression cases: inputs that once went wrong (issue 16 item 8) or sit on an edge.
MEMBER_BOMB = Request(
    "POST",
    "/v1/traces",
    [("Authorization", KEY), ("Content-Type", PROTOBUF), ("Content-Encoding", "gzip")],
    gzip.compress(b"", mtime=0) * 10_000,
    chunked=True,
)
TRUNCATED_GZIP = Request(
    "POST",
    "/v1/traces",
    [("Authorization", KEY), ("Content-Type", JSON), ("Content-Encoding", "gzip")],
    gzip.compress(b'{"resourceSpans": []}', mtime=0)[:-6],
    chunked=False,
)
DEEP_JSON = Request(
    "POST",
    "/v1/traces",
    [("Authorization", KEY), ("Content-Type", JSON)],
    b'{"resourceSpans": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    chunked=True,
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize="CALLTRACE_FUZZ_EXAMPLES" not in os.environ,  # the suite: the same cases
)
@given(request=requests())
@example(request=MEMBER_BOMB)
@example(request=TRUNCATED_GZIP)
@example(request=DEEP_JSON)
def test_any_request_is_answered_without_a_server_error(
    collector: Running, request: Request
) -> None:
    status, headers, body = send(collector.port, request.wire(collector.port), request.method)
    check_answer(status, headers, body)
    assert_still_serving(collector)
