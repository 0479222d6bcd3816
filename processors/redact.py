"""``redact``: mask phone numbers, e-mail addresses, payment card numbers and patterns of
your own in attribute values, before any exporter stores them.

It masks nothing until told what to look for (``patterns``, ``custom_patterns`` or
``deny_keys``). Transcripts and LLM prompts travel in span attributes; in the fixtures of
this repository they are, for LiveKit Agents, ``lk.pii.user_input``,
``lk.pii.user_transcript``, ``lk.pii.response.text``, ``lk.pii.input_text``,
``lk.pii.chat_ctx``, ``lk.pii.function_tool.arguments`` / ``.output``,
``gen_ai.input.messages``, ``gen_ai.output.messages``, ``gen_ai.system_instructions``,
``gen_ai.tool.call.arguments`` / ``.result``; for Pipecat ``transcript`` (stt), ``text``
(tts), ``input`` / ``output`` (llm), ``gen_ai.system_instructions``::

    processors:
      redact:
        patterns: [phone, email, payment_card]
        custom_patterns:
          - {name: account, regex: 'ACC-\\d{6}'}
        deny_keys: ["lk.pii.chat_ctx"]          # masked whole (or removed: deny_action)
        allow_keys: ["gen_ai.request.model"]    # never touched
        mask: "[REDACTED:{pattern}]"

What is scanned: every string value of span attributes, resource attributes and span
event attributes (also inside arrays and maps), and span event names (``events``).
Keys are matched as shell-style globs (``lk.pii.*``); in maps, the keys of their
entries count too. A value under a ``deny_keys`` key is replaced whole by the mask
(pattern name ``denied``), or the attribute removed (``deny_action: remove``).

Built-in patterns:

- ``email``: ``local@domain.tld``.
- ``phone``: E.164 (``+14155550132``, ``+44 20 7946 0958``), North American
  (``(415) 555-0132``, ``415-555-0132``, ``415.555.0132``), and national numbers that
  start with a trunk 0, grouped (``020 7946 0958``, ``06 12 34 56 78``) or not
  (``07700900123``). An ungrouped run of digits without ``+`` or a leading 0 is not
  a phone number (timestamps, ids, latencies in JSON stay).
- ``payment_card``: 13 to 19 digits, grouped by spaces or dashes or not, starting with
  2 to 6 (as issuers' numbers do) and passing the Luhn check (an order number that
  fails it stays).

Every match masked, and every denied value, is counted in
``calltrace_processor_redacted_values_total`` (labels ``processor``, ``pattern``;
``denied`` for ``deny_keys``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, MutableSequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from collector import ComponentConfig, Host, Processor, SpanBatch, iter_spans

__all__ = ["BUILTIN_PATTERNS", "CustomPattern", "RedactConfig", "RedactProcessor", "luhn_valid"]

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])"
)
# Digits not glued to a word, a decimal point or more digits on either side.
_BEFORE = r"(?<![\w.+/-])"
_AFTER = r"(?![\w/]|[.,-]\d)"
_PHONE = re.compile(
    _BEFORE
    + r"(?:"
    # E.164, contiguous or grouped: +CC then 6-14 more digits.
    + r"\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){1,5}(?:[ .-]?\d{2,4})"
    # North American: (415) 555-0132, 415-555-0132, 415.555.0132, 415 555 0132.
    + r"|(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}"
    # National with a trunk 0, grouped: 020 7946 0958, 06 12 34 56 78, 0171-1234567.
    + r"|0\d{1,4}(?:[ .-]\d{2,4}){2,4}|0\d{2,4}[ -]\d{6,8}"
    # National with a trunk 0, contiguous: 07700900123.
    + r"|0\d{9,10}"
    + r")"
    + _AFTER
)
_CARD = re.compile(r"(?<![\w.+-])\d(?:[ -]?\d){12,18}(?![\w]|[.,-]\d)")


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn check (payment card numbers do)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def _phone_digits_ok(text: str) -> bool:
    digits = sum(c.isdigit() for c in text)
    return 7 <= digits <= 15


def _card_ok(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    # Issuers' numbers start with 2 to 6 (Mastercard 2-series, Amex/Diners/JCB 3, Visa 4,
    # Mastercard/Maestro 5, Discover/UnionPay 6): an id that starts with 1 is no card.
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


BUILTIN_PATTERNS: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None]] = {
    # Applied in this order: a card number is not also taken for a phone number.
    "email": (_EMAIL, None),
    "payment_card": (_CARD, _card_ok),
    "phone": (_PHONE, _phone_digits_ok),
}
"""Pattern name -> (regular expression, check of each match or None)."""


class CustomPattern(ComponentConfig):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Names the pattern in the mask and the metric."""
    regex: str = Field(min_length=1)
    """A Python regular expression; every match is masked."""

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if compiled.search(""):
            raise ValueError("the expression matches the empty string")
        return value


class RedactConfig(ComponentConfig):
    patterns: list[Literal["phone", "email", "payment_card"]] = Field(default_factory=list)
    """Built-in patterns to mask. None by default."""
    custom_patterns: list[CustomPattern] = Field(default_factory=list)
    """Patterns of your own, applied after the built-in ones."""
    allow_keys: list[str] = Field(default_factory=list)
    """Attribute keys (globs) whose values are never touched."""
    deny_keys: list[str] = Field(default_factory=list)
    """Attribute keys (globs) whose values are masked whole, whatever they hold."""
    deny_action: Literal["mask", "remove"] = "mask"
    """What happens to a denied attribute: its value becomes the mask, or it is removed."""
    mask: str = "[REDACTED:{pattern}]"
    """What replaces each match; ``{pattern}`` is the pattern's name."""
    spans: bool = True
    """Scan span attributes."""
    resources: bool = True
    """Scan resource attributes."""
    events: bool = True
    """Scan span events' names and attributes."""

    @field_validator("mask")
    @classmethod
    def _mask_template(cls, value: str) -> str:
        try:
            value.format(pattern="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"expected a text with at most a {{pattern}} field: {exc}") from None
        return value

    @model_validator(mode="after")
    def _distinct_names(self) -> RedactConfig:
        names = [p.name for p in self.custom_patterns]
        clash = sorted({n for n in names if names.count(n) > 1 or n in BUILTIN_PATTERNS})
        if clash:
            raise ValueError(f"custom pattern names must be unique and not built-in: {clash}")
        return self


def _combined(names: list[str]) -> re.Pattern[str] | None:
    """One expression trying the named built-in patterns in turn at each position; the
    name of what matched is ``match.lastgroup`` (the patterns have no groups of their own)."""
    if not names:
        return None
    return re.compile("|".join(f"(?P<{n}>{BUILTIN_PATTERNS[n][0].pattern})" for n in names))


def _key_test(globs: list[str]) -> Callable[[str], bool] | None:
    if not globs:
        return None
    exact = frozenset(g for g in globs if not any(c in g for c in "*?["))
    compiled = [re.compile(fnmatch.translate(g)) for g in globs if g not in exact]
    return lambda key: key in exact or any(p.match(key) for p in compiled)


class RedactProcessor(Processor):
    type_name = "redact"
    Config = RedactConfig
    config: RedactConfig

    def __init__(self, component_id: str, config: RedactConfig):
        super().__init__(component_id, config)
        chosen = [name for name in BUILTIN_PATTERNS if name in config.patterns]
        self._email = _combined(["email"]) if "email" in chosen else None
        self._numbers = _combined([name for name in chosen if name != "email"])
        self._phone_alone = _combined(["phone"]) if "phone" in chosen else None
        self._custom = [(p.name, re.compile(p.regex)) for p in config.custom_patterns]
        self._patterns = chosen + [p.name for p in config.custom_patterns]
        self._masks = {name: config.mask.format(pattern=name) for name in self._patterns}
        self._denied_mask = config.mask.format(pattern="denied")
        self._allowed = _key_test(config.allow_keys)
        self._denied = _key_test(config.deny_keys)
        self._remove_denied = config.deny_action == "remove"
        self._always_scan = bool(config.custom_patterns)
        self._active = bool(self._patterns or config.deny_keys)
        self._counts: dict[str, int] = {}
        self._counter: Any = None
        # Outcomes by text: agents repeat the same resource attributes, prompts and
        # system instructions in request after request.
        self._outcomes: dict[str, tuple[str, tuple[tuple[str, int], ...]]] = {}

    async def start(self, host: Host) -> None:
        self._counter = host.telemetry.counter(
            "calltrace_processor_redacted_values",
            "Attribute values and event names a redact processor masked, by pattern.",
            ["processor", "pattern"],
        )

    def redact_text(self, text: str) -> str:
        """``text`` with every match of the configured patterns masked (and counted)."""
        known = self._outcomes.get(text)
        if known is None:
            if not self._always_scan and not _MAY_MATCH(text):
                known = (text, ())  # built-in patterns all need a digit or an "@"
            else:
                known = self._scan(text)
            if len(text) <= _OUTCOME_TEXT_LIMIT:
                if len(self._outcomes) >= _OUTCOMES_LIMIT:
                    self._outcomes.clear()
                self._outcomes[text] = known
        redacted, masked = known
        for name, count in masked:
            self._counts[name] = self._counts.get(name, 0) + count
        return redacted

    def _scan(self, text: str) -> tuple[str, tuple[tuple[str, int], ...]]:
        counts: dict[str, int] = {}
        if self._email is not None and "@" in text:
            text = self._email.sub(lambda match: self._replace_builtin(match, counts), text)
        if self._numbers is not None:
            text = self._mask_numbers(text, counts)
        for name, regex in self._custom:
            mask = self._masks[name]
            text, masked = regex.subn(lambda _, mask=mask: mask, text)  # type: ignore[misc]
            if masked:
                counts[name] = counts.get(name, 0) + masked
        return text, tuple(counts.items())

    def _mask_numbers(self, text: str, counts: dict[str, int]) -> str:
        """What ``self._numbers.sub`` would make of ``text``, searched only in the runs of
        digits and separators (``_NUMBER_RUN``) that every phone and card number lies in,
        so long texts are not searched at every position. The search reaches 2
        characters past a run, all that the patterns' lookahead reads."""
        numbers = self._numbers
        assert numbers is not None
        parts: list[str] = []
        last = 0
        for run in _NUMBER_RUN.finditer(text):
            start, end = run.span()
            for match in numbers.finditer(text, start, min(len(text), end + 2)):
                parts += (text[last : match.start()], self._replace_builtin(match, counts))
                last = match.end()
        if not parts:
            return text
        parts.append(text[last:])
        return "".join(parts)

    def _replace_builtin(self, match: re.Match[str], counts: dict[str, int]) -> str:
        name = match.lastgroup
        assert name is not None
        found = match.group(0)
        check = BUILTIN_PATTERNS[name][1]
        if check is None or check(found):
            counts[name] = counts.get(name, 0) + 1
            return self._masks[name]
        if name == "payment_card" and self._phone_alone is not None:
            # Not a card (Luhn): its digits may still hold a phone number.
            return self._phone_alone.sub(lambda inner: self._replace_builtin(inner, counts), found)
        return found

    def _redact_value(self, value: Any) -> None:
        """Masks the strings of one ``AnyValue`` in place, arrays and maps included."""
        kind = value.WhichOneof("value")
        if kind == "string_value":
            if self._patterns:
                redacted = self.redact_text(value.string_value)
                if redacted != value.string_value:
                    value.string_value = redacted
        elif kind == "array_value":
            for item in value.array_value.values:
                self._redact_value(item)
        elif kind == "kvlist_value":
            self._redact_attributes(value.kvlist_value.values)

    def _redact_attributes(self, attributes: MutableSequence[Any]) -> None:
        allowed, denied = self._allowed, self._denied
        denied_indexes = []
        for index, kv in enumerate(attributes):
            if allowed is not None and allowed(kv.key):
                continue
            if denied is not None and denied(kv.key):
                denied_indexes.append(index)
                continue
            self._redact_value(kv.value)
        if not denied_indexes:
            return
        self._counts["denied"] = self._counts.get("denied", 0) + len(denied_indexes)
        for index in reversed(denied_indexes):
            if self._remove_denied:
                del attributes[index]
            else:
                value = attributes[index].value
                value.Clear()
                value.string_value = self._denied_mask

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        if not self._active:
            return batch
        config = self.config
        if not (config.spans or config.events):
            # Resources only: the spans are not handed out, so their received bytes stay.
            if config.resources:
                for entry in batch.entries():
                    self._redact_attributes(entry.resource.attributes)
            self._flush_counts()
            return batch
        for rs in batch.resource_spans:
            if config.resources:
                self._redact_attributes(rs.resource.attributes)
            for span in iter_spans(rs):
                if config.spans:
                    self._redact_attributes(span.attributes)
                if config.events:
                    for event in span.events:
                        if self._patterns:
                            name = self.redact_text(event.name)
                            if name != event.name:
                                event.name = name
                        self._redact_attributes(event.attributes)
        self._flush_counts()
        return batch

    def _flush_counts(self) -> None:
        if not self._counts:
            return
        if self._counter is not None:
            for pattern, count in self._counts.items():
                self._counter.labels(self.id, pattern).inc(count)
        self._counts.clear()


_MAY_MATCH = re.compile(r"[\d@]").search
_NUMBER_RUN = re.compile(r"[+(]?\d[\d ().-]{5,}\d")
"""Where a phone or card number may be: 7 or more characters of digits and separators,
starting (after an optional "+" or "(") and ending with a digit."""
_OUTCOMES_LIMIT = 4096
"""Texts whose outcome one processor remembers before it starts over."""
_OUTCOME_TEXT_LIMIT = 1024
"""Longer texts (a whole conversation) are rarely seen twice and are not remembered."""
