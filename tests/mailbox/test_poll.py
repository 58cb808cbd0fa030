"""comms.poll_mailbox end to end: an email sent over real SMTP, its answer put into a real
mailbox (a private Dovecot over IMAP, or the embedded Maildir), polled, and applied once."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from comms_tasks.calls import follow_up
from comms_tasks.calls.tasks import schedule_calls
from comms_tasks.db import transaction
from comms_tasks.emails.tasks import send_email
from comms_tasks.mailbox import apply as mail_apply
from comms_tasks.mailbox import sources
from comms_tasks.mailbox.tasks import poll_lock, poll_mailbox
from comms_tasks.models import (
    Email,
    InboundMail,
    InboundMailKind,
    InboundMailState,
    MailboxPoll,
    PhoneCall,
    PhoneCallStatus,
    Therapist,
)
from comms_tasks.models.base import utcnow
from comms_tasks.privacy.retention import purge_all_expired
from comms_tasks.settings import get_settings
from tests import factories as f
from tests.emails.test_email_pipeline import (
    all_emails,
    apply,
    events_of,
    open_requests,
    run_batch,
    therapist,
)
from tests.mailbox.conftest import Harness, ImapHarness, start_dovecot
from tests.mailbox.samples import BOUNCE_ADDRESS, REPLY_ADDRESS, sample
from tests.smtp import SmtpSink

T0 = dt.datetime(2026, 11, 23, 6, 30, tzinfo=dt.UTC)
THERAPIST_ID = 7
# The samples' senders: the therapist's address, and the mistyped one the bounces return.
ADDRESS = "a.beispiel@praxis-beispiel.example"
MISTYPED = "a.beispeil@praxis-beispiel.example"


@pytest.fixture
def polled(
    mailbox: Harness, smtp: SmtpSink, committed_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> Harness:
    """Settings pointed at the harness's mailbox, with tagged reply and bounce addresses."""
    point_settings_at(mailbox, monkeypatch)
    return mailbox


def point_settings_at(mailbox: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMS_REPLY_ADDRESS", REPLY_ADDRESS)
    monkeypatch.setenv("COMMS_BOUNCE_ADDRESS", BOUNCE_ADDRESS)
    if isinstance(mailbox, ImapHarness):
        for name, value in {
            "COMMS_MAILBOX_BACKEND": "imap",
            "COMMS_IMAP_HOST": "127.0.0.1",
            "COMMS_IMAP_PORT": str(mailbox.server.port),
            "COMMS_IMAP_SECURITY": "none",
            "COMMS_IMAP_USERNAME": mailbox.user,
            "COMMS_IMAP_PASSWORD": mailbox.server.password,
            "COMMS_IMAP_TIMEOUT": "10",
        }.items():
            monkeypatch.setenv(name, value)
    else:
        monkeypatch.setenv("COMMS_MAILBOX_BACKEND", "maildir")
        monkeypatch.setenv("COMMS_MAILBOX_DIR", str(mailbox.root))
    get_settings.cache_clear()


def sent_email(committed_db: Engine, smtp: SmtpSink, address: str = ADDRESS) -> Email:
    """One email to the therapist, sent over SMTP 8 days ago, unanswered."""
    therapist(THERAPIST_ID, email=address, last_name="Beispiel", first_name="Anna")
    open_requests(THERAPIST_ID, range(70, 72))
    run_batch(T0)
    assert send_email() == {"sent": 1}
    with Session(committed_db) as session, session.begin():
        email = session.scalars(select(Email)).one()
        email.sent_at = utcnow() - dt.timedelta(days=8)
    return all_emails(committed_db)[-1]


def load(committed_db: Engine) -> Email:
    with Session(committed_db) as session:
        return session.scalars(select(Email).order_by(Email.id)).first()  # type: ignore[return-value]


def mails(committed_db: Engine) -> list[InboundMail]:
    with Session(committed_db) as session:
        return list(session.scalars(select(InboundMail).order_by(InboundMail.id)))


def live_calls(committed_db: Engine) -> list[PhoneCall]:
    with Session(committed_db) as session:
        return list(
            session.scalars(select(PhoneCall).where(PhoneCall.status == PhoneCallStatus.SCHEDULED))
        )


def book_follow_up_call(committed_db: Engine) -> PhoneCall:
    with transaction() as session:
        follow_up.request_follow_up_calls(session, utcnow(), get_settings())
    schedule_calls()
    [call] = live_calls(committed_db)
    return call


def test_the_email_carries_its_token_in_reply_to_and_envelope(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    email = sent_email(committed_db, smtp)
    assert email.reply_token is not None and len(email.reply_token) == 26
    [message] = smtp.accepted
    assert (
        message["Reply-To"].addresses[0].addr_spec
        == f"antwort+{email.reply_token}@praxis-service.example"
    )
    [(mail_from, _)] = smtp.envelopes
    assert mail_from == f"bounce+{email.reply_token}@praxis-service.example"


@pytest.mark.parametrize("name", ["thunderbird_reply.eml", "outlook_reply.eml", "iphone_reply.eml"])
def test_a_reply_records_the_response_and_cancels_the_follow_up_call(
    polled: Harness, committed_db: Engine, smtp: SmtpSink, name: str
) -> None:
    email = sent_email(committed_db, smtp)
    call = book_follow_up_call(committed_db)
    polled.append(sample(name, email.reply_token or ""))

    assert poll_mailbox() == {"reply": 1}

    answered = load(committed_db)
    assert answered.response_received is True
    assert answered.response_content and "schrieb" not in answered.response_content
    assert live_calls(committed_db) == []
    with Session(committed_db) as session:
        cancelled = session.get(PhoneCall, call.id)
        assert cancelled is not None and cancelled.status is PhoneCallStatus.CANCELLED
    [event] = events_of(committed_db, "email.response_recorded")
    assert event["payload"]["source"] == "mailbox"
    assert event["payload"]["email_id"] == email.id
    [mail] = mails(committed_db)
    assert (mail.kind, mail.state, mail.email_id) == (
        InboundMailKind.REPLY,
        InboundMailState.MATCHED,
        email.id,
    )
    assert (mail.match_method, mail.to_review) == ("token", False)
    assert (mail.folder, mail.moved_at is not None) == (sources.REPLIES, True)
    assert polled.subjects() == []
    assert len(polled.subjects(sources.REPLIES)) == 1


def test_a_reply_from_another_address_is_applied_and_marked_for_review(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    email = sent_email(committed_db, smtp)
    # Answered from her private Gmail address, not the practice's.
    polled.append(sample("gmail_reply.eml", email.reply_token or ""))

    assert poll_mailbox() == {"reply": 1}

    assert load(committed_db).response_received is True
    [mail] = mails(committed_db)
    assert mail.to_review is True
    assert mail.review_reason == "sent from an address other than the therapist's"


def test_an_out_of_office_is_kept_and_the_clock_runs_on(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    email = sent_email(committed_db, smtp)
    call = book_follow_up_call(committed_db)
    polled.append(sample("exchange_ooo.eml", email.reply_token or ""))

    assert poll_mailbox() == {"auto_reply": 1}

    assert load(committed_db).response_received is False
    assert [c.id for c in live_calls(committed_db)] == [call.id]
    assert events_of(committed_db, "email.response_recorded") == []
    [mail] = mails(committed_db)
    assert (mail.kind, mail.state, mail.email_id) == (
        InboundMailKind.AUTO_REPLY,
        InboundMailState.MATCHED,
        email.id,
    )
    assert len(polled.subjects(sources.AUTO_REPLIES)) == 1


def test_a_permanent_bounce_flags_the_address_and_books_the_call_now(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    email = sent_email(committed_db, smtp, address=MISTYPED)
    with Session(committed_db) as session, session.begin():
        # Sent an hour ago: the call would otherwise wait 7 days.
        session.get(Email, email.id).sent_at = utcnow() - dt.timedelta(hours=1)  # type: ignore[union-attr]
    polled.append(sample("postfix_bounce.eml", email.reply_token or ""))

    assert poll_mailbox() == {"bounce": 1}

    bounced = load(committed_db)
    assert (bounced.bounce_permanent, bounced.bounce_status) == (True, "5.1.1")
    assert bounced.call_requested_at is not None
    with Session(committed_db) as session:
        flagged = session.get(Therapist, THERAPIST_ID)
        assert flagged is not None and flagged.undeliverable_email == MISTYPED
    [event] = events_of(committed_db, "email.bounced")
    assert event["payload"] == {
        "email_id": email.id,
        "therapist_id": THERAPIST_ID,
        "permanent": True,
        "status": "5.1.1",
        "bounced_at": event["payload"]["bounced_at"],
    }
    assert MISTYPED not in str(event)
    schedule_calls()
    [call] = live_calls(committed_db)
    assert call.email_id == email.id
    assert len(polled.subjects(sources.BOUNCES)) == 1


def test_a_temporary_bounce_is_noted_and_a_permanent_one_upgrades_it(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    email = sent_email(committed_db, smtp, address=MISTYPED)
    polled.append(sample("postfix_delayed.eml", email.reply_token or ""))
    assert poll_mailbox() == {"delayed": 1}
    noted = load(committed_db)
    assert (noted.bounce_permanent, noted.call_requested_at) == (False, None)

    polled.append(sample("postfix_bounce.eml", email.reply_token or ""))
    assert poll_mailbox() == {"bounce": 1}
    assert load(committed_db).bounce_permanent is True
    assert [e["payload"]["permanent"] for e in events_of(committed_db, "email.bounced")] == [
        False,
        True,
    ]


def test_unrelated_and_malformed_mail_is_kept_and_the_rest_goes_on(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    email = sent_email(committed_db, smtp)
    polled.append(sample("mailing_list.eml"))
    polled.append(b"\x00\xff binary \xfe garbage without headers")
    polled.append(sample("broken_mime.eml", email.reply_token or ""))
    polled.append(sample("thunderbird_reply.eml", email.reply_token or ""))

    counts = poll_mailbox()

    assert counts.get("reply") == 1
    assert counts.get("unrelated") == 3
    kept = [m for m in mails(committed_db) if m.state is InboundMailState.UNMATCHED]
    assert len(kept) == 3
    assert load(committed_db).response_received is True
    assert polled.subjects() == []


def test_a_crash_between_commit_and_move_applies_nothing_twice(
    polled: Harness, committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    email = sent_email(committed_db, smtp)
    polled.append(sample("thunderbird_reply.eml", email.reply_token or ""))
    source_class = type(sources.open_source(get_settings()))
    moving = source_class.move

    def crash(self: Any, key: str, folder: str) -> None:
        raise KeyboardInterrupt("the worker died here")

    monkeypatch.setattr(source_class, "move", crash)
    with pytest.raises(KeyboardInterrupt):
        poll_mailbox()
    monkeypatch.setattr(source_class, "move", moving)

    assert poll_mailbox() == {"seen_before": 1}

    assert len(mails(committed_db)) == 1
    assert len(events_of(committed_db, "email.response_recorded")) == 1
    assert polled.subjects() == []


def test_a_second_poll_while_one_runs_returns_at_once(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    email = sent_email(committed_db, smtp)
    polled.append(sample("thunderbird_reply.eml", email.reply_token or ""))
    with poll_lock(get_settings()) as held:
        assert held
        assert poll_mailbox() == {"skipped": "another poll is running"}
    assert poll_mailbox() == {"reply": 1}


def test_a_reply_to_a_reminder_answers_the_original_through_its_thread(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    original = sent_email(committed_db, smtp)
    from tests.emails.test_send_rechecks import queue_command_email

    reminder = queue_command_email(original, "follow_up")
    assert send_email() == {"sent": 1}
    with Session(committed_db) as session:
        sent_reminder = session.get(Email, reminder.id)
        assert sent_reminder is not None
        message_id = sent_reminder.message_id
    # No token: only the thread headers (In-Reply-To the reminder) find it.
    raw = sample("thunderbird_reply.eml").replace(
        b"<4f1c2a9e8b7d4c6a9e0f1b2c3d4e5f60@praxis-service.example>", message_id.encode()
    )
    polled.append(raw)

    assert poll_mailbox() == {"reply": 1}

    [mail] = mails(committed_db)
    assert (mail.email_id, mail.match_method) == (reminder.id, "thread")
    with Session(committed_db) as session:
        answered = session.scalar(
            select(func.count(Email.id)).where(Email.response_received.is_(True))
        )
    assert answered == 2  # the reminder and the original it asked again


# --- privacy: mail is health data -------------------------------------------------------

PATIENT = "comms.handle_patient_event"


def test_erasing_a_patient_redacts_the_replies_to_emails_about_them(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    email = sent_email(committed_db, smtp)
    polled.append(sample("thunderbird_reply.eml", email.reply_token or ""))
    assert poll_mailbox() == {"reply": 1}
    [before] = mails(committed_db)
    assert before.raw and before.reply_text

    apply(PATIENT, f.patient_erased(10_070, occurred_at=utcnow()))

    [after] = mails(committed_db)
    assert (after.raw, after.reply_text, after.subject) == (None, None, None)
    assert after.redacted_at is not None
    assert (after.kind, after.email_id) == (InboundMailKind.REPLY, email.id)
    assert load(committed_db).response_content is None


def test_a_reply_that_arrives_after_the_erasure_is_kept_redacted(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    email = sent_email(committed_db, smtp)
    apply(PATIENT, f.patient_erased(10_070, occurred_at=utcnow()))
    polled.append(sample("thunderbird_reply.eml", email.reply_token or ""))

    assert poll_mailbox() == {"reply": 1}

    [mail] = mails(committed_db)
    assert (mail.raw, mail.reply_text, mail.subject) == (None, None, None)
    assert load(committed_db).response_received is True
    assert load(committed_db).response_content is None


def test_retention_redacts_mail_read_longer_ago_than_the_period(
    polled: Harness, committed_db: Engine, smtp: SmtpSink
) -> None:
    email = sent_email(committed_db, smtp)
    polled.append(sample("thunderbird_reply.eml", email.reply_token or ""))
    polled.append(sample("mailing_list.eml"))
    assert poll_mailbox() == {"reply": 1, "unrelated": 1}
    old, _recent = mails(committed_db)
    with Session(committed_db) as session, session.begin():
        aged = session.get(InboundMail, old.id)
        assert aged is not None
        aged.fetched_at = utcnow() - dt.timedelta(days=181)

    counts = purge_all_expired(utcnow(), 180)

    assert counts["mail_redacted"] == 1
    redacted, kept = mails(committed_db)
    assert redacted.raw is None and redacted.redacted_at is not None
    assert kept.raw is not None and kept.redacted_at is None


def test_the_imap_server_restarting_mid_poll_loses_nothing_and_applies_nothing_twice(
    smtp: SmtpSink, committed_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_dovecot()
    try:
        mailbox = ImapHarness(server)
        point_settings_at(mailbox, monkeypatch)
        email = sent_email(committed_db, smtp)
        mailbox.append(sample("thunderbird_reply.eml", email.reply_token or ""))
        mailbox.append(sample("exchange_ooo.eml", email.reply_token or ""))
        recording = mail_apply.record_mail

        def then_restart(*args: Any, **kwargs: Any) -> mail_apply.Applied:
            applied = recording(*args, **kwargs)
            server.stop()  # while its group is recorded: before the group's commit and moves
            return applied

        monkeypatch.setattr(mail_apply, "record_mail", then_restart)
        assert poll_mailbox() == {"error": 1}
        monkeypatch.setattr(mail_apply, "record_mail", recording)
        with Session(committed_db) as session:
            [poll] = session.scalars(select(MailboxPoll)).all()
            assert poll.error and poll.error.startswith("imap://")
            assert server.password not in poll.error
        server.start()

        # Both were committed with their group, neither moved: both found again, and moved.
        assert poll_mailbox() == {"seen_before": 2}

        assert [m.folder for m in mails(committed_db)] == [sources.REPLIES, sources.AUTO_REPLIES]
        assert len(events_of(committed_db, "email.response_recorded")) == 1
        assert mailbox.subjects() == []
        assert len(mailbox.subjects(sources.REPLIES)) == 1
        assert len(mailbox.subjects(sources.AUTO_REPLIES)) == 1
    finally:
        server.close()
