"""Fuzz target: gzip and deflate request bodies, inflated by the OTLP/HTTP receiver
(``collector.receivers.otlp_http._inflate``, ``_inflate_deflate``).

Whatever the bytes, inflating gives at most ``limit`` bytes, or refuses the body as too
large (413), as too many gzip members, or as not compressed data (400: ``zlib.error``),
never another exception;
where the body is gzip (of one member or several), zlib or raw deflate data of
something within the limit, it gives that something."""

from __future__ import annotations

import gzip
import zlib

from hypothesis import example, given
from hypothesis import strategies as st

from collector.receivers import otlp_http
from tests.fuzz.fuzz_budget import fuzz_settings

LIMIT = 4096


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def inflated_or_refused(decode, body: bytes) -> bytes | None:
    """What ``decode`` makes of ``body``: its bytes, or None where it refused it."""
    try:
        out = decode(body, LIMIT)
    except (otlp_http._TooLarge, otlp_http._TooManyMembers, zlib.error):
        return None
    assert isinstance(out, bytes) and len(out) <= LIMIT
    return out


_payloads = st.lists(
    st.one_of(st.binary(max_size=300), st.binary(max_size=2).map(lambda b: b * 1500)),
    min_size=1,
    max_size=3,
)


@fuzz_settings(300)
@given(_payloads)
def test_compressed_bodies_inflate_to_what_was_compressed(parts):
    whole = b"".join(parts)
    fits = len(whole) <= LIMIT
    members = b"".join(gzip.compress(part) for part in parts)
    for decode, body in (
        (otlp_http._inflate, members),
        (otlp_http._inflate_deflate, zlib.compress(whole)),
        (otlp_http._inflate_deflate, _raw_deflate(whole)),
    ):
        assert inflated_or_refused(decode, body) == (whole if fits else None)


@st.composite
def _damaged(draw) -> bytes:
    body = bytearray(
        draw(
            st.sampled_from([gzip.compress, zlib.compress, _raw_deflate]).flatmap(
                lambda compress: _payloads.map(lambda ps: b"".join(compress(p) for p in ps))
            )
        )
    )
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(body)))
        if draw(st.booleans()) and position < len(body):
            body[position] = draw(st.integers(0, 255))
        else:
            del body[position:]
    return bytes(body)


@fuzz_settings(300)
@given(st.one_of(st.binary(max_size=200), _damaged()))
@example(b"\x1f\x8b")  # a gzip header cut short
@example(gzip.compress(b"") * 100)  # many empty members
@example(gzip.compress(b"") * (otlp_http.MAX_GZIP_MEMBERS + 1))  # too many: refused
@example(gzip.compress(b"x") + b"\x00")  # a member and garbage after it
def test_any_body_is_inflated_within_the_limit_or_refused(body):
    for decode in (otlp_http._inflate, otlp_http._inflate_deflate):
        inflated_or_refused(decode, body)
