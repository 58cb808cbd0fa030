"""``comms``, the operators' console, run as the installed script in a real subprocess.

The data is built in this process on the committed test database: read-model rows written
directly, emails queued by the weekly batch with an explicit ``now``, dead letters kept by
the inbox; the command then reads and changes the same database from its own process.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from comms_tasks.db import transaction
from comms_tasks.emails import weekly
from comms_tasks.inbound.inbox import handle
from comms_tasks.mail.examples import render_examples
from comms_tasks.models import (
    DeadLetter,
    DeadLetterStatus,
    Email,
    EmailBatch,
    EmailStatus,
    OutboxEvent,
    Patient,
    PhoneCall,
    PhoneCallStatus,
    PlacementRequest,
    PlacementRequestStatus,
    TherapistStatus,
)
from comms_tasks.settings import get_settings
from comms_tasks.task_names import HANDLE_MATCHING_EVENT
from tests import factories as f
from tests.conftest import worker_environment

COMMS = Path(sys.executable).parent / "comms"
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
MARKER = "PLANTED-DIAGNOSIS-c11e"

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def comms(committed_db: Engine, committed_url: str, tmp_path: Path) -> Run:
    """Run ``comms ARGS...`` against the committed database; returns the finished process."""
    env = worker_environment(COMMS_DATABASE_URL=committed_url, COMMS_VAR_DIR=str(tmp_path))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(COMMS), *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def json_of(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], message: str, code: int = 1
) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr == f"error: {message}\n"


# --- building data ----------------------------------------------------------------------


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def therapist(therapist_id: int, **overrides: Any) -> None:
    with transaction() as session:
        f.make_therapist(session, therapist_id, **overrides)


def request(
    request_id: int,
    therapist_id: int,
    registered_on: dt.date | None = dt.date(2026, 9, 1),
    status: PlacementRequestStatus = PlacementRequestStatus.OPEN,
    diagnosis: str = "F32.1 Mittelgradige depressive Episode",
) -> None:
    """An open request of a patient with a summary, as the read model keeps them."""
    at = now()
    with transaction() as session:
        session.add(
            Patient(
                id=10_000 + request_id,
                registered_on=registered_on,
                diagnosis=diagnosis,
                gender="weiblich",
                time_availability="Montags ab 16 Uhr",
                symptoms_since="seit etwa 8 Monaten",
                open_to_group_therapy=True,
                therapy_experience="Keine",
                current_complaints="Antriebslosigkeit und Schlafstörungen.",
                summary_event_at=at,
            )
        )
        session.add(
            PlacementRequest(
                id=request_id,
                patient_id=10_000 + request_id,
                therapist_id=therapist_id,
                status=status,
                created_at=at - dt.timedelta(days=30) + dt.timedelta(minutes=request_id),
                last_event_at=at,
            )
        )


def run_batch(at: dt.datetime) -> list[int]:
    with transaction() as session:
        candidates = weekly.batch_candidates(session)
    with transaction() as session:
        return weekly.batch_chunk(session, candidates, at, get_settings()).email_ids


def queue_email(therapist_id: int, request_ids: list[int], **therapist_fields: Any) -> int:
    """One therapist, these requests, and the batch email asking about them (queued)."""
    therapist(therapist_id, **therapist_fields)
    for request_id in request_ids:
        request(request_id, therapist_id)
    [email_id] = run_batch(now() - dt.timedelta(minutes=1))
    return email_id


def change_email(engine: Engine, email_id: int, **values: Any) -> None:
    with Session(engine) as session, session.begin():
        row = session.get(Email, email_id)
        assert row is not None
        for key, value in values.items():
            setattr(row, key, value)


def email_row(engine: Engine, email_id: int) -> Email:
    with Session(engine, expire_on_commit=False) as session:
        row = session.get(Email, email_id)
        assert row is not None
        return row


def row_counts(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        return {
            model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Email, EmailBatch, OutboxEvent)
        }


def never_applied(_session: Session, message: Any) -> None:
    raise AssertionError(f"{message} was valid")


def dead_letter(raw: Any) -> int:
    """A malformed message as the inbox keeps it."""
    outcome = handle(HANDLE_MATCHING_EVENT, raw, never_applied)
    assert outcome.result == "dead_letter", outcome
    assert outcome.dead_letter_id is not None
    return outcome.dead_letter_id


def table_rows(output: str) -> dict[str, str]:
    """The two-column body rows of a Rich table: first cell -> second cell."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")]
        if len(cells) == 4:
            rows[cells[1]] = cells[2]
    return rows


# --- status -----------------------------------------------------------------------------


def test_status_counts_everything_in_a_stable_shape(comms: Run, committed_db: Engine) -> None:
    therapist(1)
    therapist(2, status=TherapistStatus.BLOCKED)
    therapist(3, status=TherapistStatus.INACTIVE)
    therapist(4, deleted_at=now())
    request(11, 1)
    request(12, 1)
    request(21, 2, status=PlacementRequestStatus.CANCELLED)
    request(41, 4)
    [email_id] = run_batch(now() - dt.timedelta(minutes=10))
    first = dead_letter(f.request_created(91, therapist_id="one"))
    dead_letter(f.request_created(92, therapist_id="two"))
    with Session(committed_db) as session, session.begin():
        letter = session.get(DeadLetter, first)
        assert letter is not None
        letter.status = DeadLetterStatus.REPLAYED
        for number, state in enumerate([PhoneCallStatus.SCHEDULED, PhoneCallStatus.COMPLETED]):
            at = now() + dt.timedelta(days=number + 1)
            session.add(
                PhoneCall(
                    therapist_id=3,
                    dedup_key=f"test:{number}",
                    scheduled_date=at.astimezone(BERLIN).date(),
                    scheduled_time=at.astimezone(BERLIN).time().replace(microsecond=0),
                    scheduled_at=at,
                    status=state,
                )
            )
        outbox = session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))
        )
    assert outbox == 1  # the email.queued event

    snapshot = json_of(comms("status", "--json"))

    age = snapshot.pop("oldest_queued_email_age_seconds")
    assert 600 <= age <= 660, age
    assert snapshot == {
        "therapists": {"active": 1, "blocked": 1, "inactive": 1},
        "placement_requests": {
            "open": 3,
            "in_progress": 0,
            "accepted": 0,
            "rejected": 0,
            "cancelled": 1,
        },
        "emails": {
            "draft": 0,
            "queued": 1,
            "sending": 0,
            "sent": 0,
            "failed": 0,
            "cancelled": 0,
        },
        "phone_calls": {"scheduled": 1, "completed": 1, "failed": 0, "cancelled": 0},
        "retries_due": 0,
        "retries_waiting": 0,
        "outbox_pending": outbox,
        "dead_letters_pending": 1,
        "mailbox": {
            "unmatched": 0,
            "to_review": 0,
            "last_poll_at": None,
            "last_poll_error": None,
        },
        "last_runs": {
            name: {"last_finished_at": None, "last_state": None}
            for name in (
                "comms.batch_requests",
                "comms.follow_up_check",
                "comms.poll_mailbox",
                "comms.purge_expired",
                "comms.relay_outbox",
                "comms.send_email",
            )
        },
    }
    assert email_row(committed_db, email_id).status is EmailStatus.QUEUED

    rows = table_rows(ok(comms("status")))
    for group in ("therapists", "placement_requests", "emails", "phone_calls"):
        for state, count in snapshot[group].items():
            assert rows[f"{group.replace('_', ' ')}: {state}"] == str(count), (group, state)
    assert rows["outbox pending"] == str(outbox)
    assert rows["dead letters pending"] == "1"
    table_age = rows["oldest queued email"]
    assert table_age.endswith(" s")
    assert age <= int(table_age.removesuffix(" s")) <= age + 30


def test_status_of_an_empty_database_has_the_same_keys(comms: Run) -> None:
    snapshot = json_of(comms("status", "--json"))
    assert list(snapshot) == [
        "therapists",
        "placement_requests",
        "emails",
        "phone_calls",
        "oldest_queued_email_age_seconds",
        "retries_due",
        "retries_waiting",
        "outbox_pending",
        "dead_letters_pending",
        "mailbox",
        "last_runs",
    ]
    assert snapshot["oldest_queued_email_age_seconds"] is None
    assert snapshot["emails"]["queued"] == 0
    assert snapshot["outbox_pending"] == 0
    assert snapshot["dead_letters_pending"] == 0
    assert table_rows(ok(comms("status")))["oldest queued email"] == "-"


# --- emails list / show ---------------------------------------------------------------------


def test_emails_list_filters_by_status_therapist_and_limit(
    comms: Run, committed_db: Engine
) -> None:
    for therapist_id in (1, 2, 3):
        therapist(therapist_id)
        request(therapist_id * 10, therapist_id)
    first, second, third = run_batch(now() - dt.timedelta(minutes=1))
    change_email(committed_db, second, status=EmailStatus.FAILED, error_message="550 no such user")

    listed = json_of(comms("emails", "list", "--json"))
    assert [(e["id"], e["therapist_id"], e["status"]) for e in listed] == [
        (third, 3, "queued"),
        (second, 2, "failed"),
        (first, 1, "queued"),
    ]
    assert listed[1]["error_message"] == "550 no such user"
    assert listed[2]["template"] == "initial_contact"
    assert listed[2]["subject"] == "Anfrage für einen Therapieplatz"
    assert listed[2]["recipient"] == "praxis1@weber-therapie.de"

    queued = json_of(comms("emails", "list", "--status", "queued", "--json"))
    assert [e["id"] for e in queued] == [third, first]
    assert [e["id"] for e in json_of(comms("emails", "list", "--therapist", "2", "--json"))] == [
        second
    ]
    assert [e["id"] for e in json_of(comms("emails", "list", "--limit", "1", "--json"))] == [third]


def test_emails_list_rejects_an_unknown_status_in_one_line(comms: Run) -> None:
    result = comms("emails", "list", "--status", "posted", "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: --status: ")
    assert "queued" in line and "failed" in line


def test_emails_show_lists_its_requests_and_prints_the_body(
    comms: Run, committed_db: Engine
) -> None:
    therapist(5)
    request(51, 5, registered_on=dt.date(2026, 10, 1))
    request(52, 5, registered_on=None)
    request(53, 5, registered_on=dt.date(2026, 8, 1), diagnosis=MARKER)
    [email_id] = run_batch(now() - dt.timedelta(minutes=1))
    with Session(committed_db) as session, session.begin():
        withdrawn = session.scalars(
            select(EmailBatch).where(EmailBatch.placement_request_id == 51)
        ).one()
        withdrawn.included = False

    shown = json_of(comms("emails", "show", str(email_id), "--json"))
    assert shown["id"] == email_id
    assert shown["therapist_id"] == 5
    assert shown["template"] == "batch_request"
    assert shown["subject"] == "Anfrage für 3 Therapieplätze"
    assert shown["requests"] == [
        {"placement_request_id": 53, "priority": 1, "included": True, "response_outcome": None},
        {"placement_request_id": 51, "priority": 2, "included": False, "response_outcome": None},
        {"placement_request_id": 52, "priority": 3, "included": True, "response_outcome": None},
    ]
    assert "body_text" not in shown

    stored = email_row(committed_db, email_id).body_text
    printed = ok(comms("emails", "show", str(email_id), "--body"))
    assert "Anfrage für 3 Therapieplätze" in printed
    assert MARKER in printed
    assert stored.strip() in printed
    assert printed.index("Anfrage Nr. 53") < printed.index("Anfrage Nr. 51")
    without_body = ok(comms("emails", "show", str(email_id)))
    assert MARKER not in without_body
    assert "withdrawn" in without_body


def test_emails_show_of_an_unknown_id_fails_in_one_line(comms: Run) -> None:
    assert_one_line_error(comms("emails", "show", "4242"), "email 4242 does not exist")
    assert_one_line_error(comms("emails", "show", "4242", "--json"), "email 4242 does not exist")


# --- emails retry / cancel --------------------------------------------------------------------


def test_retry_queues_a_failed_email_with_fresh_attempts(comms: Run, committed_db: Engine) -> None:
    email_id = queue_email(6, [61, 62])
    change_email(
        committed_db,
        email_id,
        status=EmailStatus.FAILED,
        retry_count=8,
        next_attempt_at=None,
        error_message="451 4.3.0 Try again later",
    )
    before = now()

    result = json_of(comms("emails", "retry", str(email_id), "--json"))

    assert result["status"] == "queued"
    assert result["retry_count"] == 0
    row = email_row(committed_db, email_id)
    assert row.status is EmailStatus.QUEUED
    assert row.retry_count == 0
    assert row.next_attempt_at is not None
    assert before - dt.timedelta(seconds=1) <= row.next_attempt_at <= now()
    assert dt.datetime.fromisoformat(result["next_attempt_at"]) == row.next_attempt_at


def test_retry_of_a_sent_email_fails_in_one_line(comms: Run, committed_db: Engine) -> None:
    email_id = queue_email(7, [71])
    sent_at = now() - dt.timedelta(hours=1)
    change_email(committed_db, email_id, status=EmailStatus.SENT, sent_at=sent_at)

    assert_one_line_error(
        comms("emails", "retry", str(email_id)),
        f"email {email_id} is sent; only failed or queued retry",
    )
    row = email_row(committed_db, email_id)
    assert row.status is EmailStatus.SENT
    assert row.sent_at == sent_at


def test_cancel_a_queued_email_but_not_a_sent_one(comms: Run, committed_db: Engine) -> None:
    queued = queue_email(8, [81])
    sent = queue_email(9, [91])
    change_email(committed_db, sent, status=EmailStatus.SENT, sent_at=now())

    assert ok(comms("emails", "cancel", str(queued))).strip() == (
        f"email {queued} cancelled: now cancelled"
    )
    row = email_row(committed_db, queued)
    assert row.status is EmailStatus.CANCELLED
    assert row.next_attempt_at is None

    assert_one_line_error(
        comms("emails", "cancel", str(sent)),
        f"email {sent} is sent; it can no longer be cancelled",
    )
    assert email_row(committed_db, sent).status is EmailStatus.SENT


def test_retry_and_cancel_of_an_unknown_email_fail_in_one_line(comms: Run) -> None:
    assert_one_line_error(comms("emails", "retry", "777"), "email 777 does not exist")
    assert_one_line_error(comms("emails", "cancel", "777"), "email 777 does not exist")


# --- explain therapist ----------------------------------------------------------------------


def open_three_requests(therapist_id: int) -> list[int]:
    """Three requests whose batch order (oldest registration first, none last) is not id order."""
    base = therapist_id * 10
    request(base + 1, therapist_id, registered_on=dt.date(2026, 10, 1))
    request(base + 2, therapist_id, registered_on=None)
    request(base + 3, therapist_id, registered_on=dt.date(2026, 8, 1))
    return [base + 3, base + 1, base + 2]


def test_explain_a_contactable_therapist_with_waiting_requests(comms: Run) -> None:
    therapist(12)
    order = open_three_requests(12)

    data = json_of(comms("explain", "therapist", "12", "--json"))

    assert data == {
        "therapist_id": 12,
        "contactable": True,
        "reason": None,
        "contactable_from": None,
        "requests_waiting": order,
        "next_template": "batch_request",
    }
    assert ok(comms("explain", "therapist", "12")).strip() == (
        "therapist 12 is contactable: the next batch asks about requests "
        f"{order[0]}, {order[1]}, {order[2]} (batch_request)"
    )


def test_explain_a_therapist_whose_email_is_queued(comms: Run) -> None:
    therapist(13)
    open_three_requests(13)
    run_batch(now() - dt.timedelta(minutes=1))
    request(139, 13)  # arrived after the batch: waits for next week

    data = json_of(comms("explain", "therapist", "13", "--json"))

    assert data["contactable"] is False
    assert "queued" in data["reason"]
    assert data["contactable_from"] is None
    assert data["requests_waiting"] == [139]
    assert data["next_template"] == "initial_contact"
    human = ok(comms("explain", "therapist", "13")).strip()
    assert human.startswith("therapist 13 is not contactable: ")
    assert "queued" in human


def test_explain_a_therapist_emailed_two_days_ago_names_the_day_contact_is_possible(
    comms: Run, committed_db: Engine
) -> None:
    therapist(14)
    open_three_requests(14)
    [email_id] = run_batch(now() - dt.timedelta(days=2, minutes=5))
    sent_at = now() - dt.timedelta(days=2)
    change_email(committed_db, email_id, status=EmailStatus.SENT, sent_at=sent_at)
    request(149, 14)
    # Emailed on local day D: any batch run on day D + 7 may email them, whatever the minute.
    again = sent_at.astimezone(BERLIN).date() + dt.timedelta(days=7)

    data = json_of(comms("explain", "therapist", "14", "--json"))

    assert data["contactable"] is False
    assert "7 days" in data["reason"]
    assert f"{sent_at.astimezone(BERLIN):%Y-%m-%d}" in data["reason"]
    assert data["contactable_from"] == again.isoformat()
    assert "contactable_from_local" not in data
    assert data["requests_waiting"] == [149]
    human = ok(comms("explain", "therapist", "14")).strip()
    assert "therapist 14 is not contactable" in human
    assert "7 days" in human
    assert human.endswith(f"contactable again from {again:%Y-%m-%d}")


def test_explain_a_blocked_therapist(comms: Run) -> None:
    therapist(15, status=TherapistStatus.BLOCKED)
    open_three_requests(15)

    data = json_of(comms("explain", "therapist", "15", "--json"))

    assert data["contactable"] is False
    assert data["reason"] == "status is blocked"
    assert data["contactable_from"] is None
    assert ok(comms("explain", "therapist", "15")).strip() == (
        "therapist 15 is not contactable: status is blocked"
    )


def test_explain_an_unknown_therapist_fails_in_one_line(comms: Run) -> None:
    assert_one_line_error(
        comms("explain", "therapist", "999", "--json"), "therapist 999 is not known"
    )


# --- preview therapist ------------------------------------------------------------------------


def test_preview_renders_the_next_email_and_stores_nothing(
    comms: Run, committed_db: Engine
) -> None:
    therapist(16, salutation="Herr", first_name="Jürgen", last_name="Weiß")
    request(161, 16, registered_on=dt.date(2026, 10, 1))
    request(162, 16, registered_on=dt.date(2026, 8, 1), diagnosis=MARKER)
    before = row_counts(committed_db)
    assert before["emails"] == 0

    data = json_of(comms("preview", "therapist", "16", "--json"))

    assert data["therapist_id"] == 16
    assert data["contactable"] is True
    assert data["template"] == "batch_request"
    assert data["placement_request_ids"] == [162, 161]
    assert data["subject"] == "Anfrage für 2 Therapieplätze"
    assert "Sehr geehrter Herr Dr. Weiß," in data["body_text"]
    body = data["body_text"]
    assert MARKER in body
    assert body.index("Anfrage Nr. 162") < body.index("Anfrage Nr. 161")
    assert "Anfrage Nr. 162" in data["body_html"]

    human = ok(comms("preview", "therapist", "16"))
    assert human.startswith("Subject: Anfrage für 2 Therapieplätze\n")
    assert "Anfrage Nr. 161" in human
    assert row_counts(committed_db) == before

    # What the preview showed is what the batch then queues.
    [email_id] = run_batch(now())
    queued = email_row(committed_db, email_id)
    assert queued.subject == data["subject"]
    assert queued.body_text == data["body_text"]


def test_preview_without_a_waiting_request_fails(comms: Run) -> None:
    therapist(17)
    assert_one_line_error(
        comms("preview", "therapist", "17", "--json"),
        "therapist 17 has no request waiting for an email",
    )
    assert_one_line_error(comms("preview", "therapist", "999"), "therapist 999 is not known")


# --- dead letters -----------------------------------------------------------------------------


def test_dead_letter_show_masks_patient_values_unless_revealed(comms: Run) -> None:
    event = f.request_created(
        31, therapist_id="not-a-number", diagnosis=MARKER, current_complaints=MARKER
    )
    letter_id = dead_letter(event)

    masked = ok(comms("dead-letters", "show", str(letter_id)))
    assert MARKER not in masked
    assert "***" in masked
    assert event["event_id"] in masked

    data = json_of(comms("dead-letters", "show", str(letter_id), "--json"))
    assert data["id"] == letter_id
    assert data["status"] == "pending"
    # The shape stays readable; every value of the summary is masked.
    patient = data["payload"]["payload"]["patient"]
    assert patient and set(patient.values()) == {"***"}
    assert data["payload"]["payload"]["placement_request_id"] == 31
    assert MARKER not in json.dumps(data)

    revealed = ok(comms("dead-letters", "show", str(letter_id), "--reveal"))
    assert MARKER in revealed
    revealed_json = json_of(comms("dead-letters", "show", str(letter_id), "--reveal", "--json"))
    assert revealed_json["payload"] == event


def test_dead_letter_show_of_an_unknown_id_fails_in_one_line(comms: Run) -> None:
    assert_one_line_error(
        comms("dead-letters", "show", "31337"), "dead letter 31337 does not exist"
    )


@pytest.mark.parametrize("shape", ["renamed_key", "json_string"])
def test_dead_letter_show_masks_patient_data_in_any_malformed_shape(comms: Run, shape: str) -> None:
    event = f.request_created(32, diagnosis=MARKER)
    if shape == "renamed_key":
        event["payload"]["patient_summary"] = event["payload"].pop("patient")
        raw: Any = event
    else:
        raw = json.dumps(event)
    letter_id = dead_letter(raw)

    shown = ok(comms("dead-letters", "show", str(letter_id), "--json"))

    assert MARKER not in shown


def erase_through_the_inbox(patient_id: int) -> None:
    from comms_tasks.appliers import APPLIERS
    from comms_tasks.task_names import HANDLE_PATIENT_EVENT

    erased = f.patient_erased(patient_id, occurred_at=f.at(60))
    assert handle(HANDLE_PATIENT_EVENT, erased, APPLIERS[HANDLE_PATIENT_EVENT]).result == "applied"


def test_a_redacted_dead_letter_shows_the_marker_and_is_not_replayed(
    comms: Run, committed_db: Engine
) -> None:
    event = f.request_created(33, patient_id=533, therapist_id="one", diagnosis=MARKER)
    letter_id = dead_letter(event)
    erase_through_the_inbox(533)

    revealed = json_of(comms("dead-letters", "show", str(letter_id), "--reveal", "--json"))
    assert MARKER not in json.dumps(revealed)
    assert revealed["payload"]["payload"]["patient"]["diagnosis"] == "[redacted]"
    assert revealed["payload"]["event_id"] == event["event_id"]
    assert revealed["payload_redacted_at"] is not None
    assert "[redacted]" in ok(comms("dead-letters", "show", str(letter_id), "--reveal"))

    result = comms("dead-letters", "replay", str(letter_id))
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(f"error: dead letter {letter_id}: its message was redacted")
    assert len(result.stderr.splitlines()) == 1
    assert json_of(comms("dead-letters", "replay", "--all", "--json")) == []
    with Session(committed_db) as session:
        letter = session.get(DeadLetter, letter_id)
        assert letter is not None
        assert (letter.status, letter.replay_count) == (DeadLetterStatus.PENDING, 0)
        assert session.get(PlacementRequest, 33) is None


def test_purge_expired_redacts_old_dead_letters_too(comms: Run, committed_db: Engine) -> None:
    from sqlalchemy import update

    letter_id = dead_letter(f.request_created(34, therapist_id="one", diagnosis=MARKER))
    long_ago = now() - dt.timedelta(days=get_settings().retention_days + 1)
    with Session(committed_db) as session, session.begin():
        session.execute(
            update(DeadLetter).where(DeadLetter.id == letter_id).values(received_at=long_ago)
        )

    assert json_of(comms("purge-expired", "--json")) == {
        "redacted": 0,
        "dead_letters_redacted": 1,
        "calls_redacted": 0,
        "status_reasons_redacted": 0,
        "mail_redacted": 0,
        "outbox_files_removed": 0,
    }
    printed = ok(comms("purge-expired"))
    assert "0 email bodies" in printed and "0 dead letters" in printed
    shown = json_of(comms("dead-letters", "show", str(letter_id), "--reveal", "--json"))
    assert MARKER not in json.dumps(shown)


# --- examples -------------------------------------------------------------------------------


def test_emails_examples_writes_eight_files(comms: Run, tmp_path: Path) -> None:
    folder = tmp_path / "examples"
    printed = ok(comms("emails", "examples", "--dir", str(folder)))
    assert printed.strip() == f"wrote 8 files to {folder}"
    names = sorted(path.name for path in folder.iterdir())
    assert names == sorted(
        f"{template}.{suffix}"
        for template in ("initial_contact", "batch_request", "follow_up", "confirmation")
        for suffix in ("txt", "html")
    )
    expected = render_examples()
    for name in names:
        assert (folder / name).read_text(encoding="utf-8") == expected[name]
    assert (
        (folder / "batch_request.txt")
        .read_text(encoding="utf-8")
        .startswith("Subject: Anfrage für 3 Therapieplätze\n")
    )


# --- strangers' text is shown, never interpreted ------------------------------------------

MARKUP = ("[/x]", "[bold]", "[link=https://evil.example]", ":thumbs_up:")


def test_markup_in_stored_values_is_shown_as_written(comms: Run, committed_db: Engine) -> None:
    from comms_tasks.models import PhoneCallBatch

    therapist(1, last_name="Weber [/x]", title="[bold]")
    request(1, 1, diagnosis="F32.1 [link=https://evil.example]x :thumbs_up:")
    [email_id] = run_batch(now() - dt.timedelta(minutes=1))
    at = now()
    with transaction() as session:
        call = PhoneCall(
            therapist_id=1,
            dedup_key="test:markup",
            scheduled_date=at.astimezone(BERLIN).date(),
            scheduled_time=at.astimezone(BERLIN).time().replace(microsecond=0),
            scheduled_at=at,
            status=PhoneCallStatus.SCHEDULED,
        )
        session.add(call)
        session.flush()
        session.add(PhoneCallBatch(phone_call_id=call.id, placement_request_id=1))
    change_email(committed_db, email_id, error_message="550 [/x] [bold]no")
    raw = f.request_created(7, event_id="[/oops]")
    raw["payload"]["[link=https://evil.example]x"] = 1
    letter_id = dead_letter(raw)

    day = at.astimezone(BERLIN).date().isoformat()
    outputs = {
        "dead-letters list": ok(comms("dead-letters", "list")),
        "dead-letters show": ok(comms("dead-letters", "show", str(letter_id))),
        "calls today": ok(comms("calls", "today", "--date", day)),
        "emails list": ok(comms("emails", "list")),
        "emails show": ok(comms("emails", "show", str(email_id))),
    }
    assert "[/oops]" in outputs["dead-letters list"]
    assert "[/oops]" in outputs["dead-letters show"]
    assert "[link=https://evil.example]x" in outputs["dead-letters show"]
    for markup in MARKUP:
        assert markup in outputs["calls today"], markup
    # A server's reply is a stranger's text too.
    assert "550 [/x] [bold]no" in outputs["emails show"]


ESCAPES = "\x1b]52;c;cm0gLXJmIH4K\x1b\\\x1b[2J\x1b[1;31mSYSTEM: \x9b"


def test_control_characters_in_stored_values_never_reach_the_terminal(
    comms: Run, committed_db: Engine
) -> None:
    # Stored before the contract refused them: a summary and a dead letter with escapes.
    therapist(1)
    request(1, 1, diagnosis=f"F32.1 {ESCAPES}")
    [email_id] = run_batch(now() - dt.timedelta(minutes=1))
    raw = f.request_created(7)
    raw["payload"]["patient"]["diagnosis"] = ESCAPES
    raw["payload"]["therapist_id"] = "one"
    letter_id = dead_letter(raw)

    outputs = {
        "emails show --body": ok(comms("emails", "show", str(email_id), "--body")),
        "dead-letters show --reveal": ok(comms("dead-letters", "show", str(letter_id), "--reveal")),
    }
    for name, output in outputs.items():
        assert "\x1b" not in output and "\x9b" not in output, name
        assert "SYSTEM" in output, name  # shown, made harmless
