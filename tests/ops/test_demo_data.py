"""The demo sample: reproducible, within the contracts, and shaped to exercise the service."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import Counter, defaultdict
from typing import Any

import pytest

from comms_tasks.contracts import validate_event
from comms_tasks.ops.demo import DemoMessage, demo_messages

THERAPIST = "comms.handle_therapist_event"
MATCHING = "comms.handle_matching_event"
NOW = dt.datetime(2026, 11, 29, 9, 30, 15, 123456, tzinfo=dt.UTC)
# More open requests than one email carries: batching must split them.
BATCH_SIZE = 5


@pytest.fixture(scope="module")
def messages() -> list[DemoMessage]:
    return demo_messages(NOW)


def therapists(messages: list[DemoMessage]) -> list[dict[str, Any]]:
    return [m.kwargs["event"]["payload"] for m in messages if m.task_name == THERAPIST]


def requests(messages: list[DemoMessage]) -> list[dict[str, Any]]:
    return [m.kwargs["event"]["payload"] for m in messages if m.task_name == MATCHING]


def test_the_same_arguments_give_the_same_messages(messages: list[DemoMessage]) -> None:
    assert demo_messages(NOW) == messages
    assert demo_messages(NOW, seed=7) == demo_messages(NOW, seed=7)
    assert demo_messages(NOW, seed=7) != messages


def test_therapist_events_come_first_then_the_requests(messages: list[DemoMessage]) -> None:
    tasks = [m.task_name for m in messages]
    assert tasks == [THERAPIST] * 30 + [MATCHING] * 120
    event_types = {m.task_name: m.kwargs["event"]["event_type"] for m in messages}
    assert event_types == {
        THERAPIST: "therapist.upserted",
        MATCHING: "placement_request.created",
    }


def test_thirty_therapists_in_the_specified_mix(messages: list[DemoMessage]) -> None:
    profiles = therapists(messages)
    assert [p["therapist_id"] for p in profiles] == list(range(1, 31))
    assert Counter(p["status"] for p in profiles) == {"active": 25, "blocked": 3, "inactive": 2}
    active = [p for p in profiles if p["status"] == "active"]
    without_email = [p for p in active if p["email"] is None]
    without_phone = [p for p in active if p["phone_availability"] is None]
    assert len(without_email) == 2
    assert len(without_phone) == 3
    assert all(p["phone"] is None for p in without_phone)
    assert not {p["therapist_id"] for p in without_email} & {
        p["therapist_id"] for p in without_phone
    }
    reachable = [p for p in profiles if p not in without_email and p not in without_phone]
    assert len(reachable) == 25
    assert all(p["email"] and p["phone"] and p["phone_availability"] for p in reachable)


def test_office_hours_are_short_windows_on_a_five_minute_grid(
    messages: list[DemoMessage],
) -> None:
    for profile in therapists(messages):
        availability = profile["phone_availability"]
        if availability is None:
            continue
        windows = [w for day in availability.values() for w in day]
        assert 1 <= len(windows) <= 3
        for window in windows:
            start = dt.datetime.strptime(window["start"], "%H:%M")
            end = dt.datetime.strptime(window["end"], "%H:%M")
            assert start.minute % 5 == 0
            assert end.minute % 5 == 0
            assert dt.timedelta(minutes=25) <= end - start <= dt.timedelta(minutes=60)


def test_about_120_requests_from_about_60_patients(messages: list[DemoMessage]) -> None:
    placed = requests(messages)
    assert [r["placement_request_id"] for r in placed] == list(range(1, 121))
    per_patient = Counter(r["patient_id"] for r in placed)
    assert 50 <= len(per_patient) <= 70
    assert set(per_patient.values()) <= {1, 2, 3, 4}
    assert max(per_patient.values()) > 1


def test_every_message_satisfies_its_contract(messages: list[DemoMessage]) -> None:
    for message in messages:
        assert set(message.kwargs) == {"event"}
        validate_event(message.task_name, message.kwargs["event"])


def test_every_message_is_plain_json(messages: list[DemoMessage]) -> None:
    for message in messages:
        text = json.dumps(message.kwargs, allow_nan=False)
        assert json.loads(text) == message.kwargs


def test_event_ids_are_distinct_uuids(messages: list[DemoMessage]) -> None:
    event_ids = [m.kwargs["event"]["event_id"] for m in messages]
    assert len(set(event_ids)) == len(event_ids)
    for event_id in event_ids:
        assert str(uuid.UUID(event_id)) == event_id


def test_no_patient_asks_the_same_therapist_twice(messages: list[DemoMessage]) -> None:
    pairs = [(r["patient_id"], r["therapist_id"]) for r in requests(messages)]
    assert len(set(pairs)) == len(pairs)


def test_some_therapists_have_more_open_requests_than_one_batch(
    messages: list[DemoMessage],
) -> None:
    load = Counter(r["therapist_id"] for r in requests(messages))
    assert max(load.values()) > BATCH_SIZE
    assert max(load.values()) <= 9
    assert 1 in load.values()


def test_every_request_goes_to_a_known_therapist_mostly_an_active_one(
    messages: list[DemoMessage],
) -> None:
    status = {p["therapist_id"]: p["status"] for p in therapists(messages)}
    placed = requests(messages)
    assert all(r["therapist_id"] in status for r in placed)
    to_inactive = [r for r in placed if status[r["therapist_id"]] != "active"]
    assert len(to_inactive) <= len(placed) // 10


def test_a_patient_summary_is_the_same_in_all_of_its_requests(
    messages: list[DemoMessage],
) -> None:
    summaries: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for request in requests(messages):
        summaries[request["patient_id"]].append(request["patient"])
    for patient_summaries in summaries.values():
        assert all(s == patient_summaries[0] for s in patient_summaries)
    unregistered = [s for s, *_ in summaries.values() if s.get("registered_on") is None]
    assert 1 <= len(unregistered) <= len(summaries) // 10


def test_request_times_are_in_the_last_forty_days(messages: list[DemoMessage]) -> None:
    for message in messages[30:]:
        event = message.kwargs["event"]
        request = event["payload"]
        created_at = dt.datetime.fromisoformat(request["created_at"])
        assert event["occurred_at"] == request["created_at"]
        assert NOW - dt.timedelta(days=40) <= created_at <= NOW - dt.timedelta(days=1)
        registered_on = request["patient"].get("registered_on")
        if registered_on is not None:
            assert dt.date.fromisoformat(registered_on) < created_at.date()


def test_summaries_carry_no_patient_names(messages: list[DemoMessage]) -> None:
    for request in requests(messages):
        assert not {"name", "first_name", "last_name"} & set(request["patient"])


@pytest.mark.parametrize(
    ("therapist_count", "request_count"), [(1, 3), (5, 8), (10, 25), (60, 300), (30, 0)]
)
def test_other_sizes_also_satisfy_the_contracts(therapist_count: int, request_count: int) -> None:
    sample = demo_messages(NOW, therapists=therapist_count, requests=request_count)
    for message in sample:
        validate_event(message.task_name, message.kwargs["event"])
    assert len(therapists(sample)) == therapist_count
    placed = requests(sample)
    assert len(placed) == request_count
    pairs = {(r["patient_id"], r["therapist_id"]) for r in placed}
    assert len(pairs) == request_count


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        demo_messages(dt.datetime(2026, 11, 29, 9, 30))
