"""The ``redact`` processor: a table of realistic transcripts and prompts (attribute names
as the LiveKit and Pipecat fixtures carry them), scope, allow/deny lists, counts."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.config import ConfigError, parse_config
from collector.testing import (
    FakeHost,
    assert_attribute,
    attributes_of,
    exported_spans,
    load_batch,
    make_batch,
    run_pipeline,
    run_processor,
)
from processors.redact import RedactConfig, RedactProcessor, luhn_valid
from tests.support import FIXTURES

ALL = {"patterns": ["phone", "email", "payment_card"]}
COUNTER = "calltrace_processor_redacted_values_total"

# (attribute, text as the agent sent it, text as stored)
TRANSCRIPTS = [
    (
        "lk.pii.user_input",
        "Hi, my number is +1 415 555 0132, call me back.",
        "Hi, my number is [REDACTED:phone], call me back.",
    ),
    (
        "lk.pii.user_transcript",
        "you can reach me at (415) 555-0132 or 415.555.0199 after six",
        "you can reach me at [REDACTED:phone] or [REDACTED:phone] after six",
    ),
    (
        "lk.pii.user_transcript",
        "ring me on 020 7946 0958 or my mobile 07700 900123, or 07700900124",
        "ring me on [REDACTED:phone] or my mobile [REDACTED:phone], or [REDACTED:phone]",
    ),
    (
        "transcript",
        "mon numéro est le 06 12 34 56 78, merci",
        "mon numéro est le [REDACTED:phone], merci",
    ),
    (
        "transcript",
        "my email is jane.doe+calls@example.co.uk thanks",
        "my email is [REDACTED:email] thanks",
    ),
    (
        "text",
        "I've sent the confirmation to j.smith@acme-corp.com.",
        "I've sent the confirmation to [REDACTED:email].",
    ),
    (
        "lk.pii.response.text",
        "Got it: Visa 4111 1111 1111 1111, and the Amex 3782-822463-10005.",
        "Got it: Visa [REDACTED:payment_card], and the Amex [REDACTED:payment_card].",
    ),
    (
        "gen_ai.input.messages",
        json.dumps(
            [
                {
                    "role": "user",
                    "parts": [
                        {"type": "text", "content": "Charge 5500000000000004 and mail bob@corp.io"}
                    ],
                }
            ]
        ),
        json.dumps(
            [
                {
                    "role": "user",
                    "parts": [
                        {
                            "type": "text",
                            "content": "Charge [REDACTED:payment_card] and mail [REDACTED:email]",
                        }
                    ],
                }
            ]
        ),
    ),
    (
        "gen_ai.output.messages",
        '[{"role": "assistant", "parts": [{"type": "text", "content": "I noted +442079460958."}]}]',
        '[{"role": "assistant", "parts": [{"type": "text", "content": "I noted [REDACTED:phone]."}]}]',
    ),
    (
        "input",
        '[{"role": "user", "content": "call +49 30 901820 or +33 6 12 34 56 78"}]',
        '[{"role": "user", "content": "call [REDACTED:phone] or [REDACTED:phone]"}]',
    ),
    (
        "output",
        "Sure, I will text 415-555-0132 and e-mail ops@calltrace.dev.",
        "Sure, I will text [REDACTED:phone] and e-mail [REDACTED:email].",
    ),
    (
        "lk.pii.function_tool.arguments",
        '{"phone": "+14155550132", "card": "6011 1111 1111 1117"}',
        '{"phone": "[REDACTED:phone]", "card": "[REDACTED:payment_card]"}',
    ),
]

# Texts with digits and at-signs that are none of the patterns: left as they are.
UNTOUCHED = [
    ("lk.pii.user_input", "My order number is 1234567890123 and 4000123412341235."),
    ("lk.pii.response.text", "Your card ending 4242 is on file; the total is $1,299.00."),
    ("lk.pii.user_transcript", "The meeting is on 2026-11-24 at 07:34:32, room 1204."),
    (
        "lk.stt.events",
        '[{"received_at": 1795505672.2327044, "type": "interim_transcript", "transcript_length": 10}]',
    ),
    ("gen_ai.response.id", "140284623983760"),
    ("lk.llm_metrics", '{"ttft": 0.10146902799897362, "duration": 0.20059537887573242}'),
    ("text", "Call us @ the front desk, version 1.45.2, ip 192.168.100.20."),
    ("input", "Pay 12 34 56 in three parts"),
]


def _spans_with(attributes: dict, events: list | None = None):
    return make_batch(
        [
            {
                "resource": {"service.name": "voice-agent", "livekit.room.id": "RM_test123"},
                "spans": [{"name": "agent_turn", "attributes": attributes, "events": events or []}],
            }
        ],
        project="p1",
    )


def _redact(attributes: dict, config=ALL, host=None):
    out = run_processor(RedactProcessor, config, _spans_with(attributes), host=host)
    assert out is not None
    return exported_spans(out.resource_spans)[0]


@pytest.mark.parametrize(("key", "text", "expected"), TRANSCRIPTS)
def test_every_pattern_in_transcripts_and_prompts_is_masked(key, text, expected):
    assert _redact({key: text}).attributes == {key: expected}


@pytest.mark.parametrize(("key", "text"), UNTOUCHED)
def test_lookalikes_are_left_alone(key, text):
    assert _redact({key: text}).attributes == {key: text}


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")


def test_the_whole_table_in_one_batch_masks_everything_and_counts_it():
    host = FakeHost()
    attributes = {f"{key}.{i}": text for i, (key, text, _) in enumerate(TRANSCRIPTS)}
    attributes |= {f"{key}.u{i}": text for i, (key, text) in enumerate(UNTOUCHED)}
    span = _redact(attributes, host=host)
    expected = {f"{key}.{i}": masked for i, (key, _, masked) in enumerate(TRANSCRIPTS)}
    expected |= {f"{key}.u{i}": text for i, (key, text) in enumerate(UNTOUCHED)}
    assert span.attributes == expected
    masked = "".join(text for _, _, text in TRANSCRIPTS)
    for pattern in ("phone", "email", "payment_card"):
        assert host.telemetry.value(COUNTER, processor="redact", pattern=pattern) == masked.count(
            f"[REDACTED:{pattern}]"
        )


def test_arrays_maps_events_and_resources():
    batch = make_batch(
        [
            {
                "resource": {"service.name": "agent", "owner": "ops@example.com"},
                "spans": [
                    {
                        "name": "llm",
                        "attributes": {
                            "messages": ["hi", "mail me at a@b.io"],
                            "ctx": {"user": {"phone": "+14155550132"}, "n": 3},
                        },
                        "events": [
                            {
                                "name": "sent to a@b.io",
                                "attributes": {"exception.message": "no route to +14155550132"},
                            }
                        ],
                    }
                ],
            }
        ]
    )
    out = run_processor(RedactProcessor, ALL, batch)
    assert out is not None
    span = exported_spans(out.resource_spans)[0]
    assert span.attributes == {
        "messages": ["hi", "mail me at [REDACTED:email]"],
        "ctx": {"user": {"phone": "[REDACTED:phone]"}, "n": 3},
    }
    assert_attribute(span.resource, "owner", "[REDACTED:email]")
    event = span.span.events[0]
    assert event.name == "sent to [REDACTED:email]"
    assert_attribute(event, "exception.message", "no route to [REDACTED:phone]")

    # resources only: the spans stay as they came
    resources_only = run_processor(RedactProcessor, {**ALL, "events": False, "spans": False}, batch)
    assert resources_only is not None
    (kept,) = exported_spans(resources_only.resource_spans)
    assert kept.span == exported_spans(batch.resource_spans)[0].span
    assert_attribute(kept.resource, "owner", "[REDACTED:email]")

    # each scope can be turned off
    off = run_processor(
        RedactProcessor, {**ALL, "events": False, "resources": False, "spans": False}, batch
    )
    assert off is not None
    assert [rs.SerializeToString() for rs in off.resource_spans] == [
        rs.SerializeToString() for rs in batch.resource_spans
    ]


def test_allow_and_deny_keys():
    host = FakeHost()
    span = _redact(
        {
            "lk.pii.chat_ctx": '{"items": [{"content": "You are a helpful assistant."}]}',
            "lk.pii.user_input": "mail me at a@b.io",
            "support.email": "help@calltrace.dev",
            "nested": {"lk.pii.secret": [1, 2], "keep": "x"},
        },
        {**ALL, "deny_keys": ["lk.pii.chat_ctx", "*.secret"], "allow_keys": ["support.*"]},
        host=host,
    )
    assert span.attributes == {
        "lk.pii.chat_ctx": "[REDACTED:denied]",
        "lk.pii.user_input": "mail me at [REDACTED:email]",
        "support.email": "help@calltrace.dev",
        "nested": {"lk.pii.secret": "[REDACTED:denied]", "keep": "x"},
    }
    assert host.telemetry.value(COUNTER, processor="redact", pattern="denied") == 2

    removed = _redact(
        {"lk.pii.chat_ctx": "anything", "other": "kept"},
        {"deny_keys": ["lk.pii.*"], "deny_action": "remove"},
    )
    assert removed.attributes == {"other": "kept"}


def test_custom_patterns_and_mask():
    span = _redact(
        {"text": "account ACC-123456, ref acc-999999, mail x@y.org"},
        {
            "patterns": ["email"],
            "custom_patterns": [{"name": "account", "regex": "(?i)ACC-\\d{6}"}],
            "mask": "<{pattern}>",
        },
    )
    assert span.attributes == {"text": "account <account>, ref <account>, mail <email>"}


def test_on_by_default_for_nothing():
    batch = _spans_with({key: text for key, text, _ in TRANSCRIPTS[:4]})
    out = run_processor(RedactProcessor, None, batch)
    assert out is not None
    assert [rs.SerializeToString() for rs in out.resource_spans] == [
        rs.SerializeToString() for rs in batch.resource_spans
    ]
    assert RedactConfig().patterns == []


def test_only_strings_change_in_real_fixtures():
    """A whole LiveKit request: masking leaves every non-string value, every key, every
    name and every id as it was."""
    batch = load_batch(FIXTURES / "livekit" / "004.pb", project="p1")
    out = run_processor(
        RedactProcessor, {**ALL, "custom_patterns": [{"name": "weather", "regex": "sunny"}]}, batch
    )
    assert out is not None
    before, after = exported_spans(batch.resource_spans), exported_spans(out.resource_spans)
    assert len(before) == len(after)
    changed = 0
    for old, new in zip(before, after, strict=True):
        assert (old.name, old.span_id, old.trace_id) == (new.name, new.span_id, new.trace_id)
        assert old.resource == new.resource
        assert old.attributes.keys() == new.attributes.keys()
        for key, value in old.attributes.items():
            if new.attributes[key] != value:
                changed += 1
                assert isinstance(value, str)
                assert new.attributes[key] == value.replace("sunny", "[REDACTED:weather]")
    assert changed > 0


_WORD = st.text(
    alphabet=st.characters(
        categories=["L", "Zs"], include_characters=",.!?'\"-:;()[]{}/#&*", exclude_characters="@"
    ),
    min_size=1,
    max_size=12,
).filter(lambda word: any(not c.isspace() for c in word))
_NUMBER = st.integers(min_value=0, max_value=9999).map(str)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_WORD, st.none() | _NUMBER), max_size=20))
def test_texts_without_the_patterns_are_unchanged(tokens):
    """Words, punctuation and short numbers (never two numbers side by side, never an @)
    hold no phone number, e-mail or card number, and come out as they went in."""
    text = " ".join(word if number is None else f"{word} {number}" for word, number in tokens)
    processor = RedactProcessor("redact", RedactConfig(**ALL))
    assert processor.redact_text(text) == text


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([t for _, t, _ in TRANSCRIPTS]),
    st.lists(_WORD, max_size=5).map(" ".join),
    st.lists(_WORD, max_size=5).map(" ".join),
)
def test_patterns_are_masked_whatever_surrounds_them(masked_text, before, after):
    processor = RedactProcessor("redact", RedactConfig(**ALL))
    expected = {t: m for _, t, m in TRANSCRIPTS}[masked_text]
    text = f"{before} {masked_text} {after}"
    assert processor.redact_text(text) == f"{before} {expected} {after}"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"patterns": ["ssn"]}, "processors.redact.patterns.0: input should be"),
        (
            {"custom_patterns": [{"name": "x", "regex": "("}]},
            "processors.redact.custom_patterns.0.regex: not a valid regular expression",
        ),
        (
            {"custom_patterns": [{"name": "x", "regex": "a*"}]},
            "processors.redact.custom_patterns.0.regex: the expression matches the empty string",
        ),
        (
            {"mask": "{who}"},
            "processors.redact.mask: expected a text with at most a {pattern} field",
        ),
        (
            {"custom_patterns": [{"name": "email", "regex": "x"}]},
            "processors.redact: custom pattern names must be unique and not built-in",
        ),
    ],
)
def test_config_errors_name_the_yaml_path(settings, message):
    document = {
        "receivers": {"otlp": None},
        "processors": {"redact": settings},
        "exporters": {"debug": None},
        "service": {
            "pipelines": {
                "traces": {"receivers": ["otlp"], "processors": ["redact"], "exporters": ["debug"]}
            }
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert any(error.startswith(message) for error in caught.value.errors), caught.value.errors


def test_every_exporter_stores_the_masked_text(tmp_path):
    result = run_pipeline(
        f"""
processors:
  redact: {{patterns: [phone, email, payment_card]}}
exporters:
  memory: {{type: "collector.testing:InMemoryExporter"}}
  sqlite: {{path: "{tmp_path / "spans.db"}"}}
  file: {{path: "{tmp_path / "spans.jsonl"}"}}
service:
  pipelines:
    traces: {{processors: [redact], exporters: [memory, sqlite, file]}}
""",
        [_spans_with({key: text for key, text, _ in TRANSCRIPTS})],
    )
    expected = {key: masked for key, _, masked in TRANSCRIPTS}
    for exporter_id in ("memory", "sqlite", "file"):
        (span,) = result[exporter_id]
        assert attributes_of(span) == expected, exporter_id
    # and on disk: the database (with its write-ahead log) and the file hold no original
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.is_file())
    assert b"[REDACTED:payment_card]" in stored
    assert b"4111 1111 1111 1111" not in stored
    assert b"jane.doe" not in stored


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789 ().-+/,abc\n", max_size=60))
def test_searching_number_runs_only_finds_what_a_whole_search_finds(text):
    """The processor searches for phone and card numbers only in runs of digits and
    separators; a search of the whole text finds exactly the same."""
    processor = RedactProcessor("redact", RedactConfig(patterns=["phone", "payment_card"]))
    whole = processor._numbers.sub(lambda m: processor._replace_builtin(m, {}), text)
    assert processor._mask_numbers(text, {}) == whole
