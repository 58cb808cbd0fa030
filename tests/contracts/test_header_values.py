"""Strings that reach a mail header: no value the contract accepts can ever become a line.

The email package decodes RFC 2047 encoded words in header values and writes what they
hold back verbatim (CPython CVE-2024-6923), so ``=?utf-8?q?...=0D=0A...?=`` is a line
break in disguise. Every field that ends up in a header (names, title, address, and the
envelope's producer, which shares the type) refuses encoded words and every line or
paragraph separator and control character, naming the field.
"""

from __future__ import annotations

import sys
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comms_tasks.contracts import ContractViolation, validate_event
from tests.contracts.test_inbound_contracts import THERAPIST, envelope, therapist_payload

HEADER_FIELDS = ("title", "first_name", "last_name", "email")

ENCODED_WORDS = [
    "=?utf-8?q?Weber=0D=0A=0D=0AIhr_Konto_wurde_gesperrt=2E?=",
    "=?utf-8?q?evil=0D=0ABcc:_x@y?=",
    "Weber =?utf-8?b?DQpCY2M6IHhAeQ==?=",
    "=?UTF-8?Q?ok?=",
    "=?iso-8859-1?q?M=FCller?=",
    "x=??=y",
]

# Every line or paragraph separator and control character there is: C0 (with CR, LF,
# TAB, VT, FF), DEL, C1 (with NEL U+0085), LINE SEPARATOR and PARAGRAPH SEPARATOR.
SEPARATORS = [
    chr(code)
    for code in range(sys.maxunicode + 1)
    if unicodedata.category(chr(code)) in ("Cc", "Zl", "Zp")
]


def upserted(field: str, value: str) -> dict[str, Any]:
    return envelope("therapist.upserted", therapist_payload(**{field: value}))


def refused(raw: dict[str, Any]) -> ContractViolation:
    with pytest.raises(ContractViolation) as caught:
        validate_event(THERAPIST, raw)
    return caught.value


def in_field(field: str, value: str) -> str:
    # An address must still look like one, so the character goes into its local part.
    return f"praxis{value}weber@example.de" if field == "email" else f"Weber{value}Praxis"


def test_every_separator_and_control_character_is_known() -> None:
    assert {"\r", "\n", "\t", "\x0b", "\x0c", "\x7f", "\x85", "\u2028", "\u2029"} <= set(SEPARATORS)
    assert len(SEPARATORS) == 67  # 65 Cc, one Zl, one Zp


@pytest.mark.parametrize("field", HEADER_FIELDS)
@pytest.mark.parametrize("value", ENCODED_WORDS)
def test_an_encoded_word_is_refused_naming_the_field(field: str, value: str) -> None:
    raw = upserted(field, in_field(field, value) if field == "email" else value)

    error = refused(raw)

    assert f"event.payload.{field}:" in error.reason, error.reason
    assert error.message_id == raw["event_id"]


@pytest.mark.parametrize("field", HEADER_FIELDS)
@pytest.mark.parametrize("character", SEPARATORS, ids=lambda c: f"U+{ord(c):04X}")
def test_every_line_break_and_control_character_is_refused_naming_the_field(
    field: str, character: str
) -> None:
    error = refused(upserted(field, in_field(field, character)))

    assert f"event.payload.{field}:" in error.reason, error.reason


def test_the_producer_refuses_an_encoded_word_too() -> None:
    raw = envelope("therapist.deleted", {"therapist_id": 1}, producer="=?utf-8?q?a=0Ab?=")

    assert "event.producer:" in refused(raw).reason


@pytest.mark.parametrize("field", ("title", "first_name", "last_name"))
@given(
    before=st.text(max_size=10),
    inner=st.text(max_size=20),
    after=st.text(max_size=10),
)
@settings(max_examples=60, deadline=None)
def test_any_encoded_word_shape_is_refused(field: str, before: str, inner: str, after: str) -> None:
    value = f"{before}=?{inner}?={after}"

    error = refused(upserted(field, value))

    assert f"event.payload.{field}:" in error.reason


@pytest.mark.parametrize("field", ("title", "first_name", "last_name"))
@given(value=st.text(min_size=1, max_size=60))
@settings(max_examples=200, deadline=None)
def test_an_accepted_name_has_no_separator_and_no_encoded_word(field: str, value: str) -> None:
    try:
        validate_event(THERAPIST, upserted(field, value))
    except ContractViolation as violation:
        assert f"event.payload.{field}:" in violation.reason
        return
    assert not any(character in SEPARATORS for character in value)
    assert not ("=?" in value and "?=" in value.split("=?", 1)[1])


@pytest.mark.parametrize(
    "value", ["Dr. med.", "Müller-Lüdenscheidt", "O'Brien", "a = b ? c", "=?", "?=", "Prof.=?"]
)
def test_ordinary_names_still_pass(value: str) -> None:
    validate_event(THERAPIST, upserted("last_name", value))


@pytest.mark.parametrize(
    "address", ["jörg@example.de", "praxis\u200b@example.de", "a\u202e@example.de", "a@exämple.de"]
)
def test_an_address_the_header_writer_cannot_send_to_is_refused_at_the_door(address: str) -> None:
    # Without SMTPUTF8 a non-ASCII local part cannot be sent: every email to it would
    # fail for good, week after week. The sender is told now instead.
    error = refused(upserted("email", address))

    assert "event.payload.email:" in error.reason
