"""The yardstick: a bare aiohttp OTLP sink that parses each request and reads every
span's ids, name, times and attributes once, then answers an empty response.

No Python pipeline that looks inside spans can beat it; calltrace's figures are quoted
as ratios to it, measured side by side in one run.

    python -m bench.baseline --port 4400 [--no-uvloop]

Both encodings are served on ``/v1/traces``: ``application/x-protobuf`` and
``application/json`` (OTLP/JSON, read with ``json.loads``), gzip bodies too.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web

from collector.spans import ExportTraceServiceRequest

EMPTY_RESPONSE = b""  # an empty ExportTraceServiceResponse serializes to no bytes


def read_every_field(request: ExportTraceServiceRequest) -> int:
    spans = 0
    for rs in request.resource_spans:
        for kv in rs.resource.attributes:
            _ = kv.key, kv.value.WhichOneof("value")
        for ss in rs.scope_spans:
            for span in ss.spans:
                _ = (
                    span.trace_id,
                    span.span_id,
                    span.parent_span_id,
                    span.name,
                    span.start_time_unix_nano,
                    span.end_time_unix_nano,
                )
                for kv in span.attributes:
                    value = kv.value
                    kind = value.WhichOneof("value")
                    _ = kv.key, getattr(value, kind) if kind else None
                spans += 1
    return spans


def read_every_json_field(document: dict) -> int:
    spans = 0
    for rs in document.get("resourceSpans", ()):
        for kv in rs.get("resource", {}).get("attributes", ()):
            _ = kv["key"], kv.get("value")
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                _ = (
                    bytes.fromhex(span["traceId"]),
                    bytes.fromhex(span["spanId"]),
                    span.get("parentSpanId"),
                    span["name"],
                    int(span["startTimeUnixNano"]),
                    int(span["endTimeUnixNano"]),
                )
                for kv in span.get("attributes", ()):
                    _ = kv["key"], next(iter(kv["value"].values()), None)
                spans += 1
    return spans


def make_app() -> web.Application:
    counter = {"spans": 0}

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if request.content_type == "application/json":
            counter["spans"] += read_every_json_field(json.loads(body))
            return web.Response(body=b"{}", content_type="application/json")
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        counter["spans"] += read_every_field(message)
        return web.Response(body=EMPTY_RESPONSE, content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response(counter)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    app.router.add_get("/healthz", lambda r: web.json_response({"status": "ok"}))
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=4400)
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio event loop")
    args = parser.parse_args()
    loop = None
    if not args.no_uvloop:
        try:  # calltrace runs on uvloop when it is installed; so does its yardstick
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            pass
    web.run_app(
        make_app(), host="127.0.0.1", port=args.port, print=None, access_log=None, loop=loop
    )


if __name__ == "__main__":
    main()
