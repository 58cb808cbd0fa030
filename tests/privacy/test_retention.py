"""Erasure and retention: health data leaves stored emails, the rows stay."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text, update
from sqlalchemy.orm import Session

from comms_tasks import migrate
from comms_tasks.appliers import APPLIERS
from comms_tasks.db import make_engine, transaction
from comms_tasks.emails import rechecks, tasks, weekly
from comms_tasks.inbound import masking
from comms_tasks.inbound.dead_letters import (
    erase_patient_from_dead_letters,
    purge_expired_dead_letters,
)
from comms_tasks.inbound.inbox import handle, handle_call
from comms_tasks.models import (
    DeadLetter,
    DeadLetterStatus,
    Email,
    EmailStatus,
    Patient,
    PhoneCall,
    PlacementRequest,
    PlacementRequestStatus,
)
from comms_tasks.privacy.tasks import purge_expired
from comms_tasks.settings import get_settings
from tests import factories as f

THERAPIST = "comms.handle_therapist_event"
MATCHING = "comms.handle_matching_event"
PATIENT = "comms.handle_patient_event"
MARKER = "ERASE-ME-3c1d"
T0 = dt.datetime(2026, 11, 23, 6, 30, tzinfo=dt.UTC)


def apply(task: str, message: dict[str, Any]) -> None:
    assert handle(task, message, APPLIERS[task]).result == "applied"


def queued_email(therapist_id: int, patients: list[int]) -> int:
    apply(THERAPIST, f.therapist_upserted(therapist_id))
    for patient_id in patients:
        apply(
            MATCHING,
            f.request_created(
                patient_id * 10 + therapist_id,
                patient_id=patient_id,
                therapist_id=therapist_id,
                diagnosis=f"{MARKER}-{patient_id}",
                current_complaints=f"{MARKER}-{patient_id}",
            ),
        )
    with transaction() as session:
        [email_id] = weekly.batch_chunk(session, [therapist_id], T0, get_settings()).email_ids
    return email_id


def load(engine: Engine, email_id: int) -> Email:
    with Session(engine) as session:
        email = session.get(Email, email_id)
        assert email is not None
        _ = email.batches
        return email


def mark_sent(engine: Engine, email_id: int) -> None:
    with Session(engine) as session, session.begin():
        session.execute(
            update(Email).where(Email.id == email_id).values(status=EmailStatus.SENT, sent_at=T0)
        )


def test_erasure_redacts_sent_emails_and_rewrites_unsent_ones(domain_db: Connection) -> None:
    sent = queued_email(1, [100, 200])
    mark_sent(domain_db, sent)
    unsent = queued_email(2, [100, 300])
    only_patient = queued_email(3, [100])

    apply(PATIENT, f.patient_erased(100, occurred_at=f.at(60)))
    apply(PATIENT, f.patient_erased(100, occurred_at=f.at(61)))

    redacted = load(domain_db, sent)
    assert redacted.body_text == rechecks.REDACTED_TEXT
    assert MARKER not in redacted.body_html
    assert redacted.body_redacted_at is not None
    assert redacted.status is EmailStatus.SENT
    assert len(redacted.batches) == 2

    rewritten = load(domain_db, unsent)
    assert f"{MARKER}-100" not in rewritten.body_text + rewritten.body_html
    assert f"{MARKER}-300" in rewritten.body_text
    assert rewritten.subject == "Anfrage für einen Therapieplatz"
    assert rewritten.status is EmailStatus.QUEUED

    cancelled = load(domain_db, only_patient)
    assert cancelled.status is EmailStatus.CANCELLED
    with Session(domain_db) as session:
        patient = session.get(Patient, 100)
        assert patient is not None and patient.diagnosis is None
        untouched = session.get(Patient, 200)
        assert untouched is not None and untouched.diagnosis == f"{MARKER}-200"


def test_bodies_quiet_longer_than_the_retention_period_are_redacted_once(
    domain_db: Connection,
) -> None:
    old = queued_email(4, [400])
    recent = queued_email(5, [500])
    waiting = queued_email(6, [600])
    for email_id in (old, recent):
        mark_sent(domain_db, email_id)
    retention = dt.timedelta(days=get_settings().retention_days)
    with Session(domain_db) as session, session.begin():
        for email_id in (old, waiting):
            session.execute(
                update(Email)
                .where(Email.id == email_id)
                .values(last_activity_at=dt.datetime.now(dt.UTC) - retention - dt.timedelta(days=1))
            )
    assert purge_expired()["redacted"] == 1
    assert purge_expired()["redacted"] == 0
    assert load(domain_db, old).body_text == rechecks.REDACTED_TEXT
    assert MARKER in load(domain_db, recent).body_text
    # An email still to be sent keeps its body whatever its age.
    assert MARKER in load(domain_db, waiting).body_text
    with Session(domain_db) as session:
        assert session.scalar(select(Email.status).where(Email.id == old)) is EmailStatus.SENT


def test_scheduled_tasks_record_their_last_run(domain_db: Connection) -> None:
    from comms_tasks.ops.reports import status_snapshot
    from comms_tasks.worker.task_runs import record_run

    with transaction() as session:
        record_run(session, "comms.purge_expired", "SUCCESS")
        record_run(session, "comms.purge_expired", "FAILURE")
    with Session(domain_db) as session:
        runs = status_snapshot(session)["last_runs"]
    assert runs["comms.purge_expired"]["last_state"] == "FAILURE"
    assert runs["comms.purge_expired"]["last_finished_at"] is not None
    assert runs["comms.batch_requests"] == {"last_finished_at": None, "last_state": None}


def test_a_helper_run_is_not_counted_as_a_run_of_its_scheduled_task(domain_db: Connection) -> None:
    from comms_tasks.ops.reports import status_snapshot

    def last_state() -> str | None:
        with Session(domain_db) as session:
            runs = status_snapshot(session)["last_runs"]
        return runs["comms.batch_requests"]["last_state"]

    # Run in this process through Celery's tracer, which sends task_postrun; with the
    # header of the beat entry, so that only ``helper`` makes the difference.
    from schedules import BEAT_HEADER

    beat = {BEAT_HEADER: True}
    assert tasks.batch_requests.apply(kwargs={"helper": True}, headers=beat).successful()
    assert last_state() is None
    assert tasks.batch_requests.apply(headers=beat).successful()
    assert last_state() == "SUCCESS"


# --- dead letters ----------------------------------------------------------------------

RESPONSE = "comms.record_email_response"


def dead_letter(task: str, raw: Any) -> int:
    outcome = handle(task, raw, APPLIERS[task])
    assert outcome.result == "dead_letter", outcome
    assert outcome.dead_letter_id is not None
    return outcome.dead_letter_id


def stored_letter(engine: Engine, letter_id: int) -> DeadLetter:
    with Session(engine) as session:
        letter = session.get(DeadLetter, letter_id)
        assert letter is not None
        return letter


def patient_dead_letters(patient_id: int, request_id: int) -> dict[str, tuple[str, Any]]:
    """Malformed messages about one patient, in every shape the inbox keeps; by name."""
    marker = f"{MARKER}-{patient_id}"
    created = f.request_created(
        request_id, patient_id=patient_id, therapist_id="one", diagnosis=marker
    )
    updated = f.patient_updated(patient_id, current_complaints=marker)
    updated["payload"]["patient"]["unknown_key"] = marker
    as_string = f.patient_updated(patient_id, diagnosis=marker)
    wrong_call = f.patient_updated(patient_id, therapy_experience=marker)
    response = {
        "command_id": str(uuid.uuid4()),
        # No such email: kept until the operator replays it.
        "email_id": 999_000 + patient_id,
        "received_at": f.at(5).isoformat(),
        "content": marker,
        "outcomes": [{"placement_request_id": request_id, "outcome": "accepted", "notes": marker}],
    }
    return {
        "created": (MATCHING, created),
        "updated": (PATIENT, updated),
        "json string": (PATIENT, json.dumps(as_string)),
        "wrong call": (PATIENT, wrong_call),
        "response": (RESPONSE, response),
    }


def keep_dead_letters(messages: dict[str, tuple[str, Any]]) -> dict[str, int]:
    letters = {}
    for name, (task, raw) in messages.items():
        if name == "wrong call":
            outcome = handle_call(task, (raw,), {}, APPLIERS[task])
            assert outcome.dead_letter_id is not None
            letters[name] = outcome.dead_letter_id
        else:
            letters[name] = dead_letter(task, raw)
    return letters


def test_erasure_redacts_the_patients_dead_letters_and_keeps_their_ids(
    domain_db: Connection,
) -> None:
    # The request is known, so a response naming it is the patient's too.
    apply(THERAPIST, f.therapist_upserted(1))
    apply(MATCHING, f.request_created(1001, patient_id=100, therapist_id=1))
    erased = keep_dead_letters(patient_dead_letters(100, 1001))
    kept = keep_dead_letters(patient_dead_letters(200, 2001))

    apply(PATIENT, f.patient_erased(100, occurred_at=f.at(60)))

    for name, letter_id in erased.items():
        letter = stored_letter(domain_db, letter_id)
        text = json.dumps(letter.payload, ensure_ascii=False)
        assert f"{MARKER}-100" not in text, name
        assert "Antriebslosigkeit" not in text, name
        assert masking.REDACTED_VALUE in text, name
        assert letter.payload_redacted_at is not None, name
        # Still identifiable: the reason, its message id and the ids inside stay.
        assert letter.reason, name
    created = stored_letter(domain_db, erased["created"])
    assert created.message_id is not None
    assert created.payload["event_id"] == created.message_id
    assert created.payload["payload"]["patient_id"] == 100
    assert created.payload["payload"]["placement_request_id"] == 1001
    assert set(created.payload["payload"]["patient"].values()) == {masking.REDACTED_VALUE}
    response = stored_letter(domain_db, erased["response"]).payload
    assert response["outcomes"][0]["placement_request_id"] == 1001
    assert response["outcomes"][0]["notes"] == masking.REDACTED_VALUE

    for name, letter_id in kept.items():
        letter = stored_letter(domain_db, letter_id)
        assert f"{MARKER}-200" in json.dumps(letter.payload, ensure_ascii=False), name
        assert letter.payload_redacted_at is None, name


@pytest.fixture(params=["postgresql", "sqlite"])
def any_session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A session on PostgreSQL (rolled back) or on a migrated SQLite file."""
    if request.param == "postgresql":
        yield request.getfixturevalue("db")
        return
    url = f"sqlite:///{tmp_path / 'comms.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session:
        yield session
    engine.dispose()


def test_erasure_finds_dead_letters_by_patient_id_on_both_databases(
    any_session: Session,
) -> None:
    session = any_session
    session.add(
        PlacementRequest(
            id=31,
            patient_id=300,
            therapist_id=1,
            status=PlacementRequestStatus.OPEN,
            created_at=T0,
            last_event_at=T0,
        )
    )
    rows = {
        "nested": {"payload": {"patient_id": 300, "patient": {"diagnosis": MARKER}}},
        "as text": {"payload": {"patient_id": "300", "notes": MARKER}},
        "in a call": {
            "args": [],
            "kwargs": {"event": {"payload": {"patient_id": 300, "x": MARKER}}},
        },
        "request": {"outcomes": [{"placement_request_id": 31, "notes": MARKER}]},
        "json string": json.dumps({"payload": {"patient_id": 300, "patient": MARKER}}),
        "other patient": {"payload": {"patient_id": 3000, "patient": {"diagnosis": MARKER}}},
        "other request": {"outcomes": [{"placement_request_id": 310, "notes": MARKER}]},
        "digits elsewhere": {"payload": {"therapist_id": 300, "notes": MARKER}},
    }
    letters = {
        name: DeadLetter(
            task_name=PATIENT,
            message_id=None,
            reason="event.payload: bad",
            payload=payload,
            status=DeadLetterStatus.PENDING,
        )
        for name, payload in rows.items()
    }
    session.add_all(letters.values())
    session.flush()

    assert erase_patient_from_dead_letters(session, 300, T0) == 5
    assert erase_patient_from_dead_letters(session, 300, T0) == 0

    session.expire_all()
    redacted = {
        name
        for name, letter in letters.items()
        if MARKER not in json.dumps(letter.payload) and letter.payload_redacted_at is not None
    }
    assert redacted == {"nested", "as text", "in a call", "request", "json string"}


@pytest.mark.parametrize("levels", [1500, 3000])
def test_a_deeply_nested_json_string_in_a_dead_letter_stops_no_erasure_or_purge(
    any_session: Session, levels: int
) -> None:
    session = any_session
    deep = '{"a":' * levels + "1" + "}" * levels
    hostile = {
        "as the message": deep,
        "in a field": {"command_id": "c-1", "content": deep, "outcomes": []},
        "in a list": {"args": [], "kwargs": {"event": [deep, MARKER]}},
    }
    letters = {
        name: DeadLetter(
            task_name=PATIENT,
            message_id=None,
            reason="event: must be a JSON object",
            payload=payload,
            status=DeadLetterStatus.PENDING,
            received_at=T0,
        )
        for name, payload in hostile.items()
    }
    letters["about the patient"] = DeadLetter(
        task_name=PATIENT,
        message_id=None,
        reason="event.payload: bad",
        payload={"payload": {"patient_id": 300, "patient": {"diagnosis": MARKER}}},
        status=DeadLetterStatus.PENDING,
        received_at=T0,
    )
    session.add_all(letters.values())
    session.flush()

    # A letter that cannot be examined may name anyone: it is redacted, not a failure.
    assert erase_patient_from_dead_letters(session, 300, T0) == 4
    session.flush()
    session.expire_all()
    for name, letter in letters.items():
        assert letter.payload_redacted_at is not None, name
        assert MARKER not in json.dumps(letter.payload), name
        assert '{"a":{"a":' not in json.dumps(letter.payload), name

    # The nightly purge walks the same letters: it never fails on them either.
    session.add(
        DeadLetter(
            task_name=PATIENT,
            message_id=None,
            reason="event: must be a JSON object",
            payload={"content": deep},
            status=DeadLetterStatus.PENDING,
            received_at=T0,
        )
    )
    session.flush()
    assert purge_expired_dead_letters(session, T0 + dt.timedelta(days=400), 180, 10) == 1


def test_redaction_leaves_no_key_name_in_the_reason_that_is_no_identifier(
    any_session: Session,
) -> None:
    session = any_session
    reasons = {
        # Stored before unknown keys were named only when they look like identifiers.
        "event.payload.patient.HIV positiv; Suizidversuch: ja: Extra inputs are not "
        "permitted; event.payload.patient.gender: Input should be a valid string": (
            "event.payload.patient.<unknown key>: "
            "(the rest of the reason was removed with the message)"
        ),
        "event[3].Diagnose F32.1...: Extra inputs are not permitted": (
            "event[3].<unknown key>: (the rest of the reason was removed with the message)"
        ),
        "event.payload.patient.hobby: Extra inputs are not permitted; "
        "event.payload.patient.<unknown key>: Extra inputs are not permitted": (
            "event.payload.patient.hobby: Extra inputs are not permitted; "
            "event.payload.patient.<unknown key>: Extra inputs are not permitted"
        ),
        "event.payload.patient.hobby: HIV: Extra inputs are not permitted": (
            "event.payload.patient.<unknown key>: "
            "(the rest of the reason was removed with the message)"
        ),
        "event.payload.patient.hobby; HIV positiv: Extra inputs are not permitted": (
            "event.payload.patient.<unknown key>: "
            "(the rest of the reason was removed with the message)"
        ),
        "event.payload.status: Field required (and 2 more)": (
            "event.payload.status: Field required (and 2 more)"
        ),
        "could not be applied after 3 retries: OperationalError (OperationalError)": (
            "could not be applied after 3 retries: OperationalError (OperationalError)"
        ),
    }
    letters = {
        reason: DeadLetter(
            task_name=PATIENT,
            message_id=None,
            reason=reason,
            payload={"payload": {"patient_id": 300, "patient": {"diagnosis": MARKER}}},
            status=DeadLetterStatus.PENDING,
            received_at=T0,
        )
        for reason in reasons
    }
    session.add_all(letters.values())
    session.flush()

    assert erase_patient_from_dead_letters(session, 300, T0) == len(reasons)

    for reason, letter in letters.items():
        assert letter.reason == reasons[reason]


def test_on_sqlite_a_dead_letter_stored_with_a_nan_token_stops_no_erasure(
    tmp_path: Path,
) -> None:
    # Stored before NaN was kept as a string: SQLite's JSON functions call it malformed.
    url = f"sqlite:///{tmp_path / 'comms.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session:
        letters = [
            DeadLetter(
                task_name=PATIENT,
                message_id=None,
                reason="event.payload.patient.diagnosis: Input should be a valid string",
                payload={"payload": {"patient_id": patient_id}},
                status=DeadLetterStatus.PENDING,
                received_at=T0,
            )
            for patient_id in (300, 301)
        ]
        session.add_all(letters)
        session.flush()
        for letter in letters:
            patient_id = letter.payload["payload"]["patient_id"]
            session.execute(
                text("UPDATE dead_letters SET payload = :p WHERE id = :id"),
                {"p": f'{{"payload": {{"patient_id": {patient_id}, "x": NaN}}}}', "id": letter.id},
            )
        session.expire_all()

        assert erase_patient_from_dead_letters(session, 300, T0) == 1
        session.flush()

        valid = session.execute(
            text("SELECT id, json_valid(payload) FROM dead_letters ORDER BY id")
        ).all()
        assert [row[1] for row in valid] == [1, 0]
        assert purge_expired_dead_letters(session, T0 + dt.timedelta(days=400), 180, 10) == 1
    engine.dispose()


def test_dead_letters_past_the_retention_period_lose_their_patient_data(
    domain_db: Connection,
) -> None:
    letters = keep_dead_letters(
        {
            "old": (PATIENT, f.patient_updated(401, diagnosis=MARKER) | {"extra": 1}),
            "old, replayed lately": (PATIENT, f.patient_updated(402, diagnosis=MARKER) | {"x": 1}),
            "old, replayed long ago": (
                PATIENT,
                f.patient_updated(403, diagnosis=MARKER) | {"y": 1},
            ),
            "recent": (PATIENT, f.patient_updated(404, diagnosis=MARKER) | {"z": 1}),
        }
    )
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=get_settings().retention_days + 1)
    with Session(domain_db) as session, session.begin():
        for name in ("old", "old, replayed lately", "old, replayed long ago"):
            session.execute(
                update(DeadLetter)
                .where(DeadLetter.id == letters[name])
                .values(received_at=long_ago)
            )
        for name, replayed_at in (
            ("old, replayed lately", dt.datetime.now(dt.UTC)),
            ("old, replayed long ago", long_ago),
        ):
            session.execute(
                update(DeadLetter)
                .where(DeadLetter.id == letters[name])
                .values(status=DeadLetterStatus.REPLAYED, replayed_at=replayed_at)
            )

    assert purge_expired()["dead_letters_redacted"] == 2
    assert purge_expired()["dead_letters_redacted"] == 0

    redacted = {
        name
        for name, letter_id in letters.items()
        if MARKER not in json.dumps(stored_letter(domain_db, letter_id).payload)
    }
    assert redacted == {"old", "old, replayed long ago"}
    old = stored_letter(domain_db, letters["old"])
    assert old.payload_redacted_at is not None
    assert old.payload["payload"]["patient_id"] == 401
    assert old.status is DeadLetterStatus.PENDING


def test_a_dead_letter_about_an_erased_patient_is_stored_redacted(domain_db: Connection) -> None:
    apply(THERAPIST, f.therapist_upserted(1))
    apply(MATCHING, f.request_created(6001, patient_id=600, therapist_id=1))
    apply(PATIENT, f.patient_erased(600, occurred_at=f.at(60)))

    late = keep_dead_letters(patient_dead_letters(600, 6001))
    other = keep_dead_letters(patient_dead_letters(700, 7001))

    for name, letter_id in late.items():
        letter = stored_letter(domain_db, letter_id)
        assert f"{MARKER}-600" not in json.dumps(letter.payload, ensure_ascii=False), name
        assert letter.payload_redacted_at is not None, name
    for name, letter_id in other.items():
        letter = stored_letter(domain_db, letter_id)
        assert f"{MARKER}-700" in json.dumps(letter.payload, ensure_ascii=False), name


@pytest.mark.parametrize("value", [10**30, -(10**30), "9" * 40, 1e300, [10**25]])
def test_a_dead_letter_with_an_id_no_column_can_hold_is_still_kept(
    any_session: Session, value: Any
) -> None:
    session = any_session
    session.add(Patient(id=800, erased_at=T0, summary_event_at=T0))
    session.flush()

    def keep(patient_id: Any) -> DeadLetter:
        letter = DeadLetter(
            task_name=PATIENT,
            message_id=None,
            reason="event.payload: bad",
            payload={"payload": {"patient_id": patient_id, "placement_request_id": patient_id}},
            status=DeadLetterStatus.PENDING,
        )
        session.add(letter)
        session.flush()
        return letter

    assert keep(value).payload_redacted_at is None
    # The same hook redacts one about the erased patient, on either database.
    assert keep(800).payload_redacted_at is not None


# --- answers: the therapist's text and notes per request ---------------------------------


def answer(email_id: int, notes: dict[int, str], *, content: str) -> None:
    apply(
        RESPONSE,
        {
            "command_id": str(uuid.uuid4()),
            "email_id": email_id,
            "received_at": f.at(30).isoformat(),
            "content": content,
            "outcomes": [
                {"placement_request_id": request_id, "outcome": "needs_follow_up", "notes": text}
                for request_id, text in notes.items()
            ],
        },
    )


def answer_texts(engine: Engine, email_id: int) -> tuple[str | None, dict[int, str | None]]:
    email = load(engine, email_id)
    return email.response_content, {b.placement_request_id: b.response_notes for b in email.batches}


def test_answers_notes_leave_with_erasure_and_retention_and_none_come_back(
    domain_db: Connection,
) -> None:
    both = queued_email(1, [100, 200])
    other = queued_email(3, [300])
    for email_id in (both, other):
        mark_sent(domain_db, email_id)
    answer(both, {1001: f"{MARKER} note 100", 2001: f"{MARKER} note 200"}, content=MARKER)
    answer(other, {3003: f"{MARKER} note 300"}, content=MARKER)

    apply(PATIENT, f.patient_erased(100, occurred_at=f.at(60)))
    assert answer_texts(domain_db, both) == (None, {1001: None, 2001: None})

    # A late answer to the redacted email: its outcome counts, its text is not kept.
    answer(both, {1001: f"{MARKER} late note"}, content=f"{MARKER} late answer")
    assert answer_texts(domain_db, both) == (None, {1001: None, 2001: None})
    late = load(domain_db, both)
    assert late.response_received is True
    assert {b.placement_request_id: b.response_outcome for b in late.batches}[1001] is not None

    with Session(domain_db) as session, session.begin():
        session.execute(
            update(Email)
            .where(Email.id == other)
            .values(last_activity_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=400))
        )
    assert purge_expired()["redacted"] == 1
    assert answer_texts(domain_db, other) == (None, {3003: None})


# --- calls and the requests' status reasons --------------------------------------------

CALL = "comms.schedule_call"
CALL_OUTCOME = "comms.record_call_outcome"
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday")


def book_call(therapist_id: int, request_ids: list[int], notes: str) -> int:
    apply(
        CALL,
        {
            "command_id": str(uuid.uuid4()),
            "therapist_id": therapist_id,
            "placement_request_ids": request_ids,
            "at": None,
            "notes": notes,
        },
    )
    with transaction() as session:
        return max(session.scalars(select(PhoneCall.id)))


def call_outcome(call_id: int, notes: dict[int, str], text: str) -> None:
    apply(
        CALL_OUTCOME,
        {
            "command_id": str(uuid.uuid4()),
            "call_id": call_id,
            "status": "completed",
            "occurred_at": dt.datetime.now(dt.UTC).isoformat(),
            "outcome": text,
            "notes": text,
            "retry_after": None,
            "requests": [
                {"placement_request_id": rid, "discussed": True, "outcome": None, "notes": note}
                for rid, note in notes.items()
            ],
        },
    )


def call_texts(engine: Engine, call_id: int) -> list[str | None]:
    with Session(engine) as session:
        call = session.get(PhoneCall, call_id)
        assert call is not None
        return [call.notes, call.outcome, *(b.follow_up_notes for b in call.batches)]


def status_reason(engine: Engine, request_id: int) -> str | None:
    with Session(engine) as session:
        return session.scalar(
            select(PlacementRequest.status_reason).where(PlacementRequest.id == request_id)
        )


def test_calls_notes_and_status_reasons_leave_with_erasure_and_retention(
    domain_db: Connection,
) -> None:
    for therapist_id in (1, 3):
        apply(
            THERAPIST,
            f.therapist_upserted(
                therapist_id,
                phone_availability={day: [{"start": "08:00", "end": "18:00"}] for day in WEEKDAYS},
            ),
        )
    for request_id, patient_id, therapist_id in ((1001, 100, 1), (2001, 200, 1), (3003, 300, 3)):
        apply(
            MATCHING,
            f.request_created(request_id, patient_id=patient_id, therapist_id=therapist_id),
        )
        apply(
            MATCHING,
            f.status_changed(
                request_id, "in_progress", occurred_at=f.at(10), reason=f"{MARKER} reason"
            ),
        )
    done = book_call(1, [1001, 2001], f"{MARKER} booked")
    call_outcome(done, {1001: f"{MARKER} r1", 2001: f"{MARKER} r2"}, f"{MARKER} said")
    waiting = book_call(1, [1001], f"{MARKER} to ask")
    other = book_call(3, [3003], f"{MARKER} other")
    call_outcome(other, {3003: f"{MARKER} r3"}, f"{MARKER} said")

    apply(PATIENT, f.patient_erased(100, occurred_at=f.at(60)))
    assert call_texts(domain_db, done) == [None, None, None, None]
    assert call_texts(domain_db, waiting) == [None, None, None]
    assert status_reason(domain_db, 1001) is None
    assert status_reason(domain_db, 2001) == f"{MARKER} reason"
    assert MARKER in str(call_texts(domain_db, other))

    # Recorded after the erasure: the outcome counts, its text is not kept.
    call_outcome(waiting, {1001: f"{MARKER} late"}, f"{MARKER} late")
    assert call_texts(domain_db, waiting) == [None, None, None]
    apply(
        MATCHING,
        f.status_changed(
            1001, "rejected", old_status="in_progress", occurred_at=f.at(70), reason=MARKER
        ),
    )
    assert status_reason(domain_db, 1001) is None

    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=get_settings().retention_days + 1)
    with Session(domain_db) as session, session.begin():
        session.execute(
            update(PhoneCall)
            .where(PhoneCall.id == other)
            .values(last_activity_at=long_ago, scheduled_at=long_ago)
        )
        session.execute(
            update(PlacementRequest)
            .where(PlacementRequest.id == 3003)
            .values(last_event_at=long_ago)
        )
    result = purge_expired()
    assert (result["calls_redacted"], result["status_reasons_redacted"]) == (1, 1)
    assert call_texts(domain_db, other) == [None, None, None]
    assert status_reason(domain_db, 3003) is None
    assert status_reason(domain_db, 2001) == f"{MARKER} reason"
    assert purge_expired() == {
        "redacted": 0,
        "dead_letters_redacted": 0,
        "calls_redacted": 0,
        "status_reasons_redacted": 0,
        "mail_redacted": 0,
        "outbox_files_removed": 0,
    }


# --- the file backend's .eml copies ------------------------------------------------------


def outbox_texts(folder: Path) -> dict[str, str]:
    """Each .eml file by name, its content decoded as a reader would see it."""
    import email
    import email.policy

    texts = {}
    for path in sorted(folder.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        parts = [part.get_content() for part in message.walk() if not part.is_multipart()]
        texts[path.name] = "\n".join(str(part) for part in parts)
    return texts


def test_the_file_backends_copies_of_redacted_emails_are_removed(
    domain_db: Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comms_tasks.emails.tasks import send_email

    monkeypatch.setenv("COMMS_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("COMMS_MAIL_BACKEND", "file")
    get_settings.cache_clear()
    outbox = get_settings().outbox_folder
    erased, kept = queued_email(1, [100]), queued_email(2, [200])
    assert send_email.run()["sent"] == 2
    sent = outbox_texts(outbox)
    assert len(sent) == 2 and all(MARKER in text for text in sent.values())
    [erased_file] = [name for name, text in sent.items() if f"{MARKER}-100" in text]
    erased_copy = (outbox / erased_file).read_bytes()

    apply(PATIENT, f.patient_erased(100, occurred_at=f.at(60)))
    assert [f"{MARKER}-100" in text for text in outbox_texts(outbox).values()] == [False]
    assert any(f"{MARKER}-200" in text for text in outbox_texts(outbox).values())

    # A copy written after the erasure (a send in flight) goes with the nightly purge,
    # and so does the copy of an email past the retention period.
    (outbox / erased_file).write_bytes(erased_copy)
    with Session(domain_db) as session, session.begin():
        session.execute(
            update(Email)
            .where(Email.id == kept)
            .values(last_activity_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=400))
        )
    result = purge_expired()
    assert (result["redacted"], result["outbox_files_removed"]) == (1, 2)
    assert outbox_texts(outbox) == {}
    assert load(domain_db, erased).status is EmailStatus.SENT
