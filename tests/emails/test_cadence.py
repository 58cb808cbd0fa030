"""The weekly cadence and same-day reruns of the batch, on real PostgreSQL.

The batch runs with an explicit ``now`` (local Berlin times below), so that a week's
rules can be walked through day by day.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import zoneinfo

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from comms_tasks.db import transaction
from comms_tasks.emails import tasks, weekly
from comms_tasks.emails import tasks as batching_task
from comms_tasks.models import Email, EmailStatus, Patient, PlacementRequest, PlacementRequestStatus
from comms_tasks.settings import get_settings
from tests import factories as f

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def berlin(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=BERLIN).astimezone(dt.UTC)


def open_request(session: Session, request_id: int, therapist_id: int, at: dt.datetime) -> None:
    session.add(
        Patient(
            id=10_000 + request_id,
            registered_on=dt.date(2026, 9, 1),
            diagnosis="F32.1",
            summary_event_at=at,
        )
    )
    session.add(
        PlacementRequest(
            id=request_id,
            patient_id=10_000 + request_id,
            therapist_id=therapist_id,
            status=PlacementRequestStatus.OPEN,
            created_at=at - dt.timedelta(days=30),
            last_event_at=at,
        )
    )
    session.flush()


def batch(session: Session, now: dt.datetime) -> weekly.BatchReport:
    candidates = weekly.batch_candidates(session)
    return weekly.batch_chunk(session, candidates, now, get_settings())


def emails_of(session: Session, therapist_id: int) -> list[Email]:
    return list(
        session.scalars(select(Email).where(Email.therapist_id == therapist_id).order_by(Email.id))
    )


def test_an_email_that_left_at_073040_lets_next_mondays_0730_batch_email_again(
    db: Session,
) -> None:
    monday = berlin(2026, 11, 23, 7, 30)
    f.make_therapist(db, 1)
    open_request(db, 11, 1, monday)
    assert batch(db, monday).emails_queued == 1
    [first] = emails_of(db, 1)
    first.status = EmailStatus.SENT
    first.sent_at = berlin(2026, 11, 23, 7, 30, 40)
    db.flush()
    open_request(db, 12, 1, monday + dt.timedelta(days=2))

    assert batch(db, berlin(2026, 11, 29, 7, 30)).emails_queued == 0  # Sunday: still blocked
    next_monday = batch(db, berlin(2026, 11, 30, 7, 30))

    assert next_monday.emails_queued == 1
    second = emails_of(db, 1)[-1]
    assert [b.placement_request_id for b in second.batches] == [12]
    assert second.dedup_key == "batch:1:2026-11-30"


# --- a second run on the same day ------------------------------------------------------------


def test_a_rerun_after_the_days_email_was_cancelled_asks_the_new_request_that_day(
    db: Session,
) -> None:
    monday = berlin(2026, 11, 30, 7, 30)
    f.make_therapist(db, 1)
    open_request(db, 11, 1, monday)
    batch(db, monday)
    [first] = emails_of(db, 1)
    # Its only request was withdrawn before sending: the email was cancelled.
    db.get_one(PlacementRequest, 11).status = PlacementRequestStatus.CANCELLED
    first.status = EmailStatus.CANCELLED
    open_request(db, 12, 1, monday + dt.timedelta(hours=1))
    db.flush()

    rerun = batch(db, monday + dt.timedelta(hours=2))

    assert rerun.emails_queued == 1
    assert rerun.failed_therapist_ids == []
    second = emails_of(db, 1)[-1]
    assert [b.placement_request_id for b in second.batches] == [12]
    assert second.dedup_key == "batch:1:2026-11-30:2"


@pytest.mark.parametrize(
    ("status", "error_message"),
    [
        (EmailStatus.CANCELLED, "cancelled by an operator"),
        # e.g. the relay was down for all eight attempts
        (EmailStatus.FAILED, "451 4.3.0 try again later"),
    ],
    ids=["cancelled", "failed"],
)
def test_a_therapist_whose_email_never_reached_them_today_is_asked_again_by_each_rerun(
    db: Session, status: EmailStatus, error_message: str
) -> None:
    monday = berlin(2026, 11, 30, 7, 30)
    f.make_therapist(db, 1)
    open_request(db, 11, 1, monday)
    keys = []
    for hour in range(3):
        report = batch(db, monday + dt.timedelta(hours=hour))
        assert report.emails_queued == 1
        latest = emails_of(db, 1)[-1]
        keys.append(latest.dedup_key)
        latest.status = status
        latest.error_message = error_message
        db.flush()

    assert keys == ["batch:1:2026-11-30", "batch:1:2026-11-30:2", "batch:1:2026-11-30:3"]


def test_a_rerun_never_sends_a_second_email_the_same_day(db: Session) -> None:
    monday = berlin(2026, 11, 30, 7, 30)
    f.make_therapist(db, 1)
    f.make_therapist(db, 2)
    open_request(db, 11, 1, monday)
    open_request(db, 21, 2, monday)
    batch(db, monday)
    sent = emails_of(db, 2)[0]
    sent.status = EmailStatus.SENT
    sent.sent_at = monday + dt.timedelta(minutes=1)
    open_request(db, 12, 1, monday + dt.timedelta(hours=1))
    open_request(db, 22, 2, monday + dt.timedelta(hours=1))
    db.flush()

    rerun = batch(db, monday + dt.timedelta(hours=2))

    assert rerun.emails_queued == 0
    assert rerun.therapists_skipped == 2
    assert len(emails_of(db, 1)) == len(emails_of(db, 2)) == 1


def refuse_emails_to(session: Session, therapist_id: int) -> None:
    """A database that refuses this therapist's email: an error nobody planned for."""
    session.execute(
        text(
            "CREATE FUNCTION communication_service.refuse_email() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
        )
    )
    session.execute(
        text(
            "CREATE TRIGGER refuse_email BEFORE INSERT ON communication_service.emails "
            f"FOR EACH ROW WHEN (NEW.therapist_id = {int(therapist_id)}) "
            "EXECUTE FUNCTION communication_service.refuse_email()"
        )
    )


def test_one_therapists_failure_does_not_hold_back_the_others_of_the_chunk(
    db: Session, caplog: pytest.LogCaptureFixture
) -> None:
    monday = berlin(2026, 11, 30, 7, 30)
    for therapist_id in (1, 2, 3):
        f.make_therapist(db, therapist_id)
        open_request(db, therapist_id * 10 + 1, therapist_id, monday)
    refuse_emails_to(db, 2)

    with caplog.at_level(logging.ERROR, logger="comms_tasks.emails"):
        report = batch(db, monday)

    assert report.emails_queued == 2
    assert report.failed_therapist_ids == [2]
    assert [len(emails_of(db, t)) for t in (1, 2, 3)] == [1, 0, 1]
    [line] = [r.getMessage() for r in caplog.records]
    assert "therapist 2" in line
    assert line == "batch: no email for therapist 2: InternalError (RaiseException)"


def test_the_batch_task_finishes_every_chunk_past_a_failing_therapist(
    committed_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batching_task, "THERAPISTS_PER_CHUNK", 2)
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    with transaction() as session:
        for therapist_id in range(1, 7):
            f.make_therapist(session, therapist_id)
            open_request(session, therapist_id * 10 + 1, therapist_id, at)
        refuse_emails_to(session, 1)  # in the first chunk

    try:
        result = tasks.batch_requests()
    finally:
        with Session(committed_db) as session, session.begin():
            session.execute(text("DROP TRIGGER refuse_email ON communication_service.emails"))
            session.execute(text("DROP FUNCTION communication_service.refuse_email()"))

    assert result["emails_queued"] == 5
    assert result["therapists_failed"] == 1
    assert result["chunks_failed"] == 0
    with Session(committed_db) as session:
        asked = sorted(session.scalars(select(Email.therapist_id)))
    assert asked == [2, 3, 4, 5, 6]


def test_a_rerun_after_a_cancelled_email_is_safe_with_two_runs_at_once(
    committed_db: Engine,
) -> None:
    monday = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    therapist_ids = range(1, 21)
    with transaction() as session:
        for therapist_id in therapist_ids:
            f.make_therapist(session, therapist_id)
            open_request(session, therapist_id * 10 + 1, therapist_id, monday)
    with transaction() as session:
        batch(session, monday)
        # Every first email of the day was cancelled by an operator before it left.
        for email in session.scalars(select(Email)):
            email.status = EmailStatus.CANCELLED
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    reports: list[weekly.BatchReport] = []

    def rerun() -> None:
        try:
            with transaction() as session:
                candidates = weekly.batch_candidates(session)
            barrier.wait()
            with transaction() as session:
                reports.append(weekly.batch_chunk(session, candidates, monday, get_settings()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rerun) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not any(thread.is_alive() for thread in threads), "a run hung"
    assert errors == []
    assert sum(report.emails_queued for report in reports) == len(therapist_ids)
    assert [report.failed_therapist_ids for report in reports] == [[], []]
    with Session(committed_db) as session:
        live = session.execute(
            select(Email.therapist_id, func.count())
            .where(Email.status == EmailStatus.QUEUED)
            .group_by(Email.therapist_id)
        ).all()
    assert sorted(live) == [(therapist_id, 1) for therapist_id in therapist_ids]
