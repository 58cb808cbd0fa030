"""A failed email is not followed by a new asking email every weekday (real SMTP server).

- The server refused the therapist's address for good (a 5xx at RCPT): the address is
  undeliverable, and the batch asks nobody there again (``comms explain`` says why) until
  the therapist service sends a different address.
- The email failed for another reason (the message refused, every attempt temporary): it
  never reached them, so it does not count; the next run may ask again.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Engine

from comms_tasks.db import transaction
from comms_tasks.emails import weekly
from comms_tasks.emails.tasks import send_email
from comms_tasks.models import EmailStatus
from comms_tasks.settings import get_settings
from tests import factories as f
from tests.emails.test_email_pipeline import (
    T0,
    THERAPIST,
    all_emails,
    apply,
    open_requests,
    run_batch,
)
from tests.smtp import SmtpSink

ADDRESS = "praxis3@weber-therapie.de"
DAY = dt.timedelta(days=1)


def explain(therapist_id: int, now: dt.datetime) -> tuple[bool, str | None, dt.date | None]:
    with transaction() as session:
        verdict, *_ = weekly.preview_batch(session, therapist_id, now, get_settings())
        session.rollback()
    return verdict.contactable, verdict.reason, verdict.contactable_from


def test_a_refused_address_is_not_asked_again_until_another_address_arrives(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    apply(THERAPIST, f.therapist_upserted(3, email=ADDRESS))
    open_requests(3, range(30, 32))
    smtp.refuse_recipient(ADDRESS)
    assert run_batch(T0).emails_queued == 1
    assert send_email() == {"failed": 1}
    [failed] = all_emails(committed_db)
    assert failed.status is EmailStatus.FAILED
    assert failed.error_message is not None
    assert failed.error_message.startswith("recipient refused: 550")

    for days in (1, 2, 3, 8, 30):
        report = run_batch(T0 + days * DAY)
        assert (report.emails_queued, report.therapists_skipped) == (0, 1), f"day {days}"
    contactable, reason, since = explain(3, T0 + 30 * DAY)
    assert not contactable
    assert reason == (
        f"its address was refused for good (email {failed.id}): waiting for a different"
        " address from the therapist service"
    )
    assert since is None

    # The therapist service sends a new address: asked again at once, there.
    apply(THERAPIST, f.therapist_upserted(3, email="neu@weber-therapie.de", occurred_at=f.at(5)))
    assert explain(3, T0 + 2 * DAY)[0]
    assert run_batch(T0 + 2 * DAY).emails_queued == 1
    asking = all_emails(committed_db)[-1]
    assert asking.recipient_email == "neu@weber-therapie.de"
    assert sorted(b.placement_request_id for b in asking.batches) == [30, 31]


def test_an_email_that_failed_for_another_reason_does_not_hold_the_therapist_back(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    apply(THERAPIST, f.therapist_upserted(3, email=ADDRESS))
    open_requests(3, range(30, 32))
    smtp.script("554 5.7.1 message refused")
    assert run_batch(T0).emails_queued == 1
    assert send_email() == {"failed": 1}

    contactable, reason, _since = explain(3, T0 + DAY)
    assert (contactable, reason) == (True, None)
    assert run_batch(T0 + DAY).emails_queued == 1
    assert send_email() == {"sent": 1}
