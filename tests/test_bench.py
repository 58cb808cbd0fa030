"""The bench judges like for like: one worker process and one SMTP connection.

The stages themselves run in ``make bench`` (CI runs it at the tiny size); these tests
pin down which figures the targets are judged by, and that the mailbox stage's Maildir
holds what the service's classifier and matcher make of it.
"""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path
from typing import Any

from bench import inbound as bench_inbound
from bench import mailbox as bench_mailbox
from bench.run import (
    LIKE_FOR_LIKE,
    SCALE_OUT,
    SIZES,
    build_report,
    verdict,
    worker_environment,
)
from comms_tasks.contracts import validate_event
from comms_tasks.mail import tokens as reply_tokens
from comms_tasks.mailbox.classify import MailKind, classify, parse
from comms_tasks.mailbox.match import keys
from comms_tasks.models.base import utcnow

PEAK = {"main": 100.0, "pool-1": 120.0}
MAILBOX = {"messages_per_second": 150.0, "peak_rss_mb": PEAK}
PARSING = {"messages": 10_000, "messages_per_second": 400.0, "each": [380.0, 400.0]}


def stages(
    batching_seconds: float, emails_per_second: float, mailbox: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    shape = {
        "batching": {"seconds": batching_seconds, "peak_rss_mb": PEAK},
        "sending": {"emails_per_second": emails_per_second, "peak_rss_mb": PEAK},
    }
    if mailbox is not None:
        shape["mailbox"] = mailbox
    return shape


def report(
    like_for_like: dict[str, Any],
    scale_out: dict[str, Any],
    inbound: dict[str, Any] | None = None,
) -> dict[str, Any]:
    like_for_like = {"mailbox": MAILBOX, **like_for_like}
    runs = [
        {"unanswered_emails": 1_000, "seconds": 1.0, "peak_rss_mb": PEAK},
        {"unanswered_emails": 10_000, "seconds": 10.0, "peak_rss_mb": PEAK},
    ]
    baseline_sending = {
        "emails": 10_000,
        "send_message_per_second": 100.0,
        "send_message_each": [100.0],
        "sendmail_per_second": 200.0,
        "sendmail_each": [200.0],
    }
    extra = () if inbound is None else (inbound,)
    return build_report(
        SIZES["full"],
        like_for_like,
        scale_out,
        runs,
        [10.0],
        baseline_sending,
        PARSING,
        {},
        "15",
        *extra,
    )


def test_the_judged_shape_is_one_process_and_one_smtp_connection() -> None:
    assert (LIKE_FOR_LIKE.processes, LIKE_FOR_LIKE.smtp_connections) == (1, 1)
    assert (SCALE_OUT.processes, SCALE_OUT.smtp_connections) == (2, 2)
    env = worker_environment("postgresql://db", "redis://broker", ("127.0.0.1", 25), LIKE_FOR_LIKE)
    assert env["COMMS_SMTP_CONNECTIONS"] == "1"
    env = worker_environment("postgresql://db", "redis://broker", ("127.0.0.1", 25), SCALE_OUT)
    assert env["COMMS_SMTP_CONNECTIONS"] == "2"


def test_the_sending_target_is_judged_on_one_connection_and_scale_out_only_reported() -> None:
    # Two connections reach 1.6x the one raw connection; one connection only 0.7x.
    result = report(stages(20.0, 70.0), stages(15.0, 160.0))
    sending = result["sending"]
    assert sending["ratio"] == 0.7
    assert sending["met"] is False
    assert sending["scale_out"]["ratio"] == 1.6
    assert sending["ratio_to_bare_sendmail"] == 0.35
    assert result["all_targets_met"] is False


def test_the_batching_target_is_judged_on_one_process() -> None:
    # One process takes 4x the bulk insert (missed); two processes 2.5x (only reported).
    result = report(stages(40.0, 170.0), stages(25.0, 160.0))
    assert result["batching"]["ratio"] == 4.0
    assert result["batching"]["met"] is False
    assert result["batching"]["scale_out"]["ratio"] == 2.5
    assert result["sending"]["met"] is True
    assert result["all_targets_met"] is False
    met = report(stages(25.0, 170.0), stages(15.0, 160.0))
    assert met["all_targets_met"] is True
    assert "1 process" in met["machine"]["judged_shape"]


def test_the_mailbox_target_is_judged_against_parsing_the_same_files() -> None:
    # 150 messages/s classified and applied against 400/s parsed: 0.375x, met.
    met = report(stages(25.0, 170.0), stages(15.0, 160.0))
    mailbox = met["mailbox"]
    assert mailbox["ratio"] == 0.375
    assert (mailbox["met"], mailbox["aim_met"]) == (True, False)
    assert mailbox["target"] == ">= 0.33"
    assert mailbox["baseline_messages_per_second_each"] == [380.0, 400.0]
    assert met["all_targets_met"] is True
    assert met["memory"]["per_stage_mb"]["mailbox"] == PEAK
    # 100 messages/s is a quarter of the parsing rate: missed, and so the run.
    slow = {"messages_per_second": 100.0, "peak_rss_mb": {"main": 90.0, "pool-1": 310.0}}
    missed = report(stages(25.0, 90.0, mailbox=slow), stages(15.0, 160.0))
    assert missed["mailbox"]["ratio"] == 0.25
    assert missed["mailbox"]["met"] is False
    assert missed["memory"]["highest_mb"] == 310.0
    assert missed["all_targets_met"] is False


def test_only_the_mailbox_worker_reads_the_maildir_with_tagged_addresses(tmp_path: Path) -> None:
    plain = worker_environment("postgresql://db", "redis://b", ("127.0.0.1", 25), LIKE_FOR_LIKE)
    assert "COMMS_REPLY_ADDRESS" not in plain and "COMMS_MAILBOX_DIR" not in plain
    env = worker_environment(
        "postgresql://db", "redis://b", ("127.0.0.1", 25), LIKE_FOR_LIKE, mailbox=(tmp_path, 40)
    )
    assert env["COMMS_MAILBOX_BACKEND"] == "maildir"
    assert env["COMMS_MAILBOX_DIR"] == str(tmp_path)
    assert env["COMMS_MAILBOX_BATCH"] == "40"
    assert env["COMMS_REPLY_ADDRESS"] == bench_mailbox.REPLY_ADDRESS
    assert env["COMMS_BOUNCE_ADDRESS"] == bench_mailbox.BOUNCE_ADDRESS
    # Every size chains polls: more messages than one poll reads.
    assert all(size.mails > size.mail_batch for size in SIZES.values())
    assert (SIZES["full"].mails, SIZES["tiny"].mails) == (10_000, 100)


def test_the_maildir_answers_real_emails_in_the_mix_the_classifier_sees(tmp_path: Path) -> None:
    """No database: the files, read back, are what the service will make of them."""
    emails = [
        bench_mailbox.Answered(
            reply_tokens.new_token(), f"<{i:032x}@therapievermittlung.example>", f"t{i}@x.de"
        )
        for i in range(40)
    ]
    by_token = {email.reply_token: email for email in emails}
    expected = bench_mailbox.build_maildir(tmp_path, emails, 200)
    assert sum(expected.values()) == 200
    assert expected["reply"] == 150 and expected["unrelated"] == 14

    files = bench_mailbox.message_files(tmp_path)
    assert len(files) == 200
    raws = [path.read_bytes() for path in files]
    # Unique bytes: none is taken for one seen before (the table is unique on their hash).
    assert len({hashlib.sha256(raw).digest() for raw in raws}) == 200
    kinds: collections.Counter[str] = collections.Counter()
    answered = threaded = 0
    for raw in raws:
        message = parse(raw)
        classified = classify(raw, parsed=message)
        kinds[classified.kind.value] += 1
        found = keys(
            message if message is not None else raw,
            classified,
            reply_address=bench_mailbox.REPLY_ADDRESS,
            bounce_address=bench_mailbox.BOUNCE_ADDRESS,
        )
        if classified.kind is MailKind.UNRELATED:
            continue
        # Each answer carries one real email's token and (but Outlook's legacy
        # out-of-office) its Message-ID; a reply comes from that email's recipient
        # unless it is the private-address sample.
        [token] = set(found.tokens)
        email = by_token[token]
        if found.message_ids:
            assert set(found.message_ids) == {email.message_id}
            threaded += 1
        if classified.kind is MailKind.REPLY and found.sender == email.recipient:
            answered += 1
    assert dict(kinds) == expected
    assert threaded == 200 - 14 - 4  # outlook_ooo_legacy.eml: 2 of every 100
    assert answered == 150 - 20  # gmail_reply.eml: 10 of every 100, from her own address


def test_the_inbound_events_are_the_contracts_messages_in_the_mix() -> None:
    """No broker: the stage sends what other services send, valid against the contracts."""
    size = SIZES["tiny"]
    batch = bench_inbound.messages(size, bench_inbound.EVENTS["tiny"], utcnow())
    kinds = collections.Counter(event["event_type"] for _, event in batch)
    assert kinds == {
        "therapist.upserted": 100,
        "placement_request.created": 150,
        "placement_request.status_changed": 150,
        "patient.updated": 100,
    }
    assert len({event["event_id"] for _, event in batch}) == len(batch) == 500
    for task_name, event in batch:
        validate_event(task_name, event)
    changed = [event["payload"] for _, event in batch if "new_status" in event["payload"]]
    # Seeded requests, each changed once; one in five rejected (withdrawn from calls).
    assert {p["placement_request_id"] for p in changed} == set(range(1, 151))
    assert sum(p["new_status"] == "rejected" for p in changed) == 30
    # The full size's 6,000 status changes fit its 50,000 seeded requests.
    assert bench_inbound.EVENTS["full"] * 3 // 10 <= SIZES["full"].requests


def test_the_inbound_target_is_judged_per_broker_against_the_no_op_worker() -> None:
    def broker(rate: float, baseline: float) -> dict[str, Any]:
        ratio = rate / baseline
        return {
            "events_per_second": rate,
            "seconds": 20_000 / rate,
            "baseline_events_per_second": baseline,
            "ratio": ratio,
            "peak_rss_mb": PEAK,
            **verdict(ratio, bench_inbound.TARGET, bench_inbound.AIM, higher_is_better=True),
        }

    inbound = {"events": 20_000, "redis": broker(300.0, 500.0), "rabbitmq": broker(200.0, 500.0)}
    inbound["met"] = all(inbound[name]["met"] for name in bench_inbound.BROKERS)
    result = report_with_inbound(inbound)
    assert result["inbound"]["redis"]["met"] is True
    assert result["inbound"]["rabbitmq"]["met"] is False
    assert result["all_targets_met"] is False
    assert result["memory"]["per_stage_mb"]["inbound_rabbitmq"] == PEAK
    rows = bench_inbound.table_rows(result["inbound"])
    assert [row[0] for row in rows] == ["inbound, redis", "inbound, rabbitmq"]
    assert rows[0][3] == "0.60x the rate"


def report_with_inbound(inbound: dict[str, Any]) -> dict[str, Any]:
    return report(stages(25.0, 170.0), stages(15.0, 160.0), inbound)
