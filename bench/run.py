"""``make bench``: seed PostgreSQL, run the real tasks on a real worker, compare with baselines.

The service runs as it does in production: ``celery -A comms_tasks worker``, a Redis
broker of its own (a private ``redis-server``), PostgreSQL, and an SMTP sink in its own
process. It runs in two shapes, each on a freshly seeded database:

- **like for like** (judged): one pool process and ``COMMS_SMTP_CONNECTIONS=1``, against
  baselines that also use one connection;
- **scale-out** (reported beside it): two pool processes and two SMTP connections, as
  production runs by default; the scheduling stage runs in this shape.

The bench plays beat: it sends the scheduled tasks by name and waits for their effects in
the database. A stage ends when the service wrote the last of its events
(``outbox.created_at`` of ``email.queued``, ``email.sent``, ``call.scheduled``: the last
statement of each transaction before its commit), so polling does not add to it.

Baselines run in the same run, after the worker has stopped, on the same machine:

- batching: the email and batch rows the service wrote, inserted again in bulk into a
  second database seeded the same way (one transaction, ``executemany``);
- sending: the same messages, built beforehand, sent with plain ``smtplib`` over one
  reused connection to the same sink;
- mailbox: the files of the mailbox stage's Maildir, each read and parsed with
  ``email.message_from_bytes`` (``policy.default``) in one process.

The mailbox stage runs in the like-for-like shape after the batching and sending
baselines, on a worker of its own started with the Maildir settings: every email sent
gets its answers (replies, automatic answers, bounces, a few unrelated messages) in a
Maildir, and the bench sends ``comms.poll_mailbox`` until every message is applied.

``python -m bench --size full`` (``make bench``) or ``--size tiny`` (CI: proves it works;
targets are shown but not judged at that size). The report goes to
``var/bench/report-<size>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import email
import email.policy
import json
import os
import platform
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from celery import Celery
from rich import table as rich_table
from rich.console import Console
from sqlalchemy import Engine, Table, create_engine, func, insert, select, text
from sqlalchemy.orm import Session

from bench import inbound as bench_inbound
from bench import mailbox as bench_mailbox
from bench.memory import StagePeak, memory_cells
from bench.seed import Size, fresh_database, read_model_rows, seed
from comms_tasks.emails import composing
from comms_tasks.emails.delivery import outgoing
from comms_tasks.mail.message import ascii_address, build_mime
from comms_tasks.models import (
    Email,
    EmailBatch,
    EmailStatus,
    EmailTemplate,
    InboundMail,
    OutboxEvent,
    PhoneCall,
    PhoneCallBatch,
)
from comms_tasks.models.base import SCHEMA, utcnow
from comms_tasks.task_names import BATCH_REQUESTS, FOLLOW_UP_CHECK, POLL_MAILBOX, SEND_EMAIL

PROJECT_ROOT = Path(__file__).resolve().parent.parent
OUT = PROJECT_ROOT / "var" / "bench"
SIZES = {
    "full": Size("full", therapists=10_000, requests=50_000, calls=(1_000, 10_000)),
    # 100 messages in polls of 40: the bench chains three polls, as at full size.
    # 2,000 emails: the sending stage in a few minutes, to compare changes back to back.
    "small": Size("small", therapists=2_000, requests=10_000, calls=(100, 1_000)),
    "tiny": Size("tiny", therapists=40, requests=200, calls=(10, 40), mails=100, mail_batch=40),
}
DEFAULT_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432"
# BENCH_DATABASE names them otherwise, so that two checkouts can run the bench at once.
SERVICE_DATABASE = os.environ.get("BENCH_DATABASE", "comms_bench")
BASELINE_DATABASE = f"{SERVICE_DATABASE}_baseline"
# Enough operators that every follow-up call fits the horizon: the stage measures
# booking, not a full call centre (which would end in reminder emails instead).
CALLS_PER_SLOT = 40
BATCHING_TARGET, BATCHING_AIM = 3.0, 2.0
# Sending, one SMTP connection each: >= 1.0x smtplib's send_message, >= 0.8x bare sendmail.
SENDING_TARGET, SENDING_BARE_TARGET = 1.0, 0.8
GROWTH_TARGET = 12.0
MAILBOX_TARGET, MAILBOX_AIM = 0.33, 0.5
MEMORY_LIMIT_MB = 300.0
STAGE_TIMEOUT = 900.0
# The 1,000-call run takes under a second: its median of three keeps one slow moment
# (a garbage collection, a checkpoint) from deciding the growth figure.
SCHEDULING_REPEATS = 3
# Baselines are tried this many times and the best counts: the strictest comparison.
BASELINE_REPEATS = 3
# Beat sends comms.send_email every minute; the bench does the same while it waits.
SEND_EMAIL_EVERY = 60.0
FOLLOW_UP_AGE = dt.timedelta(days=8)
# Times come from the database, so the poll interval only adds to the bench's own run.
POLL_SECONDS = 0.2
MAILDIR = OUT / "mailbox"
MAILBOX_LOG = OUT / "worker-mailbox.log"
# A poll that made no progress for this long is sent again, as beat would.
POLL_AGAIN_AFTER = 10.0


def table(model: type) -> Table:
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class Shape:
    """How the worker runs: its pool processes and its SMTP connections."""

    name: str
    processes: int
    smtp_connections: int

    @property
    def log(self) -> Path:
        return OUT / f"worker-{self.name}.log"


# The judged figures compare one process and one SMTP connection with baselines that use
# one database connection and one SMTP connection; the scale-out figures are beside them.
LIKE_FOR_LIKE = Shape("like-for-like", processes=1, smtp_connections=1)
SCALE_OUT = Shape("scale-out", processes=2, smtp_connections=2)


class BenchError(RuntimeError):
    """The bench could not run a stage (not a missed target)."""


def wait_until(
    condition: Callable[[], bool], what: str, tick: Callable[[], None] | None = None
) -> None:
    deadline = time.monotonic() + STAGE_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {STAGE_TIMEOUT:.0f} s waiting for {what}")
        if tick is not None:
            tick()
        time.sleep(POLL_SECONDS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the processes --------------------------------------------------------------------


@contextlib.contextmanager
def process(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as output:
        child = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def wait_for_log(
    child: subprocess.Popen[bytes], log: Path, marker: str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while marker not in log.read_text(errors="replace"):
        if child.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise BenchError(f"{child.args!r} did not start:\n{tail}")
        time.sleep(0.1)


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    port = free_port()
    command = [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
    ]
    command += ["--save", "", "--appendonly", "no"]
    log = OUT / "redis.log"
    with process(command, log) as child:
        wait_for_log(child, log, "Ready to accept connections")
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def smtp_sink(stats: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    command = [sys.executable, "-m", "bench.sink", "--port", str(port), "--stats", str(stats)]
    log = OUT / "sink.log"
    with process(command, log) as child:
        wait_for_log(child, log, "ready")
        yield "127.0.0.1", port


def worker_environment(
    database_url: str,
    broker_url: str,
    smtp: tuple[str, int],
    shape: Shape,
    mailbox: tuple[Path, int] | None = None,
) -> dict[str, str]:
    """The worker's settings; ``mailbox`` (its Maildir, its batch) for the mailbox stage.

    The reply and bounce addresses are set for the mailbox stage only: the sending
    baseline builds its messages with the bench's own settings, so the sending stages
    send what it sends.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMMS_")}
    env.update(
        COMMS_DATABASE_URL=database_url,
        COMMS_BROKER_URL=broker_url,
        COMMS_VAR_DIR=str(OUT / "var"),
        COMMS_MAIL_BACKEND="smtp",
        COMMS_SMTP_HOST=smtp[0],
        COMMS_SMTP_PORT=str(smtp[1]),
        COMMS_SMTP_SECURITY="none",
        COMMS_CALLS_PER_SLOT=str(CALLS_PER_SLOT),
        COMMS_SMTP_CONNECTIONS=str(shape.smtp_connections),
    )
    if mailbox is not None:
        folder, batch = mailbox
        env.update(
            COMMS_MAILBOX_BACKEND="maildir",
            COMMS_MAILBOX_DIR=str(folder),
            COMMS_MAILBOX_BATCH=str(batch),
            COMMS_REPLY_ADDRESS=bench_mailbox.REPLY_ADDRESS,
            COMMS_BOUNCE_ADDRESS=bench_mailbox.BOUNCE_ADDRESS,
        )
    return env


@contextlib.contextmanager
def worker(
    env: dict[str, str], shape: Shape, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "celery", "-A", "comms_tasks", "worker", "--loglevel=INFO"]
    command += [f"--concurrency={shape.processes}", "--pool=prefork"]
    command += ["--without-mingle", "--without-gossip"]
    log = log or shape.log
    with process(command, log, env) as child:
        wait_for_log(child, log, " ready.")
        yield child


# --- reading the service's database ------------------------------------------------------


def vacuum(engine: Engine) -> None:
    """VACUUM ANALYZE: no dead rows or stale statistics left over from the last stage."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))


def scalar(engine: Engine, query: Any) -> Any:
    with engine.connect() as connection:
        return connection.execute(query).scalar()


def count_emails(engine: Engine, *statuses: EmailStatus) -> int:
    query = select(func.count(Email.id)).where(Email.template.in_(composing.ASKING_TEMPLATES))
    if statuses:
        query = query.where(Email.status.in_(statuses))
    return int(scalar(engine, query))


# --- stages -----------------------------------------------------------------------------


class Bench:
    def __init__(
        self, size: Size, service: Engine, celery: Celery, worker_pid: int, shape: Shape
    ) -> None:
        self.size = size
        self.shape = shape
        self.service = service
        self.celery = celery
        self.peak = StagePeak(worker_pid)
        self._last_send = 0.0

    def _play_beat_send(self) -> None:
        if time.monotonic() - self._last_send >= SEND_EMAIL_EVERY:
            self.celery.send_task(SEND_EMAIL)
            self._last_send = time.monotonic()

    def batching(self) -> dict[str, Any]:
        """comms.batch_requests until every email is queued; the sends it starts then finish."""
        self.peak.start()
        started = utcnow()
        self.celery.send_task(BATCH_REQUESTS)
        wait_until(lambda: count_emails(self.service) >= self.size.emails, "the emails")
        memory = self.peak.stop()
        finished = self.last_event(started, "email.queued")
        batch_rows = int(scalar(self.service, select(func.count(EmailBatch.id))))
        queued = count_emails(self.service)
        if queued != self.size.emails or batch_rows != self.size.requests:
            raise BenchError(f"batching queued {queued} emails with {batch_rows} requests")
        # comms.batch_requests starts comms.send_email as it ends; beat would repeat it.
        self._last_send = time.monotonic()
        self.wait_until_sent(queued)
        last_sent = self.last_event(started, "email.sent")
        return {
            "therapists": self.size.therapists,
            "open_requests": self.size.requests,
            "emails_queued": queued,
            "seconds": (finished - started).total_seconds(),
            "peak_rss_mb": memory,
            "pipeline_seconds_to_last_sent": (last_sent - started).total_seconds(),
        }

    def wait_until_sent(self, emails: int) -> None:
        wait_until(
            lambda: count_emails(self.service, EmailStatus.SENT, EmailStatus.FAILED) == emails,
            "every email to be sent",
            tick=self._play_beat_send,
        )
        failed = count_emails(self.service, EmailStatus.FAILED)
        if failed:
            raise BenchError(f"{failed} emails failed; see {self.shape.log}")

    def sending(self) -> dict[str, Any]:
        """Every asking email queued again, then comms.send_email as beat sends it."""
        asking = Email.template.in_(composing.ASKING_TEMPLATES)
        with Session(self.service) as session, session.begin():
            session.execute(
                table(Email)
                .update()
                .where(asking)
                .values(status=EmailStatus.QUEUED, sent_at=None, next_attempt_at=utcnow())
            )
        vacuum(self.service)
        emails = count_emails(self.service)
        self.peak.start()
        started = utcnow()
        self.celery.send_task(SEND_EMAIL)
        self._last_send = time.monotonic()
        self.wait_until_sent(emails)
        memory = self.peak.stop()
        seconds = (self.last_event(started, "email.sent") - started).total_seconds()
        return {
            "emails": emails,
            "seconds": seconds,
            "emails_per_second": emails / seconds,
            "peak_rss_mb": memory,
        }

    def mailbox(self, maildir: Path) -> dict[str, Any]:
        """comms.poll_mailbox, as often as it takes, until every message is applied.

        The Maildir holds ``size.mails`` answers to the emails sent (not timed). One poll
        reads ``size.mail_batch`` messages; the bench keeps the next poll queued behind the
        running one, so the worker never waits for the bench. The stage ends at the last
        write of the last message's transaction: its row's ``updated_at`` or its last
        event.
        """
        with Session(self.service) as session:
            emails = [
                bench_mailbox.Answered(token, message_id, ascii_address(recipient))
                for token, message_id, recipient in session.execute(
                    select(Email.reply_token, Email.message_id, Email.recipient_email)
                    .where(Email.template.in_(composing.ASKING_TEMPLATES))
                    .where(Email.status == EmailStatus.SENT)
                    .where(Email.reply_token.is_not(None))
                    .order_by(Email.id)
                )
                if token is not None
            ]
        shutil.rmtree(maildir, ignore_errors=True)
        expected = bench_mailbox.build_maildir(maildir, emails, self.size.mails)
        vacuum(self.service)
        total, batch = self.size.mails, self.size.mail_batch
        rows = select(func.count(InboundMail.id))
        polls = {"sent": 0, "rows": -1, "progress": time.monotonic()}

        def applied() -> int:
            return int(scalar(self.service, rows))

        def play_beat_poll() -> None:
            # Poll k reads messages (k-1)*batch .. k*batch: once it has started, the next.
            done = applied()
            if done != polls["rows"]:
                polls.update(rows=done, progress=time.monotonic())
            ahead = polls["sent"] * batch < total and done >= (polls["sent"] - 1) * batch
            stalled = time.monotonic() - polls["progress"] > POLL_AGAIN_AFTER
            if ahead or stalled:
                self.celery.send_task(POLL_MAILBOX)
                polls["sent"] += 1
                polls["progress"] = time.monotonic()

        self.peak.start()
        started = utcnow()
        play_beat_poll()
        wait_until(lambda: applied() >= total, f"{total} messages applied", tick=play_beat_poll)
        memory = self.peak.stop()
        last_row = scalar(
            self.service,
            select(func.max(InboundMail.updated_at)).where(InboundMail.created_at >= started),
        )
        last_write = max(
            last_row, self.last_event(started, "email.response_recorded", "email.bounced")
        )
        seconds = (last_write - started).total_seconds()
        with self.service.connect() as connection:
            kinds = {
                (str(kind), str(state)): int(count)
                for kind, state, count in connection.execute(
                    select(
                        InboundMail.kind, InboundMail.state, func.count(InboundMail.id)
                    ).group_by(InboundMail.kind, InboundMail.state)
                )
            }
            to_review = int(
                connection.execute(
                    select(func.count(InboundMail.id)).where(InboundMail.to_review.is_(True))
                ).scalar_one()
            )
            responses = int(
                connection.execute(
                    select(func.count(Email.id)).where(Email.response_received.is_(True))
                ).scalar_one()
            )
            bounced = int(
                connection.execute(
                    select(func.count(Email.id)).where(Email.bounce_permanent.is_(True))
                ).scalar_one()
            )
        by_kind: dict[str, int] = {}
        matched: dict[str, int] = {}
        for (kind, state), count in kinds.items():
            by_kind[kind] = by_kind.get(kind, 0) + count
            if state == "matched":
                matched[kind] = matched.get(kind, 0) + count
        if by_kind != expected:
            raise BenchError(f"the mailbox classified {by_kind}, expected {expected}")
        return {
            "messages": total,
            "emails_answered": min(len(emails), total),
            "batch": batch,
            "polls_sent": polls["sent"],
            "seconds": seconds,
            "messages_per_second": total / seconds,
            "kinds": by_kind,
            "matched": matched,
            "to_review": to_review,
            "responses_recorded": responses,
            "permanently_bounced": bounced,
            "peak_rss_mb": memory,
        }

    def last_event(self, since: dt.datetime, *event_types: str) -> dt.datetime:
        """When the last of these events was written: the last statement before its commit."""
        moment = scalar(
            self.service,
            select(func.max(OutboxEvent.created_at))
            .where(OutboxEvent.event_type.in_(event_types))
            .where(OutboxEvent.created_at >= since),
        )
        if moment is None:
            raise BenchError(f"no {' or '.join(event_types)} event since {since:%H:%M:%S}")
        return cast(dt.datetime, moment)

    def reset_calls(self, sent_at: dt.datetime, unanswered: int) -> None:
        """No calls, no reminders, every email sent at ``sent_at`` but ``unanswered`` of them."""
        asking = Email.template.in_(composing.ASKING_TEMPLATES)
        with Session(self.service) as session, session.begin():
            session.execute(table(PhoneCallBatch).delete())
            session.execute(table(PhoneCall).delete())
            reminders = select(Email.id).where(Email.template == EmailTemplate.FOLLOW_UP)
            session.execute(table(EmailBatch).delete().where(EmailBatch.email_id.in_(reminders)))
            session.execute(table(Email).delete().where(Email.template == EmailTemplate.FOLLOW_UP))
            session.execute(
                table(Email)
                .update()
                .where(asking)
                .values(
                    sent_at=sent_at,
                    call_requested_at=None,
                    follow_up_required=False,
                    follow_up_notes=None,
                )
            )
            ids = list(
                session.scalars(select(Email.id).where(asking).order_by(Email.id).limit(unanswered))
            )
            session.execute(
                table(Email)
                .update()
                .where(Email.id.in_(ids))
                .values(sent_at=sent_at - FOLLOW_UP_AGE)
            )
        vacuum(self.service)

    def scheduling(self, unanswered: int, sent_at: dt.datetime) -> dict[str, Any]:
        """comms.follow_up_check -> comms.schedule_calls for ``unanswered`` emails."""
        self.reset_calls(sent_at, unanswered)
        # After the reset every call and every flag belongs to this run: cheap counts, so
        # that polling does not take CPU from the worker in proportion to the run's size.
        called = select(func.count(PhoneCall.id)).where(PhoneCall.email_id.is_not(None))
        flagged = select(func.count(Email.id)).where(Email.follow_up_required.is_(True))

        def resolved() -> bool:
            return (
                int(scalar(self.service, called)) + int(scalar(self.service, flagged)) == unanswered
            )

        self.peak.start()
        started = utcnow()
        self.celery.send_task(FOLLOW_UP_CHECK)
        wait_until(resolved, f"{unanswered} follow-up calls")
        memory = self.peak.stop()
        finished = self.last_event(started, "call.scheduled", "call.unschedulable")
        scheduled = int(scalar(self.service, called))
        seconds = (finished - started).total_seconds()
        # Reminders to the unschedulable go out before the next run resets the emails.
        wait_until(
            lambda: (
                int(
                    scalar(
                        self.service,
                        select(func.count(Email.id)).where(
                            Email.status.in_((EmailStatus.QUEUED, EmailStatus.SENDING))
                        ),
                    )
                )
                == 0
            ),
            "reminders to be sent",
            tick=self._play_beat_send,
        )
        return {
            "unanswered_emails": unanswered,
            "calls_scheduled": scheduled,
            "unschedulable": unanswered - scheduled,
            "seconds": seconds,
            "calls_per_second": scheduled / seconds if seconds else None,
            "peak_rss_mb": memory,
        }


def median_run(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One size's scheduling runs as one: the median time, every time, the highest memory."""
    middle = sorted(repeats, key=lambda run: run["seconds"])[len(repeats) // 2]
    peaks: dict[str, float] = {}
    for run in repeats:
        for process_name, mb in run["peak_rss_mb"].items():
            peaks[process_name] = max(peaks.get(process_name, 0.0), mb)
    return {**middle, "seconds_each": [run["seconds"] for run in repeats], "peak_rss_mb": peaks}


# --- baselines ----------------------------------------------------------------------------


def batching_baseline(service: Engine, baseline: Engine) -> list[float]:
    """The service's email and batch rows, inserted again in bulk: seconds of each try."""
    emails_table, batches_table = table(Email), table(EmailBatch)
    with service.connect() as connection:
        emails = [
            dict(row._mapping)
            for row in connection.execute(
                select(emails_table)
                .where(Email.template.in_(composing.ASKING_TEMPLATES))
                .order_by(Email.id)
            )
        ]
        batches = [dict(row._mapping) for row in connection.execute(select(batches_table))]
    for row in emails:
        # As the batch wrote them: queued, not yet sent.
        row.update(
            status=EmailStatus.QUEUED,
            sent_at=None,
            lease_expires_at=None,
            next_attempt_at=row["queued_at"],
        )
        row.update(call_requested_at=None, follow_up_required=False, follow_up_notes=None)
    times = []
    for _ in range(BASELINE_REPEATS):
        with baseline.begin() as connection:
            connection.execute(text(f"TRUNCATE {SCHEMA}.email_batches, {SCHEMA}.emails CASCADE"))
        started = time.perf_counter()
        with baseline.begin() as connection:
            connection.execute(insert(emails_table), emails)
            connection.execute(insert(batches_table), batches)
        times.append(time.perf_counter() - started)
    return times


def sending_baseline(service: Engine, smtp: tuple[str, int]) -> dict[str, Any]:
    """The same messages over one reused ``smtplib`` connection, two ways (emails/s).

    ``send_message``: the messages as ``EmailMessage`` objects built beforehand, which
    ``smtplib`` serializes as it sends (the usual way to send with the standard library;
    the figure the target is judged by). ``sendmail``: the finished bytes built
    beforehand, so only the SMTP conversation is timed (the bare minimum).
    """
    with Session(service) as session:
        emails = session.scalars(
            select(Email).where(Email.template.in_(composing.ASKING_TEMPLATES)).order_by(Email.id)
        ).all()
        prepared = [
            (
                build_mime(outgoing(session, row)),
                ascii_address(row.sender_email),
                ascii_address(row.recipient_email),
            )
            for row in emails
        ]
    objects = [
        (email.message_from_bytes(raw, policy=email.policy.SMTP), sender, recipient)
        for raw, sender, recipient in prepared
    ]
    send_message_rates, sendmail_rates = [], []
    for _ in range(BASELINE_REPEATS):
        started = time.perf_counter()
        connection = smtplib.SMTP(*smtp)
        for message, sender, recipient in objects:
            connection.send_message(message, from_addr=sender, to_addrs=[recipient])
        connection.quit()
        send_message_rates.append(len(objects) / (time.perf_counter() - started))
        started = time.perf_counter()
        connection = smtplib.SMTP(*smtp)
        for raw, sender, recipient in prepared:
            connection.sendmail(sender, [recipient], raw)
        connection.quit()
        sendmail_rates.append(len(prepared) / (time.perf_counter() - started))
    return {
        "emails": len(prepared),
        "send_message_per_second": max(send_message_rates),
        "send_message_each": send_message_rates,
        "sendmail_per_second": max(sendmail_rates),
        "sendmail_each": sendmail_rates,
    }


# --- the report -------------------------------------------------------------------------


def verdict(
    value: float, target: float, aim: float | None, higher_is_better: bool
) -> dict[str, Any]:
    def ok(limit: float) -> bool:
        return value >= limit if higher_is_better else value <= limit

    sign = ">=" if higher_is_better else "<="
    result: dict[str, Any] = {"target": f"{sign} {target}", "met": ok(target)}
    if aim is not None:
        result.update(aim=f"{sign} {aim}", aim_met=ok(aim))
    return result


def sending_section(
    like_for_like: dict[str, Any], scale_out: dict[str, Any], baseline: dict[str, Any]
) -> dict[str, Any]:
    """The sending stage against both baselines: judged on one connection, two beside it.

    Judged by two ratios, both over one SMTP connection: to ``send_message`` (>= 1.0)
    and to bare ``sendmail`` of the finished bytes (>= 0.8); ``met`` needs both.
    """
    send_message_rate = baseline["send_message_per_second"]
    sendmail_rate = baseline["sendmail_per_second"]

    def figures(stage: dict[str, Any]) -> dict[str, Any]:
        rate = stage["emails_per_second"]
        return {
            **stage,
            "ratio": rate / send_message_rate,
            "ratio_to_bare_sendmail": rate / sendmail_rate,
        }

    sending = figures(like_for_like)
    sending["baseline_emails_per_second"] = send_message_rate
    sending["baseline_emails_per_second_each"] = baseline["send_message_each"]
    sending["bare_sendmail_emails_per_second"] = sendmail_rate
    sending["bare_sendmail_emails_per_second_each"] = baseline["sendmail_each"]
    bare = verdict(sending["ratio_to_bare_sendmail"], SENDING_BARE_TARGET, None, True)
    sending["bare_sendmail_target"] = bare["target"]
    sending["bare_sendmail_met"] = bare["met"]
    sending.update(verdict(sending["ratio"], SENDING_TARGET, None, higher_is_better=True))
    sending["met"] = sending["met"] and bare["met"]
    sending["scale_out"] = figures(scale_out)
    return sending


def build_report(
    size: Size,
    like_for_like: dict[str, dict[str, Any]],
    scale_out: dict[str, dict[str, Any]],
    runs: list[dict[str, Any]],
    baseline_batching: list[float],
    baseline_sending: dict[str, Any],
    baseline_parsing: dict[str, Any],
    sink: dict[str, Any],
    postgres_version: str,
    inbound: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report: judged on the like-for-like shape, the scale-out figures beside it.

    ``like_for_like`` and ``scale_out`` hold each shape's ``batching`` and ``sending``
    stage; both are compared with the same baselines (one database connection, one SMTP
    connection). ``like_for_like`` also holds the ``mailbox`` stage (one process), judged
    against parsing the same files with the email package in one process.
    """
    baseline_seconds = min(baseline_batching)

    def batching_figures(stage: dict[str, Any]) -> dict[str, Any]:
        return {**stage, "ratio": stage["seconds"] / baseline_seconds}

    batching = batching_figures(like_for_like["batching"])
    batching["baseline_seconds"] = baseline_seconds
    batching["baseline_seconds_each"] = baseline_batching
    batching.update(
        verdict(batching["ratio"], BATCHING_TARGET, BATCHING_AIM, higher_is_better=False)
    )
    batching["scale_out"] = batching_figures(scale_out["batching"])
    sending = sending_section(like_for_like["sending"], scale_out["sending"], baseline_sending)
    parsing_rate = baseline_parsing["messages_per_second"]
    mailbox = {
        **like_for_like["mailbox"],
        "ratio": like_for_like["mailbox"]["messages_per_second"] / parsing_rate,
        "baseline_messages_per_second": parsing_rate,
        "baseline_messages_per_second_each": baseline_parsing["each"],
    }
    mailbox.update(verdict(mailbox["ratio"], MAILBOX_TARGET, MAILBOX_AIM, higher_is_better=True))
    small, large = runs
    growth = large["seconds"] / small["seconds"]
    scheduling = {
        "shape": SCALE_OUT.name,
        "runs": runs,
        "growth": growth,
        "linear_growth_would_be": large["unanswered_emails"] / small["unanswered_emails"],
        **verdict(growth, GROWTH_TARGET, None, higher_is_better=False),
    }
    peaks = {
        **{
            f"{stage}": like_for_like[stage]["peak_rss_mb"]
            for stage in ("batching", "sending", "mailbox")
        },
        **{
            f"{stage}_scale_out": scale_out[stage]["peak_rss_mb"]
            for stage in ("batching", "sending")
        },
        **{f"scheduling_{run['unanswered_emails']}": run["peak_rss_mb"] for run in runs},
        **(bench_inbound.peaks(inbound) if inbound is not None else {}),
    }
    highest = max(mb for stage in peaks.values() for mb in stage.values())
    memory = {
        "per_stage_mb": peaks,
        "highest_mb": highest,
        **verdict(highest, MEMORY_LIMIT_MB, None, False),
    }
    judged = size.name == "full"
    met = all(part["met"] for part in (batching, sending, mailbox, scheduling, memory))
    if inbound is not None:
        met = met and inbound["met"]

    def describe(shape: Shape) -> str:
        return (
            f"celery prefork, {shape.processes} process(es), "
            f"COMMS_SMTP_CONNECTIONS={shape.smtp_connections}"
        )

    return {
        "size": size.name,
        "judged": judged,
        "all_targets_met": met if judged else None,
        "measured_at": utcnow().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgresql": postgres_version,
            "broker": "private redis-server",
            "judged_shape": describe(LIKE_FOR_LIKE),
            "scale_out_shape": describe(SCALE_OUT),
        },
        "batching": batching,
        "sending": sending,
        "mailbox": mailbox,
        "scheduling": scheduling,
        **({"inbound": inbound} if inbound is not None else {}),
        "memory": memory,
        "sink": sink,
    }


def add_sending_rows(
    grid: rich_table.Table, sending: dict[str, Any], mark: Callable[[dict[str, Any]], str]
) -> None:
    grid.add_row(
        "sending",
        f"{sending['emails_per_second']:.0f}/s (1 connection)",
        f"{sending['baseline_emails_per_second']:.0f}/s send_message",
        f"{sending['ratio']:.2f}x the rate",
        sending["target"],
        mark(sending),
    )
    grid.add_row(
        "",
        "",
        f"{sending['bare_sendmail_emails_per_second']:.0f}/s bare sendmail",
        f"{sending['ratio_to_bare_sendmail']:.2f}x the rate",
        sending["bare_sendmail_target"],
        "",
    )
    scaled = sending["scale_out"]
    grid.add_row(
        "  scale-out",
        f"{scaled['emails_per_second']:.0f}/s ({SCALE_OUT.smtp_connections} connections)",
        f"{sending['baseline_emails_per_second']:.0f}/s",
        f"{scaled['ratio']:.2f}x ({scaled['ratio_to_bare_sendmail']:.2f}x bare sendmail)",
        "reported",
        "",
    )


def print_table(report: dict[str, Any], console: Console) -> None:
    judged = report["judged"]

    def mark(part: dict[str, Any]) -> str:
        if not judged:
            return "not judged"
        return "[green]met[/]" if part["met"] else "[red]MISSED[/]"

    batching, sending, mailbox, scheduling, memory = (
        report[name] for name in ("batching", "sending", "mailbox", "scheduling", "memory")
    )
    grid = rich_table.Table(
        title=f"comms bench ({report['size']}); judged: {report['machine']['judged_shape']}"
    )
    for column in ("stage", "service", "baseline", "figure", "target", ""):
        grid.add_column(column)
    grid.add_row(
        "batching",
        f"{batching['seconds']:.2f} s",
        f"{batching['baseline_seconds']:.2f} s",
        f"{batching['ratio']:.2f}x the time",
        batching["target"],
        mark(batching),
    )
    scaled = batching["scale_out"]
    grid.add_row(
        "  scale-out",
        f"{scaled['seconds']:.2f} s ({SCALE_OUT.processes} processes)",
        f"{batching['baseline_seconds']:.2f} s",
        f"{scaled['ratio']:.2f}x the time",
        "reported",
        "",
    )
    add_sending_rows(grid, sending, mark)
    grid.add_row(
        "mailbox",
        f"{mailbox['messages_per_second']:.0f} messages/s ({mailbox['messages']} in "
        f"{mailbox['seconds']:.1f} s)",
        f"{mailbox['baseline_messages_per_second']:.0f}/s parsed",
        f"{mailbox['ratio']:.2f}x the rate",
        mailbox["target"],
        mark(mailbox),
    )
    small, large = scheduling["runs"]
    grid.add_row(
        "scheduling",
        f"{small['unanswered_emails']}: {small['seconds']:.2f} s; "
        f"{large['unanswered_emails']}: {large['seconds']:.2f} s "
        f"({large['calls_per_second'] or 0:.0f} calls/s)",
        "-",
        f"{scheduling['growth']:.1f}x the time for "
        f"{scheduling['linear_growth_would_be']:.0f}x the calls",
        scheduling["target"],
        mark(scheduling),
    )
    for *cells, part in bench_inbound.table_rows(report["inbound"]) if "inbound" in report else []:
        grid.add_row(*cells, mark(part))
    grid.add_row(*memory_cells(memory), mark(memory))
    console.print(grid)


# --- main ---------------------------------------------------------------------------------


def run_sending(size: Size, postgres: str, console: Console) -> dict[str, Any]:
    """The sending stage alone (``--stage send``): both shapes and its baselines.

    The service's database is seeded once; the like-for-like worker queues the emails
    (its batching, not reported) and sends them, then the sending stage and, after the
    baselines, the scale-out worker's sending stage run on the same emails queued again.
    """
    OUT.mkdir(parents=True, exist_ok=True)
    service_url = f"{postgres}/{SERVICE_DATABASE}"
    console.print(f"seeding {size.therapists} therapists, {size.requests} open requests")
    fresh_database(service_url)
    service = create_engine(service_url)
    try:
        seed(service, read_model_rows(size, utcnow()))
        vacuum(service)
        stages: dict[str, dict[str, Any]] = {}
        with private_redis() as broker, smtp_sink(OUT / "sink.json") as smtp:
            celery = Celery("bench", broker=broker, set_as_current=False)
            for shape in (LIKE_FOR_LIKE, SCALE_OUT):
                env = worker_environment(service_url, broker, smtp, shape)
                with worker(env, shape) as worker_process:
                    bench = Bench(size, service, celery, worker_process.pid, shape)
                    if shape is LIKE_FOR_LIKE:
                        console.print(f"{shape.name}: the emails queued (and sent once)")
                        bench.batching()
                    console.print(f"{shape.name}: sending")
                    stages[shape.name] = bench.sending()
                if shape is LIKE_FOR_LIKE:
                    console.print(f"baselines (worker stopped; the best of {BASELINE_REPEATS})")
                    vacuum(service)
                    baseline = sending_baseline(service, smtp)
            celery.close()
        sending = sending_section(stages[LIKE_FOR_LIKE.name], stages[SCALE_OUT.name], baseline)
        return {
            "size": size.name,
            "stage": "send",
            "judged": size.name == "full",
            "measured_at": utcnow().isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "sending": sending,
        }
    finally:
        service.dispose()


def run(size: Size, postgres: str, console: Console) -> dict[str, Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    service_url, baseline_url = f"{postgres}/{SERVICE_DATABASE}", f"{postgres}/{BASELINE_DATABASE}"
    console.print(f"seeding {size.therapists} therapists, {size.requests} open requests (twice)")
    rows = read_model_rows(size, utcnow())
    for url in (service_url, baseline_url):
        fresh_database(url)
    service, baseline = create_engine(service_url), create_engine(baseline_url)
    try:
        for engine in (service, baseline):
            seed(engine, rows)
            vacuum(engine)
        postgres_version = str(scalar(service, text("SHOW server_version")))
        stats = OUT / "sink.json"
        with private_redis() as broker, smtp_sink(stats) as smtp:
            celery = Celery("bench", broker=broker, set_as_current=False)
            console.print(f"{LIKE_FOR_LIKE.name}: batching (and the sends it starts)")
            env = worker_environment(service_url, broker, smtp, LIKE_FOR_LIKE)
            with worker(env, LIKE_FOR_LIKE) as worker_process:
                bench = Bench(size, service, celery, worker_process.pid, LIKE_FOR_LIKE)
                like_for_like = {"batching": bench.batching()}
                console.print(f"{LIKE_FOR_LIKE.name}: sending")
                like_for_like["sending"] = bench.sending()
            console.print(f"baselines (worker stopped; the best of {BASELINE_REPEATS} tries)")
            vacuum(service)  # no autovacuum of the service's churn during the baselines
            baseline_batching = batching_baseline(service, baseline)
            baseline_sending = sending_baseline(service, smtp)
            console.print(f"{LIKE_FOR_LIKE.name}: mailbox ({size.mails} messages)")
            env = worker_environment(
                service_url, broker, smtp, LIKE_FOR_LIKE, mailbox=(MAILDIR, size.mail_batch)
            )
            with worker(env, LIKE_FOR_LIKE, MAILBOX_LOG) as worker_process:
                bench = Bench(size, service, celery, worker_process.pid, LIKE_FOR_LIKE)
                like_for_like["mailbox"] = bench.mailbox(MAILDIR)
            # Polls sent ahead that found the inbox empty, and the bookings the bounces
            # asked for, are not the next shape's work.
            celery.control.purge()
            console.print(f"mailbox baseline (worker stopped; the best of {BASELINE_REPEATS})")
            files = bench_mailbox.message_files(MAILDIR)
            if len(files) != size.mails:
                raise BenchError(f"the Maildir holds {len(files)} messages, not {size.mails}")
            baseline_parsing = bench_mailbox.parsing_baseline(files, BASELINE_REPEATS)
            console.print(f"{SCALE_OUT.name}: the service's database seeded again")
            service.dispose()
            fresh_database(service_url)
            seed(service, rows)
            vacuum(service)
            env = worker_environment(service_url, broker, smtp, SCALE_OUT)
            with worker(env, SCALE_OUT) as worker_process:
                bench = Bench(size, service, celery, worker_process.pid, SCALE_OUT)
                console.print(f"{SCALE_OUT.name}: batching (and the sends it starts)")
                scale_out = {"batching": bench.batching()}
                console.print(f"{SCALE_OUT.name}: sending")
                scale_out["sending"] = bench.sending()
                sent_at = utcnow()
                runs = []
                for unanswered in size.calls:
                    console.print(
                        f"scheduling: {unanswered} unanswered emails, {SCHEDULING_REPEATS} times"
                    )
                    repeats = [
                        bench.scheduling(unanswered, sent_at) for _ in range(SCHEDULING_REPEATS)
                    ]
                    runs.append(median_run(repeats))
            celery.close()
        sink = json.loads(stats.read_text())
        # Each shape sends every email twice (batching, sending); each baseline try once.
        expected = 4 * size.emails + 2 * BASELINE_REPEATS * int(baseline_sending["emails"])
        if sink["messages"] < expected:
            raise BenchError(f"the sink accepted {sink['messages']} messages, expected {expected}")
        inbound = bench_inbound.run_stage(size, postgres, console)
        return build_report(
            size,
            like_for_like,
            scale_out,
            runs,
            baseline_batching,
            baseline_sending,
            baseline_parsing,
            sink,
            postgres_version,
            inbound,
        )
    finally:
        service.dispose()
        baseline.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES", DEFAULT_POSTGRES),
        help="server URL without a database; the bench creates its own two",
    )
    parser.add_argument("--report", type=Path, help="default: var/bench/report-<size>.json")
    parser.add_argument(
        "--stage",
        choices=("all", "send", "inbound"),
        default="all",
        help="send or inbound: that stage alone (report-<size>-<stage>.json)",
    )
    args = parser.parse_args(argv)
    console = Console()
    size = SIZES[args.size]
    if args.stage == "send":
        return main_sending(size, args.postgres.rstrip("/"), args.report, console)
    alone = args.stage == "inbound"
    try:
        if alone:
            report = bench_inbound.report(size, args.postgres.rstrip("/"), console)
        else:
            report = run(size, args.postgres.rstrip("/"), console)
    except BenchError as exc:
        console.print(f"[red]bench failed:[/] {exc}")
        return 2
    name = f"report-{size.name}-inbound.json" if alone else f"report-{size.name}.json"
    path = args.report or OUT / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (bench_inbound.print_table if alone else print_table)(report, console)
    console.print(f"report: {path}")
    if report["judged"] and not report["all_targets_met"]:
        return 1
    return 0


def main_sending(size: Size, postgres: str, report_path: Path | None, console: Console) -> int:
    try:
        report = run_sending(size, postgres, console)
    except BenchError as exc:
        console.print(f"[red]bench failed:[/] {exc}")
        return 2
    path = report_path or OUT / f"report-{size.name}-send.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    grid = rich_table.Table(title=f"comms bench ({size.name}), sending alone")
    for column in ("stage", "service", "baseline", "figure", "target", ""):
        grid.add_column(column)
    judged = report["judged"]
    add_sending_rows(
        grid,
        report["sending"],
        lambda part: ("[green]met[/]" if part["met"] else "[red]MISSED[/]") if judged else "",
    )
    console.print(grid)
    console.print(f"report: {path}")
    return 1 if judged and not report["sending"]["met"] else 0
