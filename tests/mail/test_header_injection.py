"""The header writer refuses whatever would become a line break, whoever let it through.

The contract refuses these values at the door; this is the second wall, for values that
reach the builder some other way (a row written directly, an old row, a setting). On this
Python the email package decodes encoded words and writes their CR/LF back as they are
(CVE-2024-6923), so the check is on what is written, not on what was given.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import email.utils
import itertools
import sys
import unicodedata
from email.header import decode_header, make_header
from email.headerregistry import Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from comms_tasks.contracts.limits import MAX_DISPLAY_NAME
from comms_tasks.emails.tasks import send_email
from comms_tasks.mail import message
from comms_tasks.mail.message import HeaderError, OutgoingMessage, build_mime
from comms_tasks.models import EmailStatus, Therapist
from tests.emails import test_email_pipeline as pipeline
from tests.mail.test_sender import outgoing
from tests.smtp import SmtpSink

smtp = pipeline.smtp

INJECTIONS = [
    "=?utf-8?q?Weber=0D=0A=0D=0AIhr_Konto_wurde_gesperrt=2E?=",
    "=?utf-8?q?evil=0D=0ABcc:_x@y?=",
    "Anna =?utf-8?b?DQpCY2M6IHhAeQ==?=",
    "=?utf-8?q?a=0Ab?=",
    "=?utf-8?q?a=0Db?=",
    "=?utf-8?q?a=C2=85b?=",
    "=?utf-8?q?a=E2=80=A8b?=",
]

TEXT_FIELDS = ("recipient_name", "sender_name", "subject")
SEPARATORS = [
    chr(code)
    for code in range(sys.maxunicode + 1)
    if unicodedata.category(chr(code)) in ("Cc", "Zl", "Zp")
]


def headers_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("value", INJECTIONS)
def test_an_encoded_line_break_is_refused_in_every_text_header(field: str, value: str) -> None:
    message = outgoing(**{field: value})

    with pytest.raises(HeaderError) as caught:
        build_mime(message)

    assert field in str(caught.value) or field.split("_")[0] in str(caught.value).lower()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recipient_email", "=?utf-8?q?a=0D=0ABcc:_x?=@example.org"),
        ("reply_to", "=?utf-8?q?a=0D=0ABcc:_x?=@example.org"),
        ("sender_email", "=?utf-8?q?a=0D=0ABcc:_x?=@example.org"),
    ],
)
def test_an_encoded_word_in_an_address_is_refused(field: str, value: str) -> None:
    with pytest.raises(HeaderError):
        build_mime(outgoing(**{field: value}))


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("character", SEPARATORS, ids=lambda c: f"U+{ord(c):04X}")
def test_every_separator_and_control_character_is_refused(field: str, character: str) -> None:
    with pytest.raises(HeaderError):
        build_mime(outgoing(**{field: f"Anna{character}Weber"}))


def test_a_value_the_email_package_cannot_encode_is_a_header_error() -> None:
    # A lone surrogate (never valid in UTF-8) makes the email package's folding fail.
    with pytest.raises(HeaderError, match="Subject"):
        build_mime(outgoing(subject="Anfrage \udcff f\u00fcr Sie"))


def test_a_header_error_is_a_value_error_so_the_email_fails_for_good() -> None:
    assert issubclass(HeaderError, ValueError)


ENCODED_PIECES = st.sampled_from(
    ["=0D", "=0A", "=0D=0A", "=C2=85", "=E2=80=A8", "Bcc:_x@y", "_", "a", "=3F", "?", " ", "=20"]
)


@given(
    name=st.lists(ENCODED_PIECES, max_size=12).map("".join),
    subject=st.text(max_size=80),
)
@settings(max_examples=300, deadline=None)
def test_whatever_the_values_a_built_message_has_exactly_its_own_headers(
    name: str, subject: str
) -> None:
    message: OutgoingMessage = dataclasses.replace(
        outgoing(), recipient_name=f"=?utf-8?q?{name}?= {name}", subject=subject
    )
    try:
        raw = build_mime(message)
    except HeaderError:
        return
    head = headers_of(raw)
    lines = head.split(b"\r\n")
    names = [line.split(b":", 1)[0] for line in lines if line[:1] not in (b" ", b"\t")]
    assert names == [
        b"Date",
        b"Message-ID",
        b"From",
        b"To",
        b"Subject",
        b"MIME-Version",
        b"Content-Type",
    ]
    parsed = email.message_from_bytes(raw, policy=email.policy.SMTP)
    for header in ("To", "Subject"):
        assert not any(c in SEPARATORS for c in str(parsed[header]))
    assert parsed["Bcc"] is None


@pytest.mark.parametrize("value", INJECTIONS)
def test_the_written_header_is_checked_even_when_the_value_check_is_bypassed(value: str) -> None:
    # The second wall on its own: the value check before folding is skipped here.
    with pytest.raises(HeaderError):
        message._fold("To", Address(display_name=value, addr_spec="praxis@example.org"))
    with pytest.raises(HeaderError):
        message._fold("Subject", value)


def test_the_written_header_check_lets_ordinary_folded_headers_through() -> None:
    long_name = "Prof. Dr. med. Jörg-Alexander Müller-Lüdenscheidt von und zu Hohenstein " * 3
    written = message._fold("To", Address(display_name=long_name, addr_spec="a@example.org"))
    assert written.count(b"\r\n") > 1
    assert message._fold("Subject", "Grüße " * 40).startswith(b"Subject: ")


# --- end to end: a row that never passed the contract -----------------------------------


def test_a_therapist_row_written_directly_with_an_encoded_line_break_is_never_sent(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    pipeline.therapist(8, last_name="Weber", first_name="Anna", salutation="Frau")
    with Session(committed_db) as session, session.begin():
        row = session.get(Therapist, 8)
        assert row is not None
        row.last_name = "=?utf-8?q?Weber=0D=0ABcc:_alle@example.org?="
    pipeline.open_requests(8, range(80, 82))
    pipeline.run_batch(pipeline.T0)

    assert send_email() == {"failed": 1}

    assert smtp.accepted == []
    [failed] = pipeline.all_emails(committed_db)
    assert failed.status is EmailStatus.FAILED
    assert failed.error_message is not None and "encoded word" in failed.error_message


NAME_PIECES = st.sampled_from(
    ['"', "\\", "<", ">", "@", ",", ";", ":", "(", ")", " ", "evil@x.de", "ä", "Weber", "=?", "?="]
)


@given(name=st.lists(NAME_PIECES, max_size=16).map("".join))
@settings(max_examples=300, deadline=None)
def test_a_display_name_never_adds_a_recipient(name: str) -> None:
    try:
        raw = build_mime(outgoing(recipient_name=name))
    except HeaderError:
        return
    parsed = email.message_from_bytes(raw, policy=email.policy.SMTP)
    assert [address.addr_spec for address in parsed["To"].addresses] == [
        "praxis.mueller@example.org"
    ]
    assert parsed["Cc"] is None and parsed["Bcc"] is None


# --- a long display name is never unquoted by folding -----------------------------------

# The name of the probe: contract-valid (one line, 111 characters of a last name), long
# enough that the email package folded it and dropped its quotes, so that everything
# before ", Max" became an address of its own.
INJECTED_LAST_NAME = "Weber " + "x" * 80 + " <chef@bank.example>, Max"
ADDRESS_FIELDS = {
    "From": ("sender_email", "sender_name"),
    "To": ("recipient_email", "recipient_name"),
}
SPECIALS = st.sampled_from([*'<>,;:@"\\()[]. ', "chef@bank.example", "<a@b.de>, "])
LONG_NAME = st.one_of(
    st.lists(
        st.one_of(SPECIALS, st.text(alphabet="xäÖß€ ", min_size=1, max_size=60)),
        max_size=60,
    ).map(lambda parts: "".join(parts)[:MAX_DISPLAY_NAME]),
    # The full length of a display name the contract allows, specials throughout.
    st.text(
        alphabet='<>,;:@"\\()[]. xä\U0001f600', min_size=MAX_DISPLAY_NAME, max_size=MAX_DISPLAY_NAME
    ),
)


def address_headers(raw: bytes) -> dict[str, list[tuple[str, str]]]:
    """Each address header as a client reads it: (name as shown, address) of each address.

    Read three ways, which must agree on the addresses: the plain parser on the header as
    written (folds left in) and unfolded, and the email package's parser. The name shown
    is the RFC 2047 decoding (white space between encoded words is not part of it).
    """
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    lines = headers_of(raw).split(b"\r\n")
    found: dict[str, list[tuple[str, str]]] = {}
    for name in ("From", "To", "Reply-To", "Cc", "Bcc"):
        written: list[str] = []
        for index, line in enumerate(lines):
            if line.lower().startswith(name.lower().encode("ascii") + b":"):
                rest = itertools.takewhile(lambda more: more[:1] == b" ", lines[index + 1 :])
                written.append(b"\r\n".join([line, *rest]).decode("ascii").split(":", 1)[1])
        if not written:
            assert parsed.get_all(name) is None
            continue
        unfolded = [value.replace("\r\n", "") for value in written]
        shown = [
            (str(make_header(decode_header(phrase))), address)
            for phrase, address in email.utils.getaddresses(unfolded)
        ]
        as_written = [address for _, address in email.utils.getaddresses(written)]
        registry = [a.addr_spec for value in parsed.get_all(name) for a in value.addresses]
        assert as_written == registry == [address for _, address in shown], name
        found[name] = shown
    return found


def test_a_long_name_with_an_address_in_it_adds_no_recipient() -> None:
    name = f"Dr. Anna {INJECTED_LAST_NAME}"
    raw = build_mime(outgoing(recipient_name=name, reply_to="antworten@example.org"))

    headers = address_headers(raw)

    assert headers["To"] == [(name, "praxis.mueller@example.org")]
    assert headers["Reply-To"] == [("", "antworten@example.org")]
    assert "Cc" not in headers and "Bcc" not in headers


@pytest.mark.parametrize("header", sorted(ADDRESS_FIELDS))
@given(name=LONG_NAME)
@settings(max_examples=200, deadline=None)
def test_every_address_header_holds_exactly_its_one_address_whatever_the_name(
    header: str, name: str
) -> None:
    address_field, name_field = ADDRESS_FIELDS[header]
    intended = outgoing(reply_to="antworten@example.org")
    raw = build_mime(dataclasses.replace(intended, **{name_field: name}))

    headers = address_headers(raw)

    assert headers[header] == [(name, getattr(intended, address_field))]
    assert headers["Reply-To"] == [("", "antworten@example.org")]
    assert set(headers) == {"From", "To", "Reply-To"}
    for line in headers_of(raw).split(b"\r\n"):
        assert len(line) <= 998


def test_a_long_name_reaches_the_smtp_server_as_one_recipient(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    pipeline.therapist(9, last_name=INJECTED_LAST_NAME, first_name="Anna", title="Dr.")
    pipeline.open_requests(9, range(90, 92))
    pipeline.run_batch(pipeline.T0)

    assert send_email() == {"sent": 1}

    [received] = smtp.accepted
    assert [address.addr_spec for address in received["To"].addresses] == [smtp.envelopes[0][1][0]]
    # The email package's parser keeps the white space between encoded words.
    shown = received["To"].addresses[0].display_name
    assert "".join(shown.split()) == "".join(f"Dr. Anna {INJECTED_LAST_NAME}".split())
    assert received["Cc"] is None and received["Bcc"] is None


PLAIN_NAME = st.from_regex(
    r"[A-Z][a-zäöüß]{1,12}(\.|-[A-Z][a-z]{1,9}\.)?( [A-Z][a-z]{1,14}){1,4}", fullmatch=True
)
LONG_ADDRESS = "t4523.kontakt@psychotherapie-zimmermann.de"


def test_a_plain_name_too_long_for_the_first_line_is_sent_encoded() -> None:
    # A real therapist's name: plain words, but with their address over 78 characters.
    name = "Dipl.-Psych. Andreas Zimmermann"
    raw = build_mime(outgoing(recipient_name=name, recipient_email=LONG_ADDRESS))

    assert address_headers(raw)["To"] == [(name, LONG_ADDRESS)]


@given(name=PLAIN_NAME)
@settings(max_examples=200, deadline=None)
def test_every_plain_name_reaches_its_long_address(name: str) -> None:
    raw = build_mime(outgoing(recipient_name=name, recipient_email=LONG_ADDRESS))

    assert address_headers(raw)["To"] == [(name, LONG_ADDRESS)]
