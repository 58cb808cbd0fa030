"""The email templates and their renderer: pure, no database."""

from __future__ import annotations

import dataclasses
import datetime
import html
import re
import textwrap
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import css_inline
import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from comms_tasks.mail.examples import render_examples
from comms_tasks.mail.render import (
    PROJECT_ROOT,
    TEMPLATE_NAMES,
    TEMPLATES_DIR,
    TEXT_WIDTH,
    EarlierEmail,
    EmailRenderer,
    PatientEntry,
    PreinliningLoader,
    Recipient,
    RenderedEmail,
    german_date,
    greeting,
    make_environment,
    wrap_text,
)

DOCS_EMAILS = PROJECT_ROOT / "docs" / "emails"
REGENERATE = (
    '.venv/bin/python -c "from pathlib import Path; from comms_tasks.mail.examples import '
    "write_examples; write_examples(Path('docs/emails'))\""
)
HOSTILE = "<script>alert(1)</script> & mehr"

WEBER = Recipient(salutation="Frau", title="Dr.", first_name="Alex", last_name="Weber")
EARLIER = EarlierEmail(subject="Anfrage für 3 Therapieplätze", sent_on=datetime.date(2025, 3, 3))

FULL = PatientEntry(
    placement_request_id=4711,
    position=1,
    registered_on=datetime.date(2025, 1, 4),
    diagnosis="F32.1 Mittelgradige depressive Episode",
    gender="weiblich",
    time_availability="Montags ab 16 Uhr",
    symptoms_since="Herbst 2024",
    open_to_group_therapy=True,
    therapy_experience="Keine",
    current_complaints="Schlafstörungen und Grübeln",
)
PARTIAL = PatientEntry(
    placement_request_id=4712,
    position=2,
    diagnosis="F41.0 Panikstörung",
    open_to_group_therapy=False,
)
BARE = PatientEntry(placement_request_id=4713, position=3)
THREE = [FULL, PARTIAL, BARE]

FIELD_LABELS = {
    "diagnosis": "Diagnose",
    "gender": "Geschlecht",
    "time_availability": "Zeitliche Verfügbarkeit",
    "symptoms_since": "Symptome seit",
    "open_to_group_therapy": "Offen für Gruppentherapie",
    "therapy_experience": "Therapieerfahrung",
    "current_complaints": "Aktuelle Beschwerden",
}


@pytest.fixture(scope="module")
def renderer() -> EmailRenderer:
    return EmailRenderer("Therapievermittlung")


def render(
    renderer: EmailRenderer,
    template: str,
    patients: list[PatientEntry],
    recipient: Recipient = WEBER,
) -> RenderedEmail:
    return renderer.render(template, recipient, patients, earlier=EARLIER)


def flat(text: str) -> str:
    """Whitespace collapsed, so that wrapped lines compare with the value as given."""
    return " ".join(text.split())


def visible_text(body_html: str) -> str:
    """The HTML part as a reader sees it: tags removed, entities decoded."""
    return flat(html.unescape(re.sub(r"<[^>]+>", " ", body_html)))


def shown_value(value: Any) -> str:
    if isinstance(value, bool):
        return "Ja" if value else "Nein"
    return str(value)


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_every_template_renders(renderer: EmailRenderer, template: str) -> None:
    patients = [FULL] if template == "initial_contact" else THREE

    email = render(renderer, template, patients)

    assert email.subject and "\n" not in email.subject and email.subject == email.subject.strip()
    assert email.body_html.startswith("<!DOCTYPE html>")
    assert '<html lang="de">' in email.body_html
    assert "Sehr geehrte Frau Dr. Weber," in email.body_text
    assert "Sehr geehrte Frau Dr. Weber," in email.body_html
    assert "Therapievermittlung" in email.body_text and "Therapievermittlung" in email.body_html
    for body in (email.body_text, email.body_html):
        assert "{{" not in body and "{%" not in body and "\ue000" not in body
    assert "\n\n\n" not in email.body_text
    assert not re.search(r"<[a-z/!]", email.body_text), "the text part must hold no HTML"


@pytest.mark.parametrize(
    ("template", "patients", "subject"),
    [
        ("initial_contact", [FULL], "Anfrage für einen Therapieplatz"),
        ("batch_request", THREE, "Anfrage für 3 Therapieplätze"),
        # Withdrawn requests can leave a batch with one patient when it is re-rendered.
        ("batch_request", [FULL], "Anfrage für einen Therapieplatz"),
        ("follow_up", [FULL], "Re: Anfrage für 3 Therapieplätze"),
        ("follow_up", THREE, "Re: Anfrage für 3 Therapieplätze"),
        ("confirmation", [FULL], "Bestätigung Ihrer Zusage: Anfrage Nr. 4711"),
        ("confirmation", THREE, "Bestätigung Ihrer Zusagen: Anfragen Nr. 4711, 4712 und 4713"),
    ],
)
def test_subjects(
    renderer: EmailRenderer, template: str, patients: list[PatientEntry], subject: str
) -> None:
    assert render(renderer, template, patients).subject == subject


def many(count: int, first: int = 4711) -> list[PatientEntry]:
    return [
        PatientEntry(placement_request_id=first + index, position=index + 1)
        for index in range(count)
    ]


@pytest.mark.parametrize(
    ("count", "subject"),
    [
        (2, "Bestätigung Ihrer Zusagen: Anfragen Nr. 4711 und 4712"),
        (4, "Bestätigung Ihrer Zusagen: Anfragen Nr. 4711, 4712, 4713 und 4714"),
        (5, "Bestätigung Ihrer Zusagen: Anfragen Nr. 4711, 4712, 4713 und 2 weitere"),
        (100, "Bestätigung Ihrer Zusagen: Anfragen Nr. 4711, 4712, 4713 und 97 weitere"),
    ],
)
def test_a_confirmation_subject_names_at_most_four_requests(
    renderer: EmailRenderer, count: int, subject: str
) -> None:
    # The body lists every request; the subject stays a subject.
    email = render(renderer, "confirmation", many(count))

    assert email.subject == subject
    assert all(f"Anfrage Nr. {4711 + index}" in email.body_text for index in range(count))


def test_follow_up_subject_does_not_stack_prefixes(renderer: EmailRenderer) -> None:
    earlier = EarlierEmail(subject="Re: Anfrage für einen Therapieplatz", sent_on=EARLIER.sent_on)

    email = renderer.render("follow_up", WEBER, [FULL], earlier=earlier)

    assert email.subject == "Re: Anfrage für einen Therapieplatz"


def test_subject_is_one_line_whatever_the_earlier_subject(renderer: EmailRenderer) -> None:
    earlier = EarlierEmail(subject="Anfrage\r\nBcc: x@example.org\n ", sent_on=EARLIER.sent_on)

    email = renderer.render("follow_up", WEBER, [FULL], earlier=earlier)

    assert email.subject == "Re: Anfrage Bcc: x@example.org"


@pytest.mark.parametrize(
    ("recipient", "expected"),
    [
        (Recipient("Frau", "Dr.", "Alex", "Weber"), "Sehr geehrte Frau Dr. Weber"),
        (Recipient("Frau", None, "Alex", "Weber"), "Sehr geehrte Frau Weber"),
        (Recipient("Herr", "Prof. Dr.", "Jonas", "Müller"), "Sehr geehrter Herr Prof. Dr. Müller"),
        (Recipient("Herr", None, "Jonas", "Müller"), "Sehr geehrter Herr Müller"),
        (Recipient(" herr ", "", "Jonas", "Müller"), "Sehr geehrter Herr Müller"),
        (Recipient(None, "Dr.", "Alex", "Weber"), "Guten Tag Dr. Alex Weber"),
        (Recipient(None, None, "Alex", "Weber"), "Guten Tag Alex Weber"),
        (Recipient("", None, "Alex", "Weber"), "Guten Tag Alex Weber"),
    ],
)
def test_greeting(recipient: Recipient, expected: str) -> None:
    assert greeting(recipient) == expected


def test_greeting_opens_both_parts(renderer: EmailRenderer) -> None:
    recipient = Recipient(None, "Dr.", "Alex", "Weber")

    email = render(renderer, "initial_contact", [FULL], recipient)

    assert email.body_text.startswith("Guten Tag Dr. Alex Weber,\n\n")
    assert "<p" in email.body_html and ">Guten Tag Dr. Alex Weber,</p>" in email.body_html


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_every_patient_and_present_field_in_both_parts(
    renderer: EmailRenderer, template: str
) -> None:
    email = render(renderer, template, THREE)
    text, shown_html = flat(email.body_text), visible_text(email.body_html)

    for part in (text, shown_html):
        for patient in THREE:
            assert f"{patient.position}. Anfrage Nr. {patient.placement_request_id}" in part
        assert "Registriert seit 04.01.2025" in part
    for name, label in FIELD_LABELS.items():
        value = shown_value(getattr(FULL, name))
        assert f"{label}: {value}" in text
        assert f"{label} {value}" in shown_html
    assert "Diagnose: F41.0 Panikstörung" in text
    assert "Offen für Gruppentherapie: Nein" in text
    assert "Offen für Gruppentherapie Nein" in shown_html


def test_one_patient_is_not_numbered(renderer: EmailRenderer) -> None:
    email = render(renderer, "initial_contact", [FULL])

    assert "\nAnfrage Nr. 4711\n" in email.body_text
    assert "1. Anfrage" not in email.body_text
    assert "1. Anfrage" not in email.body_html


def test_patients_are_listed_by_position(renderer: EmailRenderer) -> None:
    email = render(renderer, "batch_request", list(reversed(THREE)))

    for body in (email.body_text, email.body_html):
        positions = [body.index(f"Anfrage Nr. {patient.placement_request_id}") for patient in THREE]
        assert positions == sorted(positions)


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_absent_fields_leave_no_empty_labels(renderer: EmailRenderer, template: str) -> None:
    blank = dataclasses.replace(BARE, diagnosis="   ", gender="")

    email = render(renderer, template, [blank])

    for part in (email.body_text, visible_text(email.body_html)):
        assert "Anfrage Nr. 4713" in part
        assert "Registriert seit" not in part
        for label in FIELD_LABELS.values():
            assert label not in part
    assert "<dl" not in email.body_html and "<dd" not in email.body_html
    assert "<dt" not in email.body_html


def test_html_is_escaped_and_text_is_verbatim(renderer: EmailRenderer) -> None:
    patient = dataclasses.replace(FULL, current_complaints=HOSTILE)

    email = render(renderer, "initial_contact", [patient])

    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; mehr" in email.body_html
    assert "<script" not in email.body_html
    assert f"Aktuelle Beschwerden: {HOSTILE}" in flat(email.body_text)


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_html_is_self_contained_with_inlined_css(renderer: EmailRenderer, template: str) -> None:
    body = render(renderer, template, THREE).body_html.lower()

    for resource in ("<style", "<link", "<img", "<script", "url(", "src=", "http://", "https://"):
        assert resource not in body
    assert '<body style="' in body
    assert re.search(r'<p style="[^"]*margin', body)
    assert re.search(r'<li class="patient" style="[^"]*border-left', body)


def test_umlauts_intact(renderer: EmailRenderer) -> None:
    recipient = Recipient("Herr", None, "Jörg", "Müller")

    email = render(renderer, "batch_request", THREE, recipient)

    for word in ("Müller", "Grüßen", "Verfügbarkeit", "Therapieplätze", "Schlafstörungen"):
        assert word in email.subject + email.body_text
        assert word in email.subject + email.body_html
    assert "&uuml;" not in email.body_html and "&#" not in email.body_html


def test_text_lines_are_wrapped(renderer: EmailRenderer) -> None:
    patient = dataclasses.replace(FULL, current_complaints="Sehr lange Beschwerden " * 20)

    email = render(renderer, "batch_request", [patient, PARTIAL])

    assert max(len(line) for line in email.body_text.splitlines()) <= TEXT_WIDTH
    assert "   Aktuelle Beschwerden: Sehr lange" in email.body_text
    # Continuation lines hang under the label's text.
    assert re.search(r"^ {5}Beschwerden Sehr lange", email.body_text, re.MULTILINE)


def test_german_dates_do_not_depend_on_the_locale() -> None:
    assert german_date(datetime.date(2025, 1, 4)) == "04.01.2025"
    assert german_date(datetime.date(987, 12, 31)) == "31.12.0987"


def test_unknown_template_is_refused(renderer: EmailRenderer) -> None:
    with pytest.raises(ValueError, match="unknown email template"):
        renderer.render("newsletter", WEBER, [FULL])


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_no_patients_is_refused(renderer: EmailRenderer, template: str) -> None:
    with pytest.raises(ValueError, match="at least one patient"):
        renderer.render(template, WEBER, [], earlier=EARLIER)


def test_follow_up_needs_the_earlier_email(renderer: EmailRenderer) -> None:
    with pytest.raises(ValueError, match="earlier email"):
        renderer.render("follow_up", WEBER, [FULL])


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_rendering_is_deterministic(template: str) -> None:
    first = EmailRenderer("Therapievermittlung")
    second = EmailRenderer("Therapievermittlung")

    once = render(first, template, THREE)

    assert render(first, template, THREE) == once
    assert render(second, template, THREE) == once


def test_templates_are_loaded_once_not_per_render(
    renderer: EmailRenderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = renderer.environment
    loader = environment.loader
    assert isinstance(loader, PreinliningLoader)
    loads: list[str] = []
    original = loader.get_source

    def counting_get_source(env: jinja2.Environment, name: str) -> Any:
        loads.append(name)
        return original(env, name)

    monkeypatch.setattr(loader, "get_source", counting_get_source)

    for template in TEMPLATE_NAMES:
        render(renderer, template, THREE)

    assert loads == []
    assert renderer.environment is environment


class _Styles(HTMLParser):
    """Every element in document order with its style declarations."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        style = dict(attrs).get("style") or ""
        declarations = [flat(part) for part in style.split(";") if part.strip()]
        self.elements.append((tag, declarations))


def styles_of(body_html: str) -> list[tuple[str, list[str]]]:
    parser = _Styles()
    parser.feed(body_html)
    return parser.elements


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_inlining_at_load_equals_inlining_each_email(
    renderer: EmailRenderer, template: str
) -> None:
    plain = EmailRenderer("Therapievermittlung", loader=jinja2.FileSystemLoader(TEMPLATES_DIR))
    inliner = css_inline.CSSInliner(load_remote_stylesheets=False)

    preinlined = render(renderer, template, THREE).body_html
    inlined_after = inliner.inline(render(plain, template, THREE).body_html)

    assert styles_of(preinlined) == styles_of(inlined_after)


def test_preinlining_refuses_jinja_syntax_the_parser_would_move(tmp_path: Path) -> None:
    (tmp_path / "_base").mkdir()
    (tmp_path / "_base" / "body.html").write_text(
        "<html><head><style>td { color: #000; }</style></head><body></body></html>\n"
    )
    (tmp_path / "table.html").write_text(
        "<table>{% for row in rows %}<tr><td>{{ row }}</td></tr>{% endfor %}</table>\n"
    )
    environment = make_environment(PreinliningLoader(tmp_path))

    with pytest.raises(ValueError, match="moved Jinja syntax"):
        environment.get_template("table.html")


def test_docs_examples_are_up_to_date() -> None:
    expected = render_examples()
    stale = [
        name
        for name, content in expected.items()
        if not (DOCS_EMAILS / name).is_file()
        or (DOCS_EMAILS / name).read_text(encoding="utf-8") != content
    ]
    extra = sorted({path.name for path in DOCS_EMAILS.glob("*")} - set(expected))

    assert not stale and not extra, (
        f"docs/emails is out of date (stale: {stale}, unexpected: {extra}); "
        f"regenerate with: {REGENERATE}"
    )


def test_examples_show_escaping() -> None:
    examples = render_examples()

    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; mehr" in examples["batch_request.html"]
    assert HOSTILE in examples["batch_request.txt"]
    assert examples["batch_request.txt"].startswith("Subject: Anfrage für 3 Therapieplätze\n\n")


@given(
    text=st.text(alphabet=st.sampled_from("ab cdé\t\n\r\x0b-.x\u00a0"), max_size=200),
    indent=st.sampled_from(["", "  ", "    "]),
    hanging=st.sampled_from(["", "   "]),
)
def test_wrap_text_fills_exactly_like_textwrap(text: str, indent: str, hanging: str) -> None:
    """The one-line shortcut gives what textwrap.fill gives, for every text."""
    expected = textwrap.fill(
        text.strip(),
        width=TEXT_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + hanging,
        break_long_words=False,
        break_on_hyphens=False,
    )
    if text.endswith("\n"):
        expected += "\n"
    assert wrap_text(text, indent, hanging) == expected
