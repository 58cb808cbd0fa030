"""A rendered example of every email, checked into ``docs/emails/``.

The examples are invented (no real therapist or patient); one complaint looks like HTML
to show that it is escaped in the HTML part and left as written in the text part. A test
compares ``docs/emails/`` with :func:`render_examples`, so the files never go stale.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from comms_tasks.mail.render import (
    TEMPLATE_NAMES,
    EarlierEmail,
    EmailRenderer,
    PatientEntry,
    Recipient,
)

# The default of COMMS_SENDER_NAME; fixed here so that the examples do not depend on
# the environment they are generated in.
EXAMPLE_SENDER_NAME = "Therapievermittlung"

_DEPRESSION = PatientEntry(
    placement_request_id=4711,
    position=1,
    registered_on=datetime.date(2025, 1, 14),
    diagnosis="F32.1 Mittelgradige depressive Episode",
    gender="weiblich",
    time_availability="Montags und mittwochs ab 16 Uhr, freitags ganztägig",
    symptoms_since="Herbst 2024",
    open_to_group_therapy=True,
    therapy_experience="Keine",
    current_complaints=(
        "Gedrückte Stimmung, Schlafstörungen und Antriebslosigkeit; zieht sich von "
        "Freundeskreis und Familie zurück und schafft den Arbeitsalltag kaum noch."
    ),
)
_PANIC = PatientEntry(
    placement_request_id=4735,
    position=2,
    registered_on=datetime.date(2025, 2, 2),
    diagnosis="F41.0 Panikstörung",
    gender="männlich",
    time_availability="Werktags vor 9 Uhr oder nach 17 Uhr",
    symptoms_since="2023",
    open_to_group_therapy=False,
    therapy_experience="Verhaltenstherapie 2019 (25 Sitzungen)",
    current_complaints="Panikattacken in Bus & Bahn <script>alert(1)</script> & mehr",
)
_SPARSE = PatientEntry(
    placement_request_id=4790,
    position=3,
    diagnosis="F43.1 Posttraumatische Belastungsstörung",
    gender="divers",
    time_availability="Flexibel",
)

EXAMPLES: dict[str, tuple[Recipient, list[PatientEntry], EarlierEmail | None]] = {
    "initial_contact": (
        Recipient(salutation="Frau", title="Dr.", first_name="Anna", last_name="Weber"),
        [_DEPRESSION],
        None,
    ),
    "batch_request": (
        Recipient(salutation="Herr", title=None, first_name="Jonas", last_name="Müller"),
        [_DEPRESSION, _PANIC, _SPARSE],
        None,
    ),
    "follow_up": (
        Recipient(salutation=None, title="Dr.", first_name="Alex", last_name="Schäfer"),
        # Two of the three requests of the earlier email are still open.
        [_DEPRESSION, dataclasses.replace(_SPARSE, position=2)],
        EarlierEmail(subject="Anfrage für 3 Therapieplätze", sent_on=datetime.date(2025, 3, 3)),
    ),
    "confirmation": (
        Recipient(salutation="Frau", title="Dr.", first_name="Miriam", last_name="Özdemir"),
        [_PANIC],
        None,
    ),
}


def render_examples() -> dict[str, str]:
    """File name (relative to ``docs/emails/``) -> content, for every template."""
    renderer = EmailRenderer(EXAMPLE_SENDER_NAME)
    files: dict[str, str] = {}
    for name in TEMPLATE_NAMES:
        recipient, patients, earlier = EXAMPLES[name]
        email = renderer.render(name, recipient, patients, earlier=earlier)
        files[f"{name}.html"] = email.body_html
        files[f"{name}.txt"] = f"Subject: {email.subject}\n\n{email.body_text}"
    return files


def write_examples(folder: Path) -> list[Path]:
    """Write the examples into ``folder`` and return the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render_examples().items():
        path = folder / name
        path.write_text(content, encoding="utf-8", newline="")
        written.append(path)
    return written
