"""Rendering of the therapist emails from ``templates/emails/<name>/``.

Each email is a folder with ``subject.txt``, ``body.txt`` and ``body.html``; the bodies
extend ``_base/``. :class:`EmailRenderer` builds its Jinja environment and compiles every
template once, so that rendering an email is three template calls and nothing else.

CSS is inlined once, when a template is loaded, not per email: :class:`PreinliningLoader`
hands Jinja the ``.html`` sources with the stylesheet of ``_base/body.html`` already
written into ``style`` attributes (by css_inline, with remote loading off). The rendered
HTML therefore needs no further pass, which keeps 10,000 emails cheap and means no
email ever depends on a stylesheet. A test renders every template both ways (inlined at
load, and inlined after rendering) and requires the same styles on every element.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import re
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import css_inline
import jinja2

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = PROJECT_ROOT / "templates" / "emails"
TEMPLATE_NAMES = ("initial_contact", "batch_request", "follow_up", "confirmation")
FOLLOW_UP = "follow_up"

# The document that holds the one stylesheet of all emails, in a <style> block.
STYLESHEET_TEMPLATE = "_base/body.html"
# Plain-text lines stay short enough to read in any client without reflowing.
TEXT_WIDTH = 72

# The patient summary as the therapist reads it, in this order; one list for the text
# and the HTML part, so that both always show the same fields.
PATIENT_FIELDS = (
    ("diagnosis", "Diagnose"),
    ("gender", "Geschlecht"),
    ("time_availability", "Zeitliche Verfügbarkeit"),
    ("symptoms_since", "Symptome seit"),
    ("open_to_group_therapy", "Offen für Gruppentherapie"),
    ("therapy_experience", "Therapieerfahrung"),
    ("current_complaints", "Aktuelle Beschwerden"),
)


@dataclasses.dataclass(frozen=True)
class Recipient:
    salutation: str | None  # "Frau" / "Herr" / None
    title: str | None
    first_name: str
    last_name: str


@dataclasses.dataclass(frozen=True)
class PatientEntry:
    placement_request_id: int
    position: int  # 1 = first
    registered_on: datetime.date | None = None
    diagnosis: str | None = None
    gender: str | None = None
    time_availability: str | None = None
    symptoms_since: str | None = None
    open_to_group_therapy: bool | None = None
    therapy_experience: str | None = None
    current_complaints: str | None = None


@dataclasses.dataclass(frozen=True)
class EarlierEmail:
    """The email a follow-up reminds of."""

    subject: str
    sent_on: datetime.date


@dataclasses.dataclass(frozen=True)
class RenderedEmail:
    subject: str  # one line, stripped
    body_text: str
    body_html: str


@dataclasses.dataclass(frozen=True, slots=True)
class _PatientView:
    """A patient as the templates show it: only the fields that have a value."""

    placement_request_id: int
    position: int
    registered_on: datetime.date | None
    fields: tuple[tuple[str, str], ...]


def _clean(value: str | None) -> str:
    return " ".join(value.split()) if value else ""


def greeting(recipient: Recipient) -> str:
    """The salutation line without its comma: "Sehr geehrte Frau Dr. Weber"."""
    salutation = _clean(recipient.salutation).lower()
    title = _clean(recipient.title)
    last_name = _clean(recipient.last_name)
    if salutation == "frau":
        return " ".join(part for part in ("Sehr geehrte Frau", title, last_name) if part)
    if salutation == "herr":
        return " ".join(part for part in ("Sehr geehrter Herr", title, last_name) if part)
    # No (or an unknown) salutation: address the full name, which needs no gender.
    name = (title, _clean(recipient.first_name), last_name)
    return " ".join(part for part in ("Guten Tag", *name) if part)


def german_date(value: datetime.date) -> str:
    """dd.mm.yyyy, whatever the process locale."""
    return f"{value.day:02d}.{value.month:02d}.{value.year:04d}"


def wrap_text(text: str, indent: str = "", hanging: str = "") -> str:
    """One paragraph filled to :data:`TEXT_WIDTH`; continuation lines get ``hanging`` more.

    A trailing newline is kept, so a ``{% filter %}`` block in a template keeps its line.
    """
    stripped = text.strip()
    if len(indent) + len(stripped) <= TEXT_WIDTH and not _OTHER_WHITESPACE.search(stripped):
        # Fits on one line: what textwrap would return, without its cost (most fields).
        filled = indent + stripped if stripped else ""
    else:
        filled = _wrapper(indent, hanging).fill(stripped)
    return filled + "\n" if text.endswith("\n") else filled


# textwrap turns each of these into a space; a text with one of them takes the slow path.
_OTHER_WHITESPACE = re.compile(r"[^\S ]")


@functools.cache
def _wrapper(indent: str, hanging: str) -> textwrap.TextWrapper:
    return textwrap.TextWrapper(
        width=TEXT_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + hanging,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _field_value(value: str | bool | None) -> str:
    if isinstance(value, bool):
        return "Ja" if value else "Nein"
    return _clean(value)


def _patient_view(entry: PatientEntry) -> _PatientView:
    fields = tuple(
        (label, shown)
        for name, label in PATIENT_FIELDS
        if (shown := _field_value(getattr(entry, name)))
    )
    return _PatientView(entry.placement_request_id, entry.position, entry.registered_on, fields)


class PreinliningLoader(jinja2.FileSystemLoader):
    """Serves ``.html`` templates with the shared stylesheet already inlined.

    css_inline parses HTML, so the Jinja syntax of a template is first swapped for inert
    placeholders (private-use characters around a number) and put back afterwards. The
    base document is inlined as a whole, which also drops its <style> block; every other
    ``.html`` template is a fragment and gets the same CSS. This is only equivalent to
    inlining the finished email when the selectors do not reach across templates, so the
    stylesheet uses element and class selectors only (checked by a test).
    """

    _JINJA_SYNTAX = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)
    _PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
    _STYLE_BLOCK = re.compile(r"<style[^>]*>(.*?)</style>", re.DOTALL | re.IGNORECASE)

    def __init__(self, searchpath: Path, stylesheet_template: str = STYLESHEET_TEMPLATE) -> None:
        super().__init__(searchpath, encoding="utf-8")
        # One inliner for all templates; nothing is ever fetched from the network.
        self._inliner = css_inline.CSSInliner(
            load_remote_stylesheets=False, keep_style_tags=False, keep_link_tags=False
        )
        self._stylesheet_template = stylesheet_template
        base_source = (Path(searchpath) / stylesheet_template).read_text(encoding="utf-8")
        styles = self._STYLE_BLOCK.findall(base_source)
        if not styles:
            raise ValueError(f"{stylesheet_template} has no <style> block")
        self._css = "\n".join(styles)

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        if template.endswith(".html"):
            source = self._preinline(template, source)
        return source, filename, uptodate

    def _preinline(self, template: str, source: str) -> str:
        if "\ue000" in source or "\ue001" in source:
            raise ValueError(f"{template}: contains the placeholder characters U+E000/U+E001")
        syntax: list[str] = []

        def hide(match: re.Match[str]) -> str:
            syntax.append(match.group(0))
            return f"\ue000{len(syntax) - 1}\ue001"

        hidden = self._JINJA_SYNTAX.sub(hide, source)
        if template == self._stylesheet_template:
            inlined = self._inliner.inline(hidden)
        else:
            inlined = self._inliner.inline_fragment(hidden, self._css)
        # The HTML parser may move text it finds in the wrong place (e.g. inside a
        # <table>); a Jinja tag moved would change the template's meaning, so refuse.
        order = [int(number) for number in self._PLACEHOLDER.findall(inlined)]
        if order != list(range(len(syntax))):
            raise ValueError(
                f"{template}: the HTML parser moved Jinja syntax while inlining CSS; "
                "keep template tags where text is allowed (no tags between table rows)"
            )
        restored = self._PLACEHOLDER.sub(lambda match: syntax[int(match.group(1))], inlined)
        if source.endswith("\n") and not restored.endswith("\n"):
            restored += "\n"
        return restored


def make_environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    """The Jinja environment of the emails: HTML autoescaped, undefined names fail."""
    environment = jinja2.Environment(
        loader=loader,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        # Templates are compiled once at start-up; never stat the files again.
        auto_reload=False,
    )
    environment.filters["german_date"] = german_date
    environment.filters["wrap"] = wrap_text
    return environment


@dataclasses.dataclass(frozen=True)
class _EmailTemplates:
    subject: jinja2.Template
    body_text: jinja2.Template
    body_html: jinja2.Template


class EmailRenderer:
    """Renders the emails of :data:`TEMPLATE_NAMES`; build one and reuse it."""

    def __init__(
        self,
        sender_name: str,
        templates_dir: Path = TEMPLATES_DIR,
        *,
        loader: jinja2.BaseLoader | None = None,
    ) -> None:
        """``loader`` replaces the :class:`PreinliningLoader` of ``templates_dir``; the
        tests use a plain loader to compare with inlining after rendering."""
        self.sender_name = sender_name
        self.environment = make_environment(loader or PreinliningLoader(templates_dir))
        self._templates = {
            name: _EmailTemplates(
                subject=self.environment.get_template(f"{name}/subject.txt"),
                body_text=self.environment.get_template(f"{name}/body.txt"),
                body_html=self.environment.get_template(f"{name}/body.html"),
            )
            for name in TEMPLATE_NAMES
        }

    def render(
        self,
        template: str,
        recipient: Recipient,
        patients: Sequence[PatientEntry],
        *,
        earlier: EarlierEmail | None = None,
    ) -> RenderedEmail:
        templates = self._templates.get(template)
        if templates is None:
            raise ValueError(f"unknown email template {template!r}")
        if not patients:
            raise ValueError(f"email {template!r} needs at least one patient")
        if template == FOLLOW_UP and earlier is None:
            raise ValueError("a follow_up email needs the earlier email it refers to")
        context = {
            "greeting": greeting(recipient),
            "sender_name": self.sender_name,
            "patients": [
                _patient_view(entry) for entry in sorted(patients, key=lambda p: p.position)
            ],
            "earlier": earlier,
        }
        # Collapsing all whitespace also removes every line break: no header injection.
        subject = " ".join(templates.subject.render(context).split())
        context["subject"] = subject
        return RenderedEmail(
            subject=subject,
            body_text=templates.body_text.render(context),
            body_html=templates.body_html.render(context),
        )
