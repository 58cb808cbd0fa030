"""Two workers, two beats, every daily task run several times at once: nothing twice."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from comms_tasks.appliers import APPLIERS
from comms_tasks.inbound.inbox import handle
from comms_tasks.models import Email, EmailStatus, OutboxEvent, PhoneCall, PlacementRequest
from tests import factories as f
from tests.conftest import (
    REDIS_URL,
    CeleryProcess,
    broker_environment,
    count_rows,
    start_workers,
    wait_for,
)
from tests.smtp import SmtpSink

BROKER_SLOT = 3  # the broker_url fixture: this module's broker, on each kind
REDBEAT_URL = REDIS_URL.rsplit("/", 1)[0] + "/4"
THERAPISTS = 200
ALL_WEEK = {
    day: [{"start": "08:00", "end": "18:00"}]
    for day in ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
}
# Each daily task is started this many times at once, as duplicated beats would.
RUNS_AT_ONCE = 4


def seed(engine: Engine) -> None:
    """Therapists with two open requests each; a tenth of them emailed ten days ago."""
    for therapist_id in range(1, THERAPISTS + 1):
        therapist = f.therapist_upserted(therapist_id, phone_availability=ALL_WEEK)
        assert (
            handle(
                "comms.handle_therapist_event", therapist, APPLIERS["comms.handle_therapist_event"]
            ).result
            == "applied"
        )
        for request_id in (therapist_id * 10, therapist_id * 10 + 1):
            created = f.request_created(
                request_id, patient_id=request_id, therapist_id=therapist_id
            )
            outcome = handle(
                "comms.handle_matching_event", created, APPLIERS["comms.handle_matching_event"]
            )
            assert outcome.result == "applied"


def test_two_workers_two_beats_and_duplicate_runs_create_nothing_twice(
    broker_url: str, committed_db: Engine, committed_url: str, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    redis.Redis.from_url(REDBEAT_URL).flushdb()
    seed(committed_db)
    env = broker_environment(
        committed_url,
        broker_url,
        tmp_path / "var",
        COMMS_REDBEAT_REDIS_URL=REDBEAT_URL,
        **smtp_sink.worker_settings(),
    )
    workers = start_workers(env, tmp_path)
    beats: list[CeleryProcess] = []
    app = Celery("duplicated-beats", broker=broker_url, set_as_current=False)
    try:
        for n in (1, 2):
            beats.append(CeleryProcess(env, tmp_path / f"beat{n}.log", "beat", "--loglevel=INFO"))
        for _ in range(RUNS_AT_ONCE):
            app.send_task("comms.batch_requests")

        def all_sent() -> bool:
            return count_rows(committed_db, Email, Email.status == EmailStatus.SENT) == THERAPISTS

        workers[0].wait_for(all_sent, timeout=120)
        # Make a tenth of the emails old and unanswered, then run the follow-up check
        # several times at once.
        with Session(committed_db) as session, session.begin():
            session.execute(
                update(Email)
                .where(Email.therapist_id <= THERAPISTS // 10)
                .values(sent_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
            )
        for _ in range(RUNS_AT_ONCE):
            app.send_task("comms.follow_up_check")
            app.send_task("comms.schedule_calls")

        def calls_booked() -> bool:
            return count_rows(committed_db, PhoneCall) == THERAPISTS // 10

        workers[0].wait_for(calls_booked, timeout=120)

        def beats_ran() -> bool:
            return any("Sending due task relay-outbox" in beat.log() for beat in beats)

        wait_for(beats_ran, timeout=60)
        # Let the relay run a few rounds while both beats are up.
        wait_for(lambda: _relayed(committed_db), timeout=60)
        beat_texts = [beat.log() for beat in beats]
    finally:
        for process in [*beats, *workers]:
            process.stop()
        app.close()

    with Session(committed_db) as session:
        per_therapist = Counter(session.scalars(select(Email.therapist_id)))
        per_email = Counter(session.scalars(select(PhoneCall.email_id)))
        envelopes = [row.envelope for row in session.scalars(select(OutboxEvent))]
    assert count_rows(committed_db, PlacementRequest) == THERAPISTS * 2
    assert set(per_therapist.values()) == {1}, "a therapist got two emails"
    assert len(per_therapist) == THERAPISTS
    assert set(per_email.values()) == {1}, "an email got two calls"
    assert set(smtp_sink.message_ids().values()) == {1}
    changes = Counter(_change_of(envelope) for envelope in envelopes)
    assert [change for change, count in changes.items() if count > 1] == []
    # RedBeat: one beat holds the lock and sends; the other waits.
    senders = [text.count("Sending due task") > 0 for text in beat_texts]
    assert senders.count(True) == 1, beat_texts
    print(
        f"RELIABILITY two_of_everything: therapists={THERAPISTS} "
        f"emails={sum(per_therapist.values())} calls={sum(per_email.values())} "
        f"events={len(envelopes)} duplicates=0 "
        f"active_beats={senders.count(True)}"
    )


def _relayed(engine: Engine) -> bool:
    return count_rows(engine, OutboxEvent, OutboxEvent.published_at.is_(None)) == 0


def _change_of(envelope: dict[str, Any]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """What an event is about: its type and entity ids (not its own event id or times)."""
    payload = envelope["payload"]
    keys = ("email_id", "call_id", "placement_request_id", "source_id", "attempt")
    return envelope["event_type"], tuple((key, payload.get(key)) for key in keys)
