"""Malformed messages of every kind never stop the worker and never leave a change half applied.

In process, hypothesis mutates valid messages of every inbound task (a dropped key, an
unknown key, a value swapped for arbitrary JSON, 100k-character strings, CR/LF, NUL, deep
nesting, lists where objects are expected) and :func:`comms_tasks.inbound.inbox.handle` must give an
outcome, never raise, and leave the database consistent. Then a real worker is fed hostile
messages through Redis, including raw bodies it must refuse before any task runs.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Producer
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from comms_tasks.appliers import APPLIERS
from comms_tasks.inbound.inbox import Outcome, handle
from comms_tasks.models import (
    SCHEMA,
    Base,
    DeadLetter,
    Patient,
    PlacementRequest,
    ProcessedMessage,
    Therapist,
)
from comms_tasks.task_names import (
    HANDLE_MATCHING_EVENT,
    HANDLE_PATIENT_EVENT,
    HANDLE_THERAPIST_EVENT,
    QUEUE_EMAIL,
    RECORD_CALL_OUTCOME,
    RECORD_EMAIL_RESPONSE,
    SCHEDULE_CALL,
)
from tests import factories as f
from tests.conftest import WorkerProcess, count_rows, worker_on_broker

pytestmark = pytest.mark.reliability

BROKER_SLOT = 9  # the broker_url fixture: this module's broker, on each kind
RESULTS = {"applied", "duplicate", "dead_letter"}
HUGE = 100_000
_ids = itertools.count(500_000)


def fresh_id() -> int:
    return next(_ids)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


# --- valid messages of every inbound task -------------------------------------------


def valid_message(task: str, kind: int) -> tuple[dict[str, Any], dict[str, int]]:
    """A valid message for ``task`` with fresh ids, and the read-model ids it names."""
    therapist_id, request_id, patient_id = fresh_id(), fresh_id(), fresh_id()
    ids = {"therapist": therapist_id, "request": request_id, "patient": patient_id}
    if task == HANDLE_THERAPIST_EVENT:
        if kind % 2:
            return f.therapist_deleted(therapist_id), ids
        return f.therapist_upserted(therapist_id), ids
    if task == HANDLE_MATCHING_EVENT:
        makers = [
            lambda: f.request_created(request_id, patient_id=patient_id, therapist_id=therapist_id),
            lambda: f.status_changed(request_id, "in_progress", reason="x"),
            lambda: f.request_cancelled(request_id),
        ]
        return makers[kind % 3](), ids
    if task == HANDLE_PATIENT_EVENT:
        if kind % 2:
            return f.patient_erased(patient_id), ids
        return f.patient_updated(patient_id), ids
    command_id = str(uuid.uuid4())
    if task == RECORD_EMAIL_RESPONSE:
        message: dict[str, Any] = {
            "command_id": command_id,
            "email_id": fresh_id(),
            "received_at": now_iso(),
            "content": "Leider keine Kapazität.",
            "outcomes": [
                {"placement_request_id": request_id, "outcome": "rejected", "notes": None}
            ],
        }
    elif task == RECORD_CALL_OUTCOME:
        message = {
            "command_id": command_id,
            "call_id": fresh_id(),
            "status": ["completed", "failed", "cancelled"][kind % 3],
            "occurred_at": now_iso(),
            "outcome": None,
            "notes": None,
            "retry_after": None,
            "requests": [
                {
                    "placement_request_id": request_id,
                    "discussed": True,
                    "outcome": "accepted",
                    "notes": None,
                }
            ],
        }
    elif task == QUEUE_EMAIL:
        message = {
            "command_id": command_id,
            "therapist_id": therapist_id,
            "template": ["follow_up", "confirmation"][kind % 2],
            "placement_request_ids": [request_id],
            "reply_to_email_id": None,
        }
    else:
        assert task == SCHEDULE_CALL
        message = {
            "command_id": command_id,
            "therapist_id": therapist_id,
            "placement_request_ids": [request_id],
            "at": None,
            "notes": "Rückfrage",
        }
    return message, ids


# --- mutations ----------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
arbitrary_json = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def deep(depth: int, as_list: bool) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value] if as_list else {"a": value}
    return value


def containers(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        yield path
        for key, item in value.items():
            yield from containers(item, (*path, key))
    elif isinstance(value, list):
        yield path
        for index, item in enumerate(value):
            yield from containers(item, (*path, index))


def at_path(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


MUTATIONS = [
    "drop",
    "unknown_key",
    "arbitrary",
    "huge",
    "crlf",
    "nul",
    "deep",
    "list_for_object",
]


def mutate(data: st.DataObject, message: dict[str, Any]) -> dict[str, Any] | Any:
    """Apply one mutation at a random place of ``message``; may return a non-dict."""
    paths = list(containers(message))
    path = data.draw(st.sampled_from(paths), label="path")
    node = at_path(message, path)
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    kind = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    if kind == "unknown_key" or not keys:
        if isinstance(node, dict):
            node[data.draw(st.text(min_size=1, max_size=20), label="key")] = data.draw(
                arbitrary_json
            )
        else:
            node.append(data.draw(arbitrary_json))
        return message
    key = data.draw(st.sampled_from(keys), label="key")
    current = node[key]
    if kind == "drop":
        del node[key]
    elif kind == "arbitrary":
        node[key] = data.draw(arbitrary_json, label="value")
    elif kind == "huge":
        node[key] = data.draw(st.characters(codec="utf-8"), label="char") * HUGE
    elif kind == "crlf":
        base = current if isinstance(current, str) else str(current)
        node[key] = base + data.draw(st.sampled_from(["\r\n", "\n", "\r"])) + "Bcc: x@y.de"
    elif kind == "nul":
        base = current if isinstance(current, str) else str(current)
        node[key] = base[:1] + "\x00" + base[1:]
    elif kind == "deep":
        depth = data.draw(st.integers(min_value=20, max_value=300), label="depth")
        node[key] = deep(depth, data.draw(st.booleans(), label="as_list"))
    elif kind == "list_for_object":
        node[key] = [current] if isinstance(current, dict) else [current, current]
    if not path and data.draw(st.integers(0, 20), label="whole") == 0:
        # Now and then the whole message is not an object at all.
        return data.draw(st.sampled_from([[message], "event", 17, None]))
    return message


def table_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {
            table.name: connection.execute(
                text(f'SELECT count(*) FROM "{SCHEMA}"."{table.name}"')
            ).scalar_one()
            for table in Base.metadata.sorted_tables
        }


def rows_for(engine: Engine, ids: dict[str, int]) -> list[Any]:
    with Session(engine) as session:
        found = [
            session.get(Therapist, ids["therapist"]),
            session.get(PlacementRequest, ids["request"]),
            session.get(Patient, ids["patient"]),
        ]
    return [row for row in found if row is not None]


def processed(engine: Engine, message_id: str) -> bool:
    with Session(engine) as session:
        return session.get(ProcessedMessage, message_id) is not None


def test_mutated_messages_of_every_task_never_raise_and_leave_nothing_half_applied(
    committed_db: Engine,
) -> None:
    tallies: dict[str, int] = dict.fromkeys(RESULTS, 0)
    # The same message twice (e.g. the whole message replaced by None) is one dead letter.
    letter_ids: set[int] = set()

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(
        task=st.sampled_from(sorted(APPLIERS)),
        kind=st.integers(min_value=0, max_value=5),
        mutations=st.integers(min_value=0, max_value=3),
        data=st.data(),
    )
    def check(task: str, kind: int, mutations: int, data: st.DataObject) -> None:
        message, ids = valid_message(task, kind)
        original_id = message.get("event_id") or message.get("command_id")
        raw: Any = copy.deepcopy(message)
        for _ in range(mutations):
            if not isinstance(raw, dict):
                break
            raw = mutate(data, raw)
        before = table_counts(committed_db)

        outcome = handle(task, raw, APPLIERS[task])

        assert isinstance(outcome, Outcome)
        assert outcome.result in RESULTS
        tallies[outcome.result] += 1
        after = table_counts(committed_db)
        if outcome.result == "dead_letter":
            assert outcome.dead_letter_id is not None
            repeated = outcome.dead_letter_id in letter_ids
            letter_ids.add(outcome.dead_letter_id)
            assert after["dead_letters"] == before["dead_letters"] + (0 if repeated else 1)
            unchanged = {k: v for k, v in after.items() if k != "dead_letters"}
            assert unchanged == {k: v for k, v in before.items() if k != "dead_letters"}
            assert rows_for(committed_db, ids) == []
            assert not processed(committed_db, str(original_id))
        elif outcome.result == "applied":
            assert outcome.message_id is not None
            assert processed(committed_db, outcome.message_id)
            assert after["processed_messages"] == before["processed_messages"] + 1
            assert after["dead_letters"] == before["dead_letters"]
        else:
            assert after == before

    check()
    with Session(committed_db) as session:
        letters = session.scalar(select(func.count()).select_from(DeadLetter))
        done = session.scalar(select(func.count()).select_from(ProcessedMessage))
    assert letters == len(letter_ids) <= tallies["dead_letter"]
    assert done == tallies["applied"]
    print(f"RELIABILITY fuzz in-process: outcomes={tallies}")


# --- a real worker fed hostile messages ---------------------------------------------


@pytest.fixture
def fuzz_worker(
    broker_url: str, committed_db: Engine, committed_url: str, worker_log_dir: Path
) -> Iterator[WorkerProcess]:
    with worker_on_broker(committed_url, broker_url, worker_log_dir, "fuzz") as process:
        yield process


def hostile_calls(hostile_ids: list[int]) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """(task, args, kwargs) that reach an inbound task and must each become a dead letter."""

    def tid() -> int:
        hostile_ids.append(fresh_id())
        return hostile_ids[-1]

    big = "x" * 200_000
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    for overrides in [
        {"therapist_id": "eins"},
        {"status": "retired"},
        {"email": "a@b.de\r\nBcc: all@example.org"},
        {"first_name": "Anna\r\nX-Header: 1"},
        {"first_name": big},
        {"phone_availability": {"funday": [{"start": "09:00", "end": "10:00"}]}},
        {"phone_availability": {"monday": [{"start": "12:00", "end": "09:00"}]}},
        {"phone_availability": {"monday": {"start": "09:00", "end": "10:00"}}},
        {"unknown_field": 1},
        {"title": "\x00"},
        {"salutation": ["Frau"]},
        {"email": big + "@example.org"},
    ]:
        event = f.therapist_upserted(tid())
        event["payload"].update(overrides)
        calls.append((HANDLE_THERAPIST_EVENT, (), {"event": event}))
    envelope_breakers: list[dict[str, Any]] = [
        {"version": 2},
        {"version": True},
        {"event_id": "not-a-uuid"},
        {"occurred_at": "yesterday"},
        {"occurred_at": "2026-11-02T09:00:00"},
        {"event_type": "therapist.exploded"},
        {"producer": "a\r\nb"},
        {"extra": {"nested": [1, 2, 3]}},
        {"payload": [1, 2]},
        {"payload": big},
    ]
    for change in envelope_breakers:
        event = f.therapist_upserted(tid())
        event.update(change)
        calls.append((HANDLE_THERAPIST_EVENT, (), {"event": event}))
    good_shape = f.therapist_upserted(tid())
    patient_as_text = f.request_created(tid(), therapist_id=tid(), patient_id=tid())
    patient_as_text["payload"]["patient"] = "F32.1"
    calls += [
        (HANDLE_THERAPIST_EVENT, (good_shape,), {}),
        (HANDLE_THERAPIST_EVENT, (), {"evnt": good_shape}),
        (HANDLE_THERAPIST_EVENT, (), {"event": good_shape, "extra": 1}),
        (HANDLE_THERAPIST_EVENT, (), {}),
        (HANDLE_THERAPIST_EVENT, (), {"event": [good_shape]}),
        (HANDLE_THERAPIST_EVENT, (), {"event": "therapist.upserted"}),
        (HANDLE_THERAPIST_EVENT, (), {"event": None}),
        (HANDLE_THERAPIST_EVENT, (), {"event": deep(200, as_list=False)}),
        (HANDLE_MATCHING_EVENT, (), {"event": f.therapist_upserted(tid())}),
        (HANDLE_MATCHING_EVENT, (), {"event": patient_as_text}),
        (HANDLE_PATIENT_EVENT, (), {"event": {"patient_id": tid()}}),
        (QUEUE_EMAIL, (), {"command": {"command_id": str(uuid.uuid4())}}),
        (QUEUE_EMAIL, (), {"event": {"command_id": str(uuid.uuid4())}}),
        (SCHEDULE_CALL, (), {"command": 42}),
        (RECORD_CALL_OUTCOME, (), {"command": {"call_id": tid(), "status": "x"}}),
        (RECORD_EMAIL_RESPONSE, (), {"command": {"email_id": big}}),
    ]
    # request_created with a request id only hostile messages use, and an invalid field.
    broken_request = f.request_created(tid(), therapist_id=tid(), patient_id=tid())
    broken_request["payload"]["created_at"] = "morgen"
    calls.append((HANDLE_MATCHING_EVENT, (), {"event": broken_request}))
    return calls


def publish_raw(
    broker_url: str, body: bytes | str, content_type: str, headers: dict[str, Any]
) -> None:
    """Publish a raw message to the ``celery`` queue, as a foreign producer could."""
    with Connection(broker_url) as connection:
        # The default exchange, which routes by queue name on either broker.
        producer = Producer(connection, exchange=Exchange(""))
        producer.publish(
            body,
            routing_key="celery",
            content_type=content_type,
            content_encoding="utf-8" if isinstance(body, str) else "binary",
            headers=headers,
            declare=[],
        )


# Pickle, not JSON, no task header, text/plain, a task nobody registered.
RAW_REFUSED = 5


def test_a_real_worker_survives_hostile_messages_and_applies_the_next_good_one(
    broker_url: str, fuzz_worker: WorkerProcess, committed_db: Engine
) -> None:
    hostile_ids: list[int] = []
    calls = hostile_calls(hostile_ids)
    task_headers = {
        "lang": "py",
        "task": HANDLE_THERAPIST_EVENT,
        "id": str(uuid.uuid4()),
        "argsrepr": "()",
        "kwargsrepr": "{}",
    }
    app = Celery("hostile-service", broker=broker_url, set_as_current=False)
    app.conf.task_serializer = "json"
    try:
        # Refused before any task runs: pickle, a body that is not JSON, no task header,
        # a task nobody registered, a body of the wrong shape.
        publish_raw(
            broker_url,
            b"\x80\x04\x95not really pickle",
            "application/x-python-serialize",
            task_headers,
        )
        publish_raw(
            broker_url, "{not json", "application/json", {**task_headers, "id": str(uuid.uuid4())}
        )
        publish_raw(broker_url, '{"hello": "world"}', "application/json", {})
        publish_raw(
            broker_url, "[[], {}, {}]", "text/plain", {**task_headers, "id": str(uuid.uuid4())}
        )
        app.send_task("comms.no_such_task", kwargs={"event": {}})
        for task, args, kwargs in calls:
            app.send_task(task, args=args, kwargs=kwargs)
        good_id = fresh_id()
        app.send_task(HANDLE_THERAPIST_EVENT, kwargs={"event": f.therapist_upserted(good_id)})

        def good_applied() -> bool:
            with Session(committed_db) as session:
                return session.get(Therapist, good_id) is not None

        fuzz_worker.wait_for(good_applied, timeout=60)

        def letters() -> int:
            return count_rows(committed_db, DeadLetter)

        # The good message may overtake the last hostile ones (concurrency 2).
        fuzz_worker.wait_for(lambda: letters() >= len(calls) + RAW_REFUSED, timeout=30)
    finally:
        app.close()

    assert fuzz_worker.process.poll() is None, fuzz_worker.tail()
    # The messages refused before any task ran are dead letters too.
    assert letters() == len(calls) + RAW_REFUSED
    with Session(committed_db) as session:
        processed_count = session.scalar(select(func.count()).select_from(ProcessedMessage))
        leaked = session.scalars(select(Therapist.id).where(Therapist.id.in_(hostile_ids))).all()
        requests = session.scalars(
            select(PlacementRequest.id).where(PlacementRequest.id.in_(hostile_ids))
        ).all()
        patients = session.scalars(select(Patient.id).where(Patient.id.in_(hostile_ids))).all()
    assert processed_count == 1
    assert (leaked, requests, patients) == ([], [], [])
    log = fuzz_worker.log()
    assert "application/x-python-serialize" in log, fuzz_worker.tail()
    assert "unknown task comms.no_such_task" in log, fuzz_worker.tail()
    print(
        f"RELIABILITY fuzz worker: hostile={len(calls)} dead_letters={letters()} "
        f"raw_refused={RAW_REFUSED} worker_alive=True"
    )
