"""The bench judges like for like: one worker process and one SMTP connection.

The stages themselves run in ``make bench`` (CI runs it at the tiny size); these tests
pin down which figures the targets are judged by.
"""

from __future__ import annotations

from typing import Any

from bench.run import LIKE_FOR_LIKE, SCALE_OUT, SIZES, build_report, worker_environment

PEAK = {"main": 100.0, "pool-1": 120.0}


def stages(batching_seconds: float, emails_per_second: float) -> dict[str, dict[str, Any]]:
    return {
        "batching": {"seconds": batching_seconds, "peak_rss_mb": PEAK},
        "sending": {"emails_per_second": emails_per_second, "peak_rss_mb": PEAK},
    }


def report(like_for_like: dict[str, Any], scale_out: dict[str, Any]) -> dict[str, Any]:
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
    return build_report(
        SIZES["full"], like_for_like, scale_out, runs, [10.0], baseline_sending, {}, "15"
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
    result = report(stages(40.0, 90.0), stages(25.0, 160.0))
    assert result["batching"]["ratio"] == 4.0
    assert result["batching"]["met"] is False
    assert result["batching"]["scale_out"]["ratio"] == 2.5
    assert result["sending"]["met"] is True
    assert result["all_targets_met"] is False
    met = report(stages(25.0, 90.0), stages(15.0, 160.0))
    assert met["all_targets_met"] is True
    assert "1 process" in met["machine"]["judged_shape"]
