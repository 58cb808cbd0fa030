"""The classifier on realistic samples and on anything at all (no database, no I/O)."""

from __future__ import annotations

import email.parser
import email.policy
import re
import time
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailparser_reply import EmailReplyParser

from comms_tasks.contracts.limits import MAX_TEXT
from comms_tasks.mailbox import _mime, quoting
from comms_tasks.mailbox.classify import MAX_DIAGNOSTIC, Classified, MailKind, classify, parse
from tests.mailbox.samples import OUR_MESSAGE_ID, all_samples, sample

# Phrases of our own email that a reply quotes: none may be left in the reply's text.
QUOTED_ORIGINAL = (
    "über unsere Plattform",
    "Schlafstörungen",
    "Zeitliche Verfügbarkeit",
    "Ihr Praxis-Service",
    "schrieb",
    "Gesendet:",
    "Betreff:",
    "Ursprüngliche Nachricht",
    "iPhone",
    ">",
)
STATUS = re.compile(r"\A[245]\.\d{1,3}\.\d{1,3}\Z")
ADDRESS = re.compile(r"\A[!-~]+@[A-Za-z0-9.-]+\Z")
MESSAGE_ID = re.compile(r"\A<[!-;=?-~]+@[!-;=?-~]+>\Z")


def _assert_bounded(result: Classified) -> None:
    """Whatever came in, what comes out has a strict shape and a bounded length."""
    assert isinstance(result.kind, MailKind)
    assert result.status_code is None or STATUS.match(result.status_code)
    for text in (result.diagnostic, result.defect, result.auto_submitted_reason):
        if text is not None:
            assert len(text) <= MAX_DIAGNOSTIC
            assert "\n" not in text and "\r" not in text
            assert all(unicodedata.category(ch)[0] != "C" for ch in text)
    assert len(result.failed_recipients) <= 20
    assert all(ADDRESS.match(a) and len(a) <= 254 for a in result.failed_recipients)
    assert len(result.returned_message_ids) <= 5
    assert all(MESSAGE_ID.match(i) and len(i) <= 300 for i in result.returned_message_ids)
    if result.reply_text is not None:
        assert 0 < len(result.reply_text) <= MAX_TEXT
        assert all(
            ch in "\n\t" or unicodedata.category(ch) not in {"Cc", "Cf", "Cs", "Zl", "Zp"}
            for ch in result.reply_text
        )
    if result.defect is not None:
        assert result.kind is MailKind.UNRELATED


# --- human replies ----------------------------------------------------------------------

REPLIES = {
    "thunderbird_reply.eml": (
        "vielen Dank für Ihre Anfrage. Für Anfrage Nr. 17 kann ich ab dem 14. April\n"
        "einen Platz anbieten, dienstags um 16:30 Uhr.",
        "Anna Beispiel",
    ),
    "outlook_reply.eml": (
        "leider habe ich derzeit keinen freien Therapieplatz, meine Warteliste ist für\n"
        "die nächsten sechs Monate geschlossen. Für Anfrage Nr. 17 also bitte eine Absage.",
        "Musterstraße 12, 10115 Berlin",
    ),
    "gmail_reply.eml": (
        "ja, ich kann die Person für Anfrage Nr. 17 übernehmen. Ein Erstgespräch wäre\n"
        "am Donnerstag, 12. März, um 17 Uhr möglich.",
        "Viele Grüße\nAnna Beispiel",
    ),
    "iphone_reply.eml": (
        "Zusage für Nr. 17, ab April dienstags 16:30 Uhr. Ich melde mich bei ihr.",
        "Anna Beispiel",
    ),
}


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_a_human_reply_keeps_its_new_text_without_the_quoted_original(name: str) -> None:
    result = classify(sample(name))

    assert result.kind is MailKind.REPLY
    assert result.defect is None and result.auto_submitted_reason is None
    assert result.reply_text is not None
    for new_text in REPLIES[name]:
        assert new_text in result.reply_text
    for quoted in QUOTED_ORIGINAL:
        assert quoted not in result.reply_text
    assert result.reply_text.endswith(REPLIES[name][-1])


def test_an_outlook_reply_with_x_auto_response_suppress_is_a_human_reply() -> None:
    raw = sample("outlook_reply.eml")
    assert b"X-Auto-Response-Suppress: All" in raw

    assert classify(raw).kind is MailKind.REPLY


def test_the_ursprungliche_nachricht_separator_and_iphone_line_are_cut() -> None:
    raw = (
        "From: a@praxis.example\nTo: antwort@x.example\nSubject: AW: Anfrage\n"
        "Content-Type: text/plain; charset=utf-8\n\n"
        "Gerne, Zusage für 17.\n\nVon meinem iPhone gesendet\n\n"
        "-----Ursprüngliche Nachricht-----\nVon: Praxis-Service\n"
        "Gesendet: Montag, 2. März 2026 07:30\nAn: Dr. Beispiel\nBetreff: Anfrage\n\n"
        "Guten Tag Frau Dr. Beispiel, wir suchen einen Therapieplatz für Anfrage 17.\n"
    ).encode()

    assert classify(raw).reply_text == "Gerne, Zusage für 17."


def test_an_html_only_reply_is_read_as_text_without_scripts_or_the_blockquote() -> None:
    raw = (
        b"From: a@praxis.example\nTo: antwort@x.example\nSubject: Re: Anfrage\n"
        b"MIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n"
        b"<html><head><style>p{color:red}</style><script>alert('x')</script></head><body>"
        b"<p>Absage f&uuml;r Nr. 17, tut mir leid.</p><img src='https://tracker.example/x.gif'>"
        b"<blockquote>Guten Tag Frau Dr. Beispiel, wir suchen einen Therapieplatz</blockquote>"
        b"</body></html>\n"
    )

    result = classify(raw)

    assert result.kind is MailKind.REPLY
    assert result.reply_text == "Absage für Nr. 17, tut mir leid."


def test_a_human_reply_quoting_a_delivery_failure_is_not_a_bounce() -> None:
    raw = (
        b"From: Anna Beispiel <a@praxis.example>\nTo: antwort@x.example\n"
        b"Subject: Re: Anfrage\nContent-Type: text/plain; charset=utf-8\n\n"
        b"Meine alte Adresse gibt es nicht mehr, die Mail kam zurueck mit\n"
        b"550 5.1.1 <old@praxis.example>: Recipient address rejected: User unknown\n"
        b"Bitte schreiben Sie an diese Adresse. Zusage fuer 17.\n"
    )

    result = classify(raw)

    assert result.kind is MailKind.REPLY
    assert result.status_code is None and result.failed_recipients == ()


@pytest.mark.parametrize("subject", ["Urlaub", "Abwesenheitsnotiz", "Out of office"])
def test_an_out_of_office_subject_alone_does_not_make_a_human_message_automatic(
    subject: str,
) -> None:
    raw = (
        f"From: a@praxis.example\nTo: antwort@x.example\nSubject: {subject}\n"
        "Auto-Submitted: no\n\nIch bin ab Mai wieder da und nehme dann Nr. 17.\n"
    ).encode()

    assert classify(raw).kind is MailKind.REPLY


# --- automatic answers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("exchange_ooo.eml", "Auto-Submitted: auto-generated"),
        ("gmail_ooo.eml", "Auto-Submitted: auto-replied"),
        ("outlook_ooo_legacy.eml", "subject and X-Auto-Response-Suppress"),
    ],
)
def test_an_out_of_office_answer_is_automatic_and_names_its_header(name: str, reason: str) -> None:
    result = classify(sample(name))

    assert result.kind is MailKind.AUTO_REPLY
    assert result.auto_submitted_reason == reason
    assert result.reply_text is None


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("X-Autoreply: yes", "X-Autoreply"),
        ("X-Autorespond: Urlaub", "X-Autorespond"),
        ("Precedence: bulk", "Precedence: bulk"),
        ("Precedence: auto_reply", "Precedence: auto_reply"),
        ("X-MS-Exchange-Inbox-Rules-Loop: a@praxis.example", "X-MS-Exchange-Inbox-Rules-Loop"),
        (
            "Auto-Submitted: auto-replied; owner-email=a@praxis.example",
            "Auto-Submitted: auto-replied",
        ),
        ("Auto-Submitted: \x1b[31mevil\r", "Auto-Submitted: other value"),
    ],
)
def test_each_automatic_answer_header_is_recognised(header: str, reason: str) -> None:
    raw = f"From: a@praxis.example\nTo: antwort@x.example\n{header}\nSubject: Re: x\n\nHallo\n"

    result = classify(raw.encode())

    assert result.kind is MailKind.AUTO_REPLY
    assert result.auto_submitted_reason == reason


def test_a_read_receipt_is_automatic() -> None:
    raw = (
        b"From: a@praxis.example\nTo: antwort@x.example\nSubject: Gelesen: Anfrage\n"
        b"MIME-Version: 1.0\nContent-Type: multipart/report; report-type=disposition-notification;"
        b' boundary="b"\n\n--b\nContent-Type: text/plain\n\nGelesen.\n'
        b"--b\nContent-Type: message/disposition-notification\n\n"
        b"Final-Recipient: rfc822; a@praxis.example\n"
        b"Disposition: manual-action/MDN-sent-manually; displayed\n--b--\n"
    )

    assert classify(raw).kind is MailKind.AUTO_REPLY


# --- bounces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "recipient", "diagnostic_part"),
    [
        ("postfix_bounce.eml", "a.beispeil@praxis-beispiel.example", "User unknown"),
        ("exim_bounce.eml", "therapie@praxis-nord.example", "Mailbox does not exist"),
        ("exchange_bounce.eml", "a.beispiel@praxis-beispiel.example", "RecipNotFound"),
        ("gmail_bounce.eml", "anna.beispeil.praxis@gmail.example", "does not exist"),
    ],
)
def test_a_permanent_bounce_has_its_status_recipient_and_our_message_id(
    name: str, recipient: str, diagnostic_part: str
) -> None:
    result = classify(sample(name))

    assert result.kind is MailKind.BOUNCE
    assert result.status_code == "5.1.1"
    assert result.failed_recipients == (recipient,)
    assert result.returned_message_ids == (OUR_MESSAGE_ID,)
    assert result.diagnostic is not None and diagnostic_part in result.diagnostic
    assert "\n" not in result.diagnostic and len(result.diagnostic) <= MAX_DIAGNOSTIC
    assert result.reply_text is None


def test_a_temporary_failure_is_delayed_not_a_bounce() -> None:
    result = classify(sample("postfix_delayed.eml"))

    assert result.kind is MailKind.DELAYED
    assert result.status_code == "4.4.1"
    assert result.failed_recipients == ("a.beispiel@praxis-beispiel.example",)
    assert result.returned_message_ids == (OUR_MESSAGE_ID,)
    assert result.diagnostic is not None and "Connection timed out" in result.diagnostic


def test_a_failed_action_is_permanent_even_with_a_4xx_status() -> None:
    # Postfix gives up after its queue lifetime with "Action: failed", "Status: 4.4.1".
    raw = sample("postfix_delayed.eml").replace(b"Action: delayed", b"Action: failed")

    result = classify(raw)

    assert result.kind is MailKind.BOUNCE
    assert result.status_code == "4.4.1"


def test_a_report_of_successful_delivery_is_unrelated() -> None:
    raw = sample("postfix_bounce.eml").replace(b"Action: failed", b"Action: delivered")
    raw = raw.replace(b"Status: 5.1.1", b"Status: 2.0.0")

    assert classify(raw).kind is MailKind.UNRELATED


# --- unrelated and malformed ------------------------------------------------------------


def test_a_mailing_list_message_is_unrelated_without_a_defect() -> None:
    result = classify(sample("mailing_list.eml"))

    assert result.kind is MailKind.UNRELATED
    assert result.defect is None


@pytest.mark.parametrize(
    ("name", "defect"),
    [
        ("broken_mime.eml", "broken MIME structure: NoBoundaryInMultipartDefect"),
        ("unknown_charset.eml", "unknown charset"),
    ],
)
def test_a_malformed_message_is_unrelated_with_a_one_line_reason(name: str, defect: str) -> None:
    result = classify(sample(name))

    assert result.kind is MailKind.UNRELATED
    assert result.defect == defect


def test_a_20_mb_message_is_unrelated_as_too_large_without_being_parsed() -> None:
    head = sample("thunderbird_reply.eml")
    raw = head + b"A" * (20 * 1024 * 1024)

    started = time.perf_counter()
    result = classify(raw)
    elapsed = time.perf_counter() - started

    assert result.kind is MailKind.UNRELATED
    assert result.defect is not None and result.defect.startswith("too large:")
    print(f"\n20 MB message classified in {elapsed * 1000:.1f} ms")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00" * 1000,
        bytes(range(256)) * 40,
        b"\xff\xfe\x00\x00garbage\r\n\r\n\x89PNG\r\n\x1a\n",
        b"From: \xff\xfe\n\n",
        b'From: a@b.example\nContent-Type: multipart/mixed; boundary="\xff"\n\n--\xff\n',
        b'From: a@b.example\nContent-Type: text/plain; charset="\xe9\xe9"\n\nx\xe9\n',
        b"From: a@b.example\nContent-Transfer-Encoding: base64\n\n!!!not base64!!!\n",
        b"From: a@b.example\nContent-Type: message/rfc822\n\n\x00\x01\x02",
        b"From: a@b.example\n" + b"X-Long: " + b"a" * 2_000_000 + b"\n\nbody\n",
    ],
)
def test_garbage_never_raises_and_comes_back_bounded(raw: bytes) -> None:
    _assert_bounded(classify(raw))


def test_parse_never_raises_and_refuses_what_is_too_large() -> None:
    assert parse(b"\x00\xff" * 100) is not None
    assert parse(b"x" * 11, max_bytes=10) is None
    assert parse("not bytes") is None  # type: ignore[arg-type]


# --- properties -------------------------------------------------------------------------

HEADER_NAMES = st.sampled_from(
    [
        "From",
        "To",
        "Cc",
        "Subject",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Auto-Submitted",
        "Precedence",
        "X-Autoreply",
        "Return-Path",
        "In-Reply-To",
        "References",
        "List-Id",
        "X-Failed-Recipients",
        "Content-Disposition",
        "X-Auto-Response-Suppress",
        "MIME-Version",
    ]
) | st.text(st.characters(codec="ascii", exclude_characters=":\r\n"), min_size=1, max_size=20)
HEADER_VALUES = st.sampled_from(
    [
        "multipart/report; report-type=delivery-status; boundary=b",
        "multipart/mixed; boundary=b",
        "text/plain; charset=x-unknown",
        "text/html; charset=utf-8",
        "message/rfc822",
        "base64",
        "quoted-printable",
        "auto-replied",
        "<>",
        "MAILER-DAEMON@x.example",
        "=?utf-8?q?=0D=0Aevil?=",
        "=?x-unknown?b?////?=",
    ]
) | st.text(max_size=200)


@st.composite
def header_soup(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=15))
    body = draw(
        st.sampled_from(
            [
                "--b\nContent-Type: message/delivery-status\n\nAction: failed\nStatus: 5.1.1\n"
                "Final-Recipient: rfc822; x@y.example\n--b--\n",
                "--b\nContent-Type: text/plain\n\nhallo\n--b",
                "> Am 1. März schrieb X:\n> zitat\nneu\n",
            ]
        )
        | st.text(max_size=500)
    )
    text = "".join(f"{name}: {value}\n" for name, value in headers) + "\n" + body
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_soup())
def test_any_header_soup_is_classified_without_an_exception(raw: bytes) -> None:
    _assert_bounded(classify(raw))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4000))
def test_any_bytes_are_classified_without_an_exception(raw: bytes) -> None:
    _assert_bounded(classify(raw))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(all_samples())),
    st.lists(st.tuples(st.integers(min_value=0), st.binary(max_size=40)), max_size=6),
)
def test_any_damaged_sample_is_classified_without_an_exception(
    name: str, damage: list[tuple[int, bytes]]
) -> None:
    raw = bytearray(sample(name))
    for position, garbage in damage:
        at = position % (len(raw) + 1)
        raw[at : at + len(garbage)] = garbage
    _assert_bounded(classify(bytes(raw)))


# --- rate -------------------------------------------------------------------------------


def test_classify_rate_on_the_samples_is_reported_and_results_are_stable() -> None:
    """Prints messages per second against parsing alone (the bench's baseline); asserts
    only that classifying the same bytes again gives the same result."""
    messages = list(all_samples().values())
    first = [classify(raw) for raw in messages]
    rounds = 30
    parser = email.parser.BytesParser(policy=email.policy.default)

    started = time.perf_counter()
    for _ in range(rounds):
        for raw in messages:
            parser.parsebytes(raw)
    parse_rate = rounds * len(messages) / (time.perf_counter() - started)

    started = time.perf_counter()
    for _ in range(rounds):
        again = [classify(raw) for raw in messages]
    classify_rate = rounds * len(messages) / (time.perf_counter() - started)

    assert again == first
    print(
        f"\nclassify: {classify_rate:.0f} messages/s; email parser alone: {parse_rate:.0f}"
        f" messages/s; ratio {classify_rate / parse_rate:.2f}"
    )


@pytest.mark.parametrize(
    "body",
    [b"Am " * 20000, (b"On " * 300 + b"wrote " * 30 + b"\n") * 60],
    ids=["one-60k-line-of-Am", "60-long-lines-of-On"],
)
def test_a_reply_of_pathological_long_lines_is_read_in_bounded_time(body: bytes) -> None:
    # The reply parser's patterns backtrack on long lines: the first took 17 s before
    # lines and length were bounded.
    raw = b"From: a@b.example\nSubject: Re\nContent-Type: text/plain\n\n" + body

    started = time.perf_counter()
    result = classify(raw)
    elapsed = time.perf_counter() - started

    assert result.kind is MailKind.REPLY
    assert elapsed < 5, f"took {elapsed:.1f} s"


@given(st.text(max_size=300))
def test_clean_text_keeps_exactly_the_characters_that_are_safe(text: str) -> None:
    """The ASCII fast path keeps what the per-character rule keeps, nothing else."""
    normalised = text.replace("\r\n", "\n").replace("\r", "\n")
    expected = "".join(ch for ch in normalised if _mime.is_safe_character(ch))
    assert _mime.clean_text(text) == expected
    assert not any(
        unicodedata.category(ch) in {"Cc", "Cf", "Cs"} for ch in expected if ch not in "\n\t"
    )


@pytest.mark.parametrize(
    ("header", "shown"),
    [
        (
            "=?utf-8?q?Re=3A_Anfrage_f=C3=BCr_einen_Therapieplatz?=",
            "Re: Anfrage für einen Therapieplatz",
        ),
        ("=?iso-8859-1?q?Abwesenheitsnotiz:_Gr=FC=DFe?=", "Abwesenheitsnotiz: Grüße"),
        ("Re: Anfrage\r\n für Sie", "Re: Anfrage für Sie"),
    ],
)
def test_a_subject_is_shown_decoded_and_unfolded(header: str, shown: str) -> None:
    """Parsed with compat32, a subject is still kept as it reads, not as it was encoded."""
    raw = f"From: a@b.example\r\nSubject: {header}\r\n\r\nHallo\r\n".encode()
    message = parse(raw)
    assert message is not None
    value = _mime.first_header(message, "Subject")
    assert value is not None
    assert _mime.decoded(value) == shown


# Bytes a message's header had that were not text (as surrogateescape keeps them).
_UNDECODABLE = st.sampled_from([chr(code) for code in range(0xDC80, 0xDD00)])


# (st.text leaves surrogates out, whatever its alphabet: a list of characters keeps them.)
@given(st.lists(st.one_of(st.characters(), _UNDECODABLE), max_size=300).map("".join))
def test_a_header_value_is_decoded_as_the_header_parser_reads_it(value: str) -> None:
    """The fast path for values with nothing to decode gives what the parser gives,
    undecodable bytes (surrogateescape) included."""
    try:
        expected = str(email.policy.default.header_factory("subject", value[:1000]))
    except Exception:  # then the value is kept as it is
        expected = value[:1000]
    assert _mime.decoded(value) == expected


def test_a_header_value_with_undecodable_bytes_shows_the_replacement_character() -> None:
    assert _mime.decoded("Gr\udcfc\udcdfe") == "Gr\ufffd\ufffde"


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(sorted(all_samples())),
    st.text(alphabet=st.sampled_from("abc >:\n-_Am schrieb Von: Gesendet:"), max_size=200),
)
def test_the_replies_are_split_as_the_reply_parser_splits_them(name: str, noise: str) -> None:
    """Without the signature search, the first reply is the one the library's parser
    gives: the same header, content and body with its signature."""
    message = parse(sample(name, "t0ken"))
    assert message is not None
    text = quoting._body_text(message)[0] + noise
    ours = quoting._Replies(text=text, languages=list(quoting.REPLY_LANGUAGES)).read().replies
    theirs = EmailReplyParser(languages=list(quoting.REPLY_LANGUAGES)).read(text).replies
    assert [(r.headers, r.content, r.full_body) for r in ours] == [
        (r.headers, r.content, r.full_body) for r in theirs
    ]
