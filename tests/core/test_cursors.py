"""Sealed cursors (collector/cursors.py): only what the API sealed opens."""

from __future__ import annotations

import pytest

from collector.cursors import MAX_CURSOR_CHARS, CursorSeal
from collector.query import QueryError, encode_cursor


def test_a_sealed_cursor_opens_for_its_endpoint_only() -> None:
    seal = CursorSeal(b"k" * 32)
    cursor = encode_cursor([1795512600000000000, "call_abc"])
    token = seal.seal("/api/v1/calls", cursor)
    assert seal.open("/api/v1/calls", token) == cursor
    assert CursorSeal(b"k" * 32).open("/api/v1/calls", token) == cursor  # same key, any instance
    with pytest.raises(QueryError, match=r"^cursor: "):
        seal.open("/api/v1/traces", token)
    with pytest.raises(QueryError, match=r"^cursor: "):
        CursorSeal(b"j" * 32).open("/api/v1/calls", token)


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "abc",
        "abc.",
        ".AAAAAAAAAAAAAAAAAAAAAA",
        "x" * (MAX_CURSOR_CHARS + 1),
        "é.AAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_anything_else_is_refused(token: str) -> None:
    with pytest.raises(QueryError, match=r"^cursor: not a cursor this API returned"):
        CursorSeal(b"k" * 32).open("/api/v1/calls", token)


def test_every_changed_character_is_refused() -> None:
    seal = CursorSeal(b"k" * 32)
    token = seal.seal("/api/v1/calls", encode_cursor([1, "c"]))
    for at in range(len(token)):
        changed = token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1 :]
        with pytest.raises(QueryError):
            seal.open("/api/v1/calls", changed)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError):
        CursorSeal(b"short")
