"""The pure rules of the weekly batch, without a database."""

from __future__ import annotations

import datetime as dt
import zoneinfo

from hypothesis import given
from hypothesis import strategies as st

from comms_tasks.models.enums import EmailTemplate, TherapistStatus
from comms_tasks.rules.batching import (
    Contactability,
    OpenRequest,
    TherapistFacts,
    batch_order,
    contactability,
    select_batch,
    template_for,
)

NOW = dt.datetime(2026, 11, 30, 6, 30, tzinfo=dt.UTC)
WEEK = dt.timedelta(days=7)


def facts(**overrides: object) -> TherapistFacts:
    values: dict[str, object] = {
        "therapist_id": 1,
        "status": TherapistStatus.ACTIVE,
        "has_email": True,
    }
    values.update(overrides)
    return TherapistFacts(**values)  # type: ignore[arg-type]


def check(f: TherapistFacts):  # type: ignore[no-untyped-def]
    return contactability(f, NOW, contact_interval=WEEK, call_window=WEEK)


def test_an_active_therapist_with_an_address_and_no_contact_is_contactable() -> None:
    assert check(facts()).contactable


def test_blocked_inactive_deleted_or_without_address_are_never_contactable() -> None:
    for f, reason in [
        (facts(status=TherapistStatus.BLOCKED), "status is blocked"),
        (facts(status=TherapistStatus.INACTIVE), "status is inactive"),
        (facts(deleted=True), "deleted"),
        (facts(has_email=False), "no email address"),
    ]:
        verdict = check(f)
        assert not verdict.contactable
        assert reason in (verdict.reason or "")
        assert verdict.contactable_from is None


def test_an_address_that_bounced_for_good_is_not_emailed_until_it_changes() -> None:
    verdict = check(facts(bounced_since=NOW - dt.timedelta(days=3)))
    assert not verdict.contactable
    assert verdict.reason == (
        "its address bounced for good on 2026-11-27: "
        "waiting for a different address from the therapist service"
    )
    assert verdict.contactable_from is None


def test_a_queued_email_counts_as_this_weeks_contact() -> None:
    verdict = check(facts(has_unsent_email=True))
    assert not verdict.contactable
    assert "queued" in (verdict.reason or "")


def test_an_email_sent_within_the_week_blocks_until_the_same_weekday_a_week_later() -> None:
    sent = NOW - dt.timedelta(days=3)
    verdict = check(facts(last_sent_at=sent))
    assert not verdict.contactable
    assert verdict.contactable_from == (sent + WEEK).date()
    assert check(facts(last_sent_at=NOW - WEEK)).contactable
    assert check(facts(last_sent_at=NOW - WEEK + dt.timedelta(hours=12))).contactable


def test_a_call_in_the_next_week_blocks_and_one_later_does_not() -> None:
    soon = NOW + dt.timedelta(days=2)
    verdict = check(facts(scheduled_calls=(soon,)))
    assert not verdict.contactable
    assert verdict.contactable_from == soon.date() + dt.timedelta(days=1)
    assert check(facts(scheduled_calls=(NOW + dt.timedelta(days=8),))).contactable
    assert check(facts(scheduled_calls=(NOW - dt.timedelta(days=1),))).contactable


def test_the_later_of_two_blocks_decides_when_contact_is_possible() -> None:
    sent = NOW - dt.timedelta(days=6)
    call = NOW + dt.timedelta(days=5)
    verdict = check(facts(last_sent_at=sent, scheduled_calls=(call,)))
    assert verdict.contactable_from == call.date() + dt.timedelta(days=1)


def request(request_id: int, created_day: int, registered: dt.date | None) -> OpenRequest:
    return OpenRequest(request_id, NOW - dt.timedelta(days=30 - created_day), registered)


def test_oldest_registration_first_missing_last_then_age_then_id() -> None:
    requests = [
        request(1, 5, None),
        request(2, 1, dt.date(2026, 9, 1)),
        request(3, 0, dt.date(2026, 8, 1)),
        request(4, 0, dt.date(2026, 9, 1)),
        request(5, 0, None),
        request(6, 0, dt.date(2026, 9, 1)),
    ]
    chosen = select_batch(requests, 5)
    assert [r.placement_request_id for r in chosen] == [3, 4, 6, 2, 5]


def test_at_most_the_limit_and_the_rest_waits() -> None:
    requests = [request(i, i, dt.date(2026, 1, i)) for i in range(1, 7)]
    assert [r.placement_request_id for r in select_batch(requests, 5)] == [1, 2, 3, 4, 5]


def test_template_by_batch_size() -> None:
    assert template_for([object()]) is EmailTemplate.INITIAL_CONTACT
    assert template_for([object(), object()]) is EmailTemplate.BATCH_REQUEST


requests_strategy = st.lists(
    st.builds(
        OpenRequest,
        st.integers(1, 10_000),
        st.datetimes(timezones=st.just(dt.UTC)),
        st.none() | st.dates(),
    ),
    max_size=30,
    unique_by=lambda r: r.placement_request_id,
)


@given(requests_strategy, st.integers(1, 10))
def test_selection_is_the_sorted_prefix(requests: list[OpenRequest], limit: int) -> None:
    chosen = select_batch(requests, limit)
    assert len(chosen) == min(limit, len(requests))
    assert chosen == sorted(requests, key=batch_order)[:limit]
    if chosen:
        worst = batch_order(chosen[-1])
        assert all(batch_order(r) >= worst for r in requests if r not in chosen)


# --- the weekly cadence, in local calendar days --------------------------------------------

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def berlin(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=BERLIN)


def verdict_at(now: dt.datetime, f: TherapistFacts) -> Contactability:
    return contactability(f, now, contact_interval=WEEK, call_window=WEEK, zone=BERLIN)


def test_an_email_that_left_after_the_batch_time_does_not_delay_next_weeks_batch() -> None:
    sent = berlin(2026, 11, 23, 7, 30, 40)  # a Monday, 40 seconds after the 07:30 run
    emailed = facts(last_sent_at=sent)
    assert verdict_at(berlin(2026, 11, 30, 7, 30), emailed).contactable
    on_sunday = verdict_at(berlin(2026, 11, 29, 23, 59), emailed)
    assert not on_sunday.contactable
    assert on_sunday.contactable_from == dt.date(2026, 11, 30)


def test_an_email_sent_on_friday_allows_the_next_on_the_following_friday() -> None:
    sent = berlin(2026, 11, 27, 16, 45)
    emailed = facts(last_sent_at=sent)
    thursday = verdict_at(berlin(2026, 12, 3, 23, 59), emailed)
    assert not thursday.contactable
    assert thursday.contactable_from == dt.date(2026, 12, 4)
    assert "emailed on 2026-11-27" in (thursday.reason or "")
    assert verdict_at(berlin(2026, 12, 4, 7, 30), emailed).contactable


def test_the_day_of_an_email_is_its_local_day_not_its_utc_day() -> None:
    sent = berlin(2026, 12, 1, 0, 20)  # still 30 November in UTC
    verdict = verdict_at(berlin(2026, 12, 7, 7, 30), facts(last_sent_at=sent))
    assert not verdict.contactable
    assert verdict.contactable_from == dt.date(2026, 12, 8)
    assert "emailed on 2026-12-01" in (verdict.reason or "")


def test_a_week_across_the_spring_clock_change_is_seven_calendar_days() -> None:
    # 29 March 2026 has 23 hours: Monday to Monday is 6 days 23 hours.
    sent = berlin(2026, 3, 23, 7, 30)
    emailed = facts(last_sent_at=sent)
    assert verdict_at(berlin(2026, 3, 30, 7, 30), emailed).contactable
    assert verdict_at(berlin(2026, 3, 30, 0, 0), emailed).contactable
    assert not verdict_at(berlin(2026, 3, 29, 23, 59), emailed).contactable


def test_a_week_across_the_autumn_clock_change_is_seven_calendar_days() -> None:
    # 25 October 2026 has 25 hours; an email late on Monday still frees the next Monday.
    sent = berlin(2026, 10, 19, 23, 30)
    emailed = facts(last_sent_at=sent)
    assert verdict_at(berlin(2026, 10, 26, 0, 5), emailed).contactable
    sunday = verdict_at(berlin(2026, 10, 25, 23, 59), emailed)
    assert not sunday.contactable
    assert sunday.contactable_from == dt.date(2026, 10, 26)


def test_a_call_blocks_the_batch_on_its_day_and_the_six_days_before() -> None:
    monday = berlin(2026, 11, 30, 7, 30)
    sunday_call = facts(scheduled_calls=(berlin(2026, 12, 6, 18, 0).astimezone(dt.UTC),))
    verdict = verdict_at(monday, sunday_call)
    assert not verdict.contactable
    assert "a call is scheduled for 2026-12-06 18:00" in (verdict.reason or "")
    assert verdict.contactable_from == dt.date(2026, 12, 7)
    # A week from today is no longer in "the next 7 days", whatever its time.
    next_monday_early = facts(scheduled_calls=(berlin(2026, 12, 7, 7, 0).astimezone(dt.UTC),))
    assert verdict_at(monday, next_monday_early).contactable


def test_a_call_earlier_today_still_blocks_todays_batch() -> None:
    monday = berlin(2026, 11, 30, 7, 30)
    called_at_seven = facts(scheduled_calls=(berlin(2026, 11, 30, 7, 0).astimezone(dt.UTC),))
    verdict = verdict_at(monday, called_at_seven)
    assert not verdict.contactable
    assert verdict.contactable_from == dt.date(2026, 12, 1)
    yesterday = facts(scheduled_calls=(berlin(2026, 11, 29, 16, 0).astimezone(dt.UTC),))
    assert verdict_at(monday, yesterday).contactable


def test_the_day_contact_is_possible_again_is_free_of_every_later_call() -> None:
    tuesday = berlin(2026, 12, 1, 7, 30)
    calls = (berlin(2026, 12, 3, 10, 0), berlin(2026, 12, 9, 10, 0))
    two_calls = facts(scheduled_calls=tuple(at.astimezone(dt.UTC) for at in calls))
    verdict = verdict_at(tuesday, two_calls)
    assert verdict.contactable_from == dt.date(2026, 12, 10)
    # The date holds: the day before it is still blocked, the day itself is free.
    assert not verdict_at(berlin(2026, 12, 9, 7, 30), two_calls).contactable
    assert verdict_at(berlin(2026, 12, 10, 7, 30), two_calls).contactable
    # The same after an email: the week's end falls in a later call's window.
    emailed = facts(
        last_sent_at=berlin(2026, 11, 30, 7, 31).astimezone(dt.UTC),
        scheduled_calls=(berlin(2026, 12, 10, 10, 0).astimezone(dt.UTC),),
    )
    assert verdict_at(tuesday, emailed).contactable_from == dt.date(2026, 12, 11)
