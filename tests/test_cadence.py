"""The weekly cadence and same-day reruns of the batch, on real PostgreSQL.

The batch runs with an explicit ``now`` (local Berlin times below), so that a week's
rules can be walked through day by day.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks import emails
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


def batch(session: Session, now: dt.datetime) -> emails.BatchReport:
    candidates = emails.batch_candidates(session)
    return emails.batch_chunk(session, candidates, now, get_settings())


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
