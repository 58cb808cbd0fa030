"""A dead letter is kept once per message, however often the message arrives.

``task_acks_late`` and ``task_reject_on_worker_lost`` redeliver a message whose worker
died after its dead letter was committed; a producer may send the same message twice.
Neither may add a second pending dead letter for the same message (same task, same
payload): the one letter counts its deliveries.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.utils import json as kombu_json
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks import migrate
from comms_tasks.app import app
from comms_tasks.appliers import APPLIERS
from comms_tasks.db import make_engine, reset_engine
from comms_tasks.inbound import failures, inbox
from comms_tasks.inbound.dead_letters import purge_expired_dead_letters
from comms_tasks.models import DeadLetter, DeadLetterStatus
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings
from tests import factories as f

THERAPIST = "comms.handle_therapist_event"


def dead_letters(engine: Engine) -> list[DeadLetter]:
    with Session(engine) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def invalid_event(therapist_id: int = 7100, **payload: Any) -> dict[str, Any]:
    event = f.therapist_upserted(therapist_id)
    event["payload"].update({"salutation": "Eure Exzellenz", **payload})
    return event


def deliver(event: Any) -> dict[str, Any]:
    result = app.tasks[THERAPIST].apply(kwargs={"event": event})
    assert result.successful(), result.traceback
    outcome: dict[str, Any] = result.result
    assert outcome["result"] == "dead_letter"
    return outcome


def test_the_same_invalid_message_delivered_twice_is_one_dead_letter(
    committed_db: Engine,
) -> None:
    event = invalid_event()

    first = deliver(event)
    second = deliver(event)

    [letter] = dead_letters(committed_db)
    assert first["dead_letter_id"] == second["dead_letter_id"] == letter.id
    assert letter.message_id == event["event_id"]
    assert letter.status is DeadLetterStatus.PENDING
    assert letter.deliveries == 2


def test_a_message_without_a_readable_id_is_kept_once_by_its_content(
    committed_db: Engine,
) -> None:
    event = invalid_event()
    del event["event_id"]
    other = invalid_event(7101)
    del other["event_id"]

    deliver(event)
    deliver(dict(reversed(list(event.items()))))  # the same JSON object, keys reordered
    deliver(other)

    letters = dead_letters(committed_db)
    assert [(letter.message_id, letter.deliveries) for letter in letters] == [(None, 2), (None, 1)]


def test_the_same_id_with_another_payload_is_another_dead_letter(committed_db: Engine) -> None:
    event = invalid_event()
    changed = invalid_event(salutation="Seine Heiligkeit")
    changed["event_id"] = event["event_id"]

    deliver(event)
    deliver(changed)

    assert [letter.deliveries for letter in dead_letters(committed_db)] == [1, 1]


def test_a_malformed_call_delivered_twice_is_one_dead_letter(committed_db: Engine) -> None:
    for _ in range(2):
        result = app.tasks[THERAPIST].apply(args=("positional",), kwargs={})
        assert result.successful(), result.traceback

    [letter] = dead_letters(committed_db)
    assert letter.deliveries == 2


def test_after_a_replay_the_same_message_may_be_a_dead_letter_again(
    committed_db: Engine,
) -> None:
    # A replayed letter is history; a new delivery that fails again is a new letter.
    event = invalid_event()
    deliver(event)
    [letter] = dead_letters(committed_db)
    with Session(committed_db) as session, session.begin():
        stored = session.get(DeadLetter, letter.id)
        assert stored is not None
        stored.status = DeadLetterStatus.REPLAYED

    deliver(event)

    assert [letter.status for letter in dead_letters(committed_db)] == [
        DeadLetterStatus.REPLAYED,
        DeadLetterStatus.PENDING,
    ]


def test_two_workers_storing_the_same_dead_letter_at_once_keep_one(
    committed_db: Engine,
) -> None:
    workers = 4
    events = [invalid_event(7200 + n) for n in range(10)]
    start = threading.Barrier(workers)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            start.wait()
            for event in events:
                # Each thread has a connection of its own from the pool.
                outcome = inbox.handle(THERAPIST, event, APPLIERS[THERAPIST])
                assert outcome.result == "dead_letter"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    letters = dead_letters(committed_db)
    assert sorted(letter.message_id or "" for letter in letters) == sorted(
        event["event_id"] for event in events
    )
    assert {letter.deliveries for letter in letters} == {workers}


@pytest.fixture
def sqlite_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'comms.db'}"
    migrate.upgrade(url)
    monkeypatch.setenv("COMMS_DATABASE_URL", url)
    get_settings.cache_clear()
    reset_engine()
    engine = make_engine(url)
    yield engine
    engine.dispose()
    reset_engine()
    get_settings.cache_clear()


def test_on_sqlite_too_a_redelivery_counts_on_the_pending_letter(sqlite_db: Engine) -> None:
    event = invalid_event()
    for _ in range(3):
        deliver(event)
    deliver(invalid_event(7102))

    assert [letter.deliveries for letter in dead_letters(sqlite_db)] == [3, 1]


# --- a message nested too deeply --------------------------------------------------------


def nested(depth: int, kind: str) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize("depth", [40, 200, 600, 900, 5000, 100_000])
def test_a_message_nested_too_deeply_is_kept_as_a_dead_letter(
    committed_db: Engine, depth: int, kind: str
) -> None:
    event = f.therapist_upserted(7300)
    event["payload"]["status"] = nested(depth, kind)

    outcome = deliver(event)

    [letter] = dead_letters(committed_db)
    assert outcome["dead_letter_id"] == letter.id
    assert letter.message_id == event["event_id"]
    assert "event.payload.status" in letter.reason
    assert "nested too deeply" in letter.reason
    # The message is kept up to the depth that can be stored, its other fields whole.
    assert letter.payload["event_id"] == event["event_id"]
    assert letter.payload["payload"]["last_name"] == event["payload"]["last_name"]


def test_the_next_message_after_a_deep_one_is_applied(committed_db: Engine) -> None:
    deep = f.therapist_upserted(7301)
    deep["payload"]["title"] = nested(5000, "list")
    deliver(deep)

    result = app.tasks[THERAPIST].apply(kwargs={"event": f.therapist_upserted(7302)})

    assert result.successful(), result.traceback
    assert result.result["result"] == "applied"


def test_storable_keeps_a_bounded_depth_without_recursing() -> None:
    kept = failures.storable({"a": nested(200_000, "list"), "b": "Bl\x00\ud800"})

    depth = 0
    value = kept["a"]
    while isinstance(value, list):
        [value] = value
        depth += 1
    assert depth < 100
    assert isinstance(value, str) and "nested too deeply" in value
    assert kept["b"] == "Bl\ufffd\ufffd"


def test_a_message_id_that_is_not_a_uuid_is_kept_but_not_logged(
    committed_db: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # A producer's mistake may put anything printable where the id belongs.
    event = invalid_event()
    event["event_id"] = "Frau Beispiel, Depression seit Mai"
    with caplog.at_level(logging.WARNING, logger="comms_tasks.inbound.inbox"):
        deliver(event)

    [letter] = dead_letters(committed_db)
    assert letter.message_id == event["event_id"]
    lines = [record.getMessage() for record in caplog.records]
    assert lines, "the dead letter is logged"
    assert all("Beispiel" not in line for line in lines), lines
    assert any("(message not a UUID)" in line for line in lines), lines


# --- numbers JSON cannot store ----------------------------------------------------------

PATIENT = "comms.handle_patient_event"


def from_the_wire(event: dict[str, Any], number: str) -> Any:
    """The event as a worker reads it from the broker, with ``number`` where "__N__" is."""
    body = json.dumps({"event": event}).replace('"__N__"', number)
    return kombu_json.loads(body)["event"]


@pytest.mark.parametrize(
    ("number", "kept"),
    [
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("1e400", "Infinity"),
        ("-1e400", "-Infinity"),
    ],
)
def test_a_message_holding_a_non_finite_number_is_kept_as_a_dead_letter(
    committed_db: Engine, number: str, kept: str
) -> None:
    event = f.therapist_upserted(7400)
    event["payload"]["therapist_id"] = "__N__"
    event = from_the_wire(event, number)

    outcome = deliver(event)

    [letter] = dead_letters(committed_db)
    assert outcome["dead_letter_id"] == letter.id
    assert letter.message_id == event["event_id"]
    assert letter.payload["payload"]["therapist_id"] == kept


def test_on_sqlite_a_non_finite_number_in_a_dead_letter_stops_no_erasure(
    sqlite_db: Engine,
) -> None:
    event = from_the_wire(f.patient_updated(100, diagnosis="__N__"), "NaN")
    outcome = app.tasks[PATIENT].apply(kwargs={"event": event})
    assert outcome.successful(), outcome.traceback
    assert outcome.result["result"] == "dead_letter"

    erasure = app.tasks[PATIENT].apply(kwargs={"event": f.patient_erased(100)})

    assert erasure.successful(), erasure.traceback
    assert erasure.result["result"] == "applied"
    [letter] = dead_letters(sqlite_db)
    assert letter.payload_redacted_at is not None


# --- redeliveries and retention ---------------------------------------------------------


def back_date(engine: Engine, letter_id: int, days: int) -> None:
    with Session(engine) as session, session.begin():
        stored = session.get(DeadLetter, letter_id)
        assert stored is not None
        stored.received_at = utcnow() - dt.timedelta(days=days)


def purge(engine: Engine, now: dt.datetime) -> int:
    with Session(engine) as session, session.begin():
        return purge_expired_dead_letters(session, now, get_settings().retention_days, 100)


def test_a_redelivery_restarts_its_letters_retention_clock(committed_db: Engine) -> None:
    event = invalid_event()
    first = deliver(event)
    back_date(committed_db, first["dead_letter_id"], get_settings().retention_days - 1)

    assert deliver(event)["dead_letter_id"] == first["dead_letter_id"]

    # Two days later the first delivery is past the retention period, the last is not.
    assert purge(committed_db, utcnow() + dt.timedelta(days=2)) == 0
    [letter] = dead_letters(committed_db)
    assert letter.payload_redacted_at is None
    assert letter.deliveries == 2


def redelivered_after_redaction(engine: Engine) -> None:
    event = invalid_event()
    first = deliver(event)
    back_date(engine, first["dead_letter_id"], get_settings().retention_days + 1)
    assert purge(engine, utcnow()) == 1

    again = deliver(event)

    assert again["dead_letter_id"] != first["dead_letter_id"]
    old, new = dead_letters(engine)
    assert old.payload_redacted_at is not None
    assert old.deliveries == 1
    # The new delivery is kept whole, pending, and can be replayed.
    assert new.status is DeadLetterStatus.PENDING
    assert new.payload_redacted_at is None
    assert new.payload == event
    assert deliver(event)["dead_letter_id"] == new.id


def test_a_delivery_after_its_letter_was_redacted_is_a_new_letter(committed_db: Engine) -> None:
    redelivered_after_redaction(committed_db)


def test_on_sqlite_too_a_delivery_after_redaction_is_a_new_letter(sqlite_db: Engine) -> None:
    redelivered_after_redaction(sqlite_db)
