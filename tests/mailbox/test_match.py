"""Tokens, tagged addresses and the match keys of a message (no database, no I/O)."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comms_tasks.mail import tokens as reply_tokens
from comms_tasks.mailbox.classify import Classified, MailKind, classify, parse
from comms_tasks.mailbox.match import MatchKeys, keys
from tests.mailbox.samples import (
    BOUNCE_ADDRESS,
    OUR_MESSAGE_ID,
    REPLY_ADDRESS,
    TOKEN,
    all_samples,
    sample,
)
from tests.mailbox.test_classify import header_soup

MESSAGE_ID = re.compile(r"\A<[!-;=?-~]+@[!-;=?-~]+>\Z")
REMINDER_ID = "<9a8b7c6d5e4f40312a1b0c9d8e7f6a5b@praxis-service.example>"


def _keys(raw: bytes, **addresses: str | None) -> MatchKeys:
    addresses.setdefault("reply_address", REPLY_ADDRESS)
    addresses.setdefault("bounce_address", BOUNCE_ADDRESS)
    return keys(raw, classify(raw), **addresses)  # type: ignore[arg-type]


def _assert_bounded(found: MatchKeys) -> None:
    assert len(found.tokens) <= 10 and all(reply_tokens.is_token(t) for t in found.tokens)
    assert len(found.message_ids) <= 20
    assert all(MESSAGE_ID.match(i) and len(i) <= 300 for i in found.message_ids)
    assert found.sender is None or (len(found.sender) <= 254 and found.sender.isascii())
    assert found.sender is None or found.sender == found.sender.lower()


# --- tokens -----------------------------------------------------------------------------


def test_a_new_token_is_26_lowercase_base32_characters_and_never_repeats() -> None:
    tokens = {reply_tokens.new_token() for _ in range(2000)}

    assert len(tokens) == 2000
    for token in tokens:
        assert len(token) == reply_tokens.TOKEN_LENGTH == 26
        assert re.fullmatch(r"[a-z2-7]{26}", token)
        assert reply_tokens.is_token(token)


def test_a_tagged_address_puts_the_token_after_a_plus() -> None:
    assert (
        reply_tokens.tagged_address("antwort@example.org", TOKEN) == f"antwort+{TOKEN}@example.org"
    )


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("antwort+x@example.org", "must not contain '+'"),
        ("antwort", "plain address"),
        ("Antwort <antwort@example.org>", "plain address"),
        ("<antwort@example.org>", "plain address"),
        ("antwort@example.org\r\nBcc: x@evil.example", "plain address"),
        (" antwort@example.org", "plain address"),
        ("jörg@example.org", "plain address"),
    ],
)
def test_a_tagged_address_refuses_a_base_that_is_not_a_plain_address(
    base: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        reply_tokens.tagged_address(base, TOKEN)


@pytest.mark.parametrize("token", ["", "ABC", TOKEN.upper(), TOKEN + "a", TOKEN[:-1] + "1"])
def test_a_tagged_address_refuses_what_is_not_a_token(token: str) -> None:
    with pytest.raises(ValueError, match="not a token"):
        reply_tokens.tagged_address("antwort@example.org", token)


@settings(max_examples=200)
@given(
    # A dot-atom: dots only between atoms, never two in a row (a plain address).
    st.from_regex(
        r"[a-z0-9](?:[a-z0-9_-]{0,6}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9_-]{0,6}[a-z0-9])?){0,3}",
        fullmatch=True,
    ),
    st.from_regex(r"[a-z0-9]{1,20}\.[a-z]{2,6}", fullmatch=True),
    st.booleans(),
)
def test_a_tagged_address_round_trips_through_the_keys(
    local: str, domain: str, shout: bool
) -> None:
    base = f"{local}@{domain}"
    token = reply_tokens.new_token()
    address = reply_tokens.tagged_address(base, token)
    # Some servers change the case of what they deliver to; the token survives that.
    delivered = address.upper() if shout else address
    raw = f"From: a@b.example\nTo: Praxis <{delivered}>\nSubject: Re\n\nZusage\n".encode()

    assert keys(raw, classify(raw), reply_address=base, bounce_address=None).tokens == (token,)


# --- keys of the samples ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "thunderbird_reply.eml",
        "outlook_reply.eml",
        "gmail_reply.eml",
        "iphone_reply.eml",
        "exchange_ooo.eml",
        "gmail_ooo.eml",
    ],
)
def test_a_reply_or_answer_has_its_token_and_our_message_id(name: str) -> None:
    found = _keys(sample(name))

    assert found.tokens == (TOKEN,)
    assert found.message_ids == (OUR_MESSAGE_ID,)
    assert found.sender is not None and found.sender.endswith(".example")


@pytest.mark.parametrize(
    "name",
    [
        "postfix_bounce.eml",
        "postfix_delayed.eml",
        "exim_bounce.eml",
        "exchange_bounce.eml",
        "gmail_bounce.eml",
    ],
)
def test_a_bounce_has_its_verp_token_and_the_returned_message_id(name: str) -> None:
    found = _keys(sample(name))

    assert found.tokens == (TOKEN,)
    assert OUR_MESSAGE_ID in found.message_ids


def test_a_bounce_without_a_verp_address_is_matched_by_the_returned_reply_to() -> None:
    # No COMMS_BOUNCE_ADDRESS: the bounce goes to the plain sender, and only the returned
    # original's Reply-To carries the token.
    raw = sample("postfix_bounce.eml").replace(f"bounce+{TOKEN}".encode(), b"kontakt")

    found = _keys(raw, bounce_address=None)

    assert found.tokens == (TOKEN,)
    assert found.message_ids == (OUR_MESSAGE_ID,)


def test_the_bounce_address_counts_only_for_bounces() -> None:
    raw = sample("thunderbird_reply.eml").replace(b"antwort+", b"bounce+")

    assert _keys(raw).tokens == ()


def test_a_token_in_another_base_address_is_not_a_key() -> None:
    for other in (b"info+", b"xantwort+", b"antwort-", b"antwort+antwort+"):
        raw = sample("thunderbird_reply.eml").replace(b"antwort+", other)
        assert _keys(raw).tokens == (), other
    other_domain = sample("thunderbird_reply.eml").replace(
        b"@praxis-service.example", b"@praxis-service.example.evil.example"
    )
    assert _keys(other_domain).tokens == ()


@pytest.mark.parametrize(
    "forged",
    [
        TOKEN[:-1],
        TOKEN + "a",
        TOKEN[:-1] + "1",
        TOKEN[:-1] + "_",
        "../../etc/passwd",
        "a" * 300,
        TOKEN[:-2] + "\u00e4\u00e4",
    ],
)
def test_a_forged_token_of_the_wrong_shape_is_dropped(forged: str) -> None:
    raw = (
        f"From: x@evil.example\nTo: antwort+{forged}@praxis-service.example\n"
        f"Delivered-To: antwort+{forged}@praxis-service.example\nSubject: Re\n\nhallo\n"
    ).encode()

    assert _keys(raw).tokens == ()


def test_tokens_come_in_header_order_delivered_to_first() -> None:
    first, second, third = (
        reply_tokens.new_token(),
        reply_tokens.new_token(),
        reply_tokens.new_token(),
    )
    raw = (
        f"From: a@b.example\nCc: antwort+{third}@praxis-service.example\n"
        f"To: antwort+{second}@praxis-service.example, antwort+{third}@praxis-service.example\n"
        f"Delivered-To: antwort+{first}@praxis-service.example\nSubject: Re\n\nhallo\n"
    ).encode()

    assert _keys(raw).tokens == (first, second, third)


def test_message_ids_are_in_reply_to_then_references_most_recent_first() -> None:
    raw = (
        f"From: a@b.example\nTo: antwort@praxis-service.example\nSubject: Re: Re\n"
        f"In-Reply-To: {REMINDER_ID}\n"
        f"References: {OUR_MESSAGE_ID}\n {REMINDER_ID}\n <other@mail.example>\n\nhallo\n"
    ).encode()

    assert _keys(raw).message_ids == (REMINDER_ID, "<other@mail.example>", OUR_MESSAGE_ID)


def test_message_ids_of_the_wrong_shape_are_dropped() -> None:
    long_id = "<" + "a" * 300 + "@b.example>"
    raw = (
        "From: a@b.example\nSubject: Re\n"
        f"In-Reply-To: <no-at-sign> {long_id} <a b@c.example> <ok@mail.example>\n\nhallo\n"
    ).encode()

    assert _keys(raw).message_ids == ("<ok@mail.example>",)


@pytest.mark.parametrize(
    ("value", "sender"),
    [
        (
            '"Dr. Anna Beispiel" <A.Beispiel@Praxis-Beispiel.example>',
            "a.beispiel@praxis-beispiel.example",
        ),
        ("=?utf-8?q?J=C3=B6rg?= <joerg@praxis.example>", "joerg@praxis.example"),
        ("a@praxis.example, b@praxis.example", None),
        ("kein Absender", None),
        ("jörg@praxis.example", None),
    ],
)
def test_the_sender_is_one_plain_address_lowercased_or_none(value: str, sender: str | None) -> None:
    raw = f"From: {value}\nSubject: Re\n\nhallo\n".encode()

    assert _keys(raw).sender == sender


def test_keys_of_a_message_too_large_to_parse_come_from_its_headers() -> None:
    raw = sample("thunderbird_reply.eml") + b"A" * (11 * 1024 * 1024)

    classified = classify(raw)
    found = keys(raw, classified, reply_address=REPLY_ADDRESS, bounce_address=BOUNCE_ADDRESS)

    assert classified.defect is not None
    assert found.tokens == (TOKEN,)
    assert found.message_ids == (OUR_MESSAGE_ID,)


def test_keys_take_a_parsed_message_too() -> None:
    raw = sample("gmail_reply.eml")
    message = parse(raw)
    assert message is not None

    found = keys(
        message, classify(raw, parsed=message), reply_address=REPLY_ADDRESS, bounce_address=None
    )

    assert found == _keys(raw)


def test_without_configured_addresses_only_thread_and_sender_are_keys() -> None:
    found = _keys(sample("thunderbird_reply.eml"), reply_address=None, bounce_address=None)

    assert found.tokens == ()
    assert found.message_ids == (OUR_MESSAGE_ID,)


# --- properties -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_soup(), st.sampled_from(list(MailKind)))
def test_keys_of_any_header_soup_never_raise_and_are_bounded(raw: bytes, kind: MailKind) -> None:
    _assert_bounded(
        keys(raw, Classified(kind), reply_address=REPLY_ADDRESS, bounce_address=BOUNCE_ADDRESS)
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4000), st.sampled_from(list(MailKind)))
def test_keys_of_any_bytes_never_raise_and_are_bounded(raw: bytes, kind: MailKind) -> None:
    _assert_bounded(
        keys(raw, Classified(kind), reply_address=REPLY_ADDRESS, bounce_address=BOUNCE_ADDRESS)
    )


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300) | st.none(), st.text(max_size=300) | st.none())
def test_keys_never_raise_whatever_the_configured_addresses(
    reply_address: str | None, bounce_address: str | None
) -> None:
    for raw in all_samples().values():
        _assert_bounded(
            keys(raw, classify(raw), reply_address=reply_address, bounce_address=bounce_address)
        )
