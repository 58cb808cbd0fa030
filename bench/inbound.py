"""The inbound stage: upstream events through the real worker, on Redis and on RabbitMQ.

``size.inbound`` events (20,000 at full size) as the other services send them, by task
name from a Celery app of their own (``other-service``, as the tests' producer): of every
ten, two ``therapist.upserted`` (a seeded therapist's profile again), three
``placement_request.created`` (new requests, a new patient asking two therapists, with
the patient's summary), three ``placement_request.status_changed`` (seeded open requests:
most to ``in_progress``, one in five ``rejected``, which withdraws it from calls) and two
``patient.updated`` (a seeded patient's new summary). The messages are published while no
worker runs; then the worker starts and takes them from a full queue.

On each broker:

- **the baseline**, tried :data:`BASELINE_REPEATS` times, the best counting: the same
  messages to ``bench.noop_app``, whose tasks of the same names do nothing, on the same
  broker with the service's Celery settings and one pool process. Its rate is from the
  first task finished to the last (every message acknowledged);
- **the service**: ``celery -A comms_tasks worker`` with one pool process, on a database
  seeded with the read models of the size. Its rate is from the database: the first
  ``processed_messages`` row of the stage to the last, all of them applied (and no dead
  letter). Peak RSS per process as the other stages measure it.

Each rate counts the intervals between the first and the last message (``events - 1``).

Redis is a private ``redis-server``; RabbitMQ is the machine's node (``BENCH_RABBITMQ``,
default ``127.0.0.1:5672`` guest/guest), on a vhost the stage adds with ``rabbitmqctl``
(default queue type quorum, as a deployment's) and deletes when it is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from celery import Celery
from rich import table as rich_table
from sqlalchemy import Engine, create_engine, func, select

from bench import run as bench_run
from bench.memory import StagePeak, children, memory_cells
from bench.seed import Size, fresh_database, read_model_rows, seed
from comms_tasks.models import DeadLetter, ProcessedMessage
from comms_tasks.models.base import utcnow
from comms_tasks.ops import demo, demo_patients, demo_vocabulary
from comms_tasks.task_names import (
    HANDLE_MATCHING_EVENT,
    HANDLE_PATIENT_EVENT,
    HANDLE_THERAPIST_EVENT,
)

EVENTS = {"full": 20_000, "tiny": 500}
TARGET, AIM = 0.5, 0.7
BASELINE_REPEATS = 3
DATABASE = "comms_bench_inbound"
PROCESSES = 1
RABBITMQ = os.environ.get("BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672")
BROKERS = ("redis", "rabbitmq")
# Of every ten events, in this order (see the module docstring).
MIX: tuple[str, ...] = (
    "therapist",
    "created",
    "status",
    "patient",
    "created",
    "status",
    "therapist",
)
MIX += ("created", "status", "patient")
REJECTED_EVERY = 5
SEED = 20261215


Message = tuple[str, dict[str, Any]]


# --- the messages ------------------------------------------------------------------------


def _envelope(
    rng: random.Random, event_type: str, producer: str, at: dt.datetime, payload: dict[str, Any]
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "event_type": event_type,
        "version": 1,
        "occurred_at": at.isoformat(),
        "producer": producer,
        "payload": payload,
    }


def _summary(rng: random.Random, now: dt.datetime) -> dict[str, Any]:
    registered_on = (now - dt.timedelta(days=rng.randint(1, 120))).date().isoformat()
    return {"registered_on": registered_on, **demo_patients.patient_summary(rng, now)}


def messages(size: Size, count: int, now: dt.datetime) -> list[Message]:
    """``count`` events in the mix, on the read models :func:`bench.seed.read_model_rows` seeds.

    ``occurred_at`` grows by a millisecond per event from ``now`` (after everything seeded),
    so none is stale and each entity's events arrive in order.
    """
    rng = random.Random(SEED)
    patients = (size.requests + 1) // 2
    kinds = {kind: 0 for kind in set(MIX)}
    result: list[Message] = []
    for index in range(count):
        kind = MIX[index % len(MIX)]
        number = kinds[kind]
        kinds[kind] += 1
        at = now + dt.timedelta(milliseconds=index)
        if kind == "therapist":
            therapist_id = number % size.therapists + 1
            last_name = demo_vocabulary.LAST_NAMES[number % len(demo_vocabulary.LAST_NAMES)]
            profile = demo.therapist_profile(rng, therapist_id, last_name)
            event = _envelope(rng, "therapist.upserted", "therapist-service", at, profile)
            result.append((HANDLE_THERAPIST_EVENT, event))
        elif kind == "created":
            payload = {
                "placement_request_id": size.requests + number + 1,
                "patient_id": patients + number // 2 + 1,
                "therapist_id": number % size.therapists + 1,
                "created_at": at.isoformat(),
                "patient": _summary(rng, now),
            }
            event = _envelope(rng, "placement_request.created", "matching-service", at, payload)
            result.append((HANDLE_MATCHING_EVENT, event))
        elif kind == "status":
            if number >= size.requests:
                raise ValueError(f"{count} events change more requests than {size.requests}")
            rejected = number % REJECTED_EVERY == REJECTED_EVERY - 1
            payload = {
                "placement_request_id": number + 1,
                "old_status": "open",
                "new_status": "rejected" if rejected else "in_progress",
                "reason": "Kein Platz frei" if rejected else None,
            }
            event = _envelope(
                rng, "placement_request.status_changed", "matching-service", at, payload
            )
            result.append((HANDLE_MATCHING_EVENT, event))
        else:
            payload = {"patient_id": number % patients + 1, "patient": _summary(rng, now)}
            event = _envelope(rng, "patient.updated", "patient-service", at, payload)
            result.append((HANDLE_PATIENT_EVENT, event))
    return result


def publish(broker_url: str, batch: Sequence[Message]) -> float:
    """Send every message by task name, as another service does; seconds it took."""
    app = Celery("other-service", broker=broker_url, set_as_current=False)
    app.conf.task_serializer = "json"
    started = time.perf_counter()
    try:
        with app.producer_or_acquire() as producer:
            for task_name, event in batch:
                app.send_task(task_name, kwargs={"event": event}, producer=producer)
    finally:
        app.close()
    return time.perf_counter() - started


# --- the brokers -------------------------------------------------------------------------


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    port = bench_run.free_port()
    command = [shutil.which("redis-server") or "redis-server", "--port", str(port)]
    command += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    log = bench_run.OUT / "redis-inbound.log"
    with bench_run.process(command, log) as child:
        bench_run.wait_for_log(child, log, "Ready to accept connections")
        yield f"redis://127.0.0.1:{port}/0"


def _rabbitmqctl(*arguments: str) -> None:
    command = [shutil.which("rabbitmqctl") or "rabbitmqctl", *arguments]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise bench_run.BenchError(f"rabbitmqctl {' '.join(arguments)}: {exc}") from exc


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A vhost of the stage's own on the machine's RabbitMQ node, deleted afterwards."""
    vhost = f"comms-bench-{os.getpid()}"
    # Quorum the vhost's default queue type, as docs/operations.md asks of a deployment:
    # other services declare the task queue with Celery's defaults.
    _rabbitmqctl("add_vhost", vhost, "--default-queue-type", "quorum")
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{RABBITMQ.rstrip('/')}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def broker(name: str) -> contextlib.AbstractContextManager[str]:
    return private_redis() if name == "redis" else rabbitmq_vhost()


# --- the workers -------------------------------------------------------------------------


def worker_command(app: str) -> list[str]:
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel=INFO"]
    command += [f"--concurrency={PROCESSES}", "--pool=prefork"]
    return [*command, "--without-mingle", "--without-gossip"]


def environment(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMMS_")}
    env.update(
        COMMS_DATABASE_URL=database_url,
        COMMS_BROKER_URL=broker_url,
        COMMS_VAR_DIR=str(bench_run.OUT / "var"),
        **extra,
    )
    return env


def cpu_seconds(main_pid: int) -> float:
    """User and system CPU time of a worker's pool processes so far (``/proc/<pid>/stat``)."""
    total = 0
    for pid in children(main_pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def worker(app: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with bench_run.process(worker_command(app), log, env) as child:
        bench_run.wait_for_log(child, log, " ready.")
        yield child


@dataclasses.dataclass
class Stage:
    """One broker's runs: its URL, the service's database, the messages."""

    broker: str
    broker_url: str
    database_url: str
    engine: Engine
    batch: Sequence[Message]

    def log(self, role: str) -> Path:
        return bench_run.OUT / f"worker-inbound-{role}-{self.broker}.log"

    def declare_queues(self) -> None:
        """Start the no-op worker once on an empty broker: it declares the service's queues
        with the service's settings (RabbitMQ), before any producer declares them."""
        env = environment(self.database_url, self.broker_url)
        env.update(BENCH_NOOP_EXPECTED="0", BENCH_NOOP_TIMES=os.devnull)
        with worker("bench.noop_app", env, self.log("declare")):
            pass

    def noop(self) -> dict[str, Any]:
        times = bench_run.OUT / f"noop-times-{self.broker}.txt"
        times.unlink(missing_ok=True)
        publish_seconds = publish(self.broker_url, self.batch)
        env = environment(self.database_url, self.broker_url)
        env.update(BENCH_NOOP_EXPECTED=str(len(self.batch)), BENCH_NOOP_TIMES=str(times))

        def finished() -> bool:
            return times.exists() and len(times.read_text().split()) >= 2

        with worker("bench.noop_app", env, self.log("noop")) as child:
            cpu = cpu_seconds(child.pid)
            bench_run.wait_until(finished, f"the no-op worker on {self.broker}")
            cpu = cpu_seconds(child.pid) - cpu
        first, last = (float(value) for value in times.read_text().split()[:2])
        return {
            "seconds": last - first,
            "events_per_second": (len(self.batch) - 1) / (last - first),
            "pool_cpu_ms_per_event": 1000 * cpu / len(self.batch),
            "publish_seconds": publish_seconds,
        }

    def applied(self) -> int:
        return int(
            bench_run.scalar(self.engine, select(func.count()).select_from(ProcessedMessage))
        )

    def service(self) -> dict[str, Any]:
        publish_seconds = publish(self.broker_url, self.batch)
        env = environment(self.database_url, self.broker_url)
        expected = len(self.batch)
        with worker("comms_tasks", env, self.log("service")) as child:
            peak = StagePeak(child.pid)
            peak.start()
            cpu = cpu_seconds(child.pid)
            bench_run.wait_until(
                lambda: self.applied() >= expected, f"the inbound events on {self.broker}"
            )
            cpu = cpu_seconds(child.pid) - cpu
            memory = peak.stop()
        with self.engine.connect() as connection:
            first, last = connection.execute(
                select(
                    func.min(ProcessedMessage.processed_at), func.max(ProcessedMessage.processed_at)
                )
            ).one()
        letters = int(bench_run.scalar(self.engine, select(func.count()).select_from(DeadLetter)))
        applied = self.applied()
        if applied != expected or letters:
            raise bench_run.BenchError(
                f"{self.broker}: {applied} of {expected} events applied, {letters} dead letters;"
                f" see {self.log('service')}"
            )
        seconds = (last - first).total_seconds()
        return {
            "seconds": seconds,
            "events_per_second": (expected - 1) / seconds,
            # Less moved by a busy machine than the rate: the pool process's own work.
            "pool_cpu_ms_per_event": 1000 * cpu / expected,
            "publish_seconds": publish_seconds,
            "peak_rss_mb": memory,
        }


def fresh_service_database(url: str, rows: dict[type, list[dict[str, Any]]]) -> Engine:
    fresh_database(url)
    engine = create_engine(url)
    seed(engine, rows)
    bench_run.vacuum(engine)
    return engine


def on_broker(
    name: str, database_url: str, rows: dict[type, list[dict[str, Any]]], batch: Sequence[Message]
) -> dict[str, Any]:
    engine = fresh_service_database(database_url, rows)
    try:
        with broker(name) as broker_url:
            stage = Stage(name, broker_url, database_url, engine, batch)
            stage.declare_queues()
            tries = [stage.noop() for _ in range(BASELINE_REPEATS)]
            service = stage.service()
    finally:
        engine.dispose()
    best = max(tries, key=lambda run: run["events_per_second"])
    ratio = service["events_per_second"] / best["events_per_second"]
    return {
        **service,
        "baseline_events_per_second": best["events_per_second"],
        "baseline_events_per_second_each": [run["events_per_second"] for run in tries],
        "baseline_pool_cpu_ms_per_event": min(run["pool_cpu_ms_per_event"] for run in tries),
        "ratio": ratio,
        **bench_run.verdict(ratio, TARGET, AIM, higher_is_better=True),
    }


def run_stage(size: Size, postgres: str, console: Any) -> dict[str, Any]:
    """The stage on both brokers: ``{"events": n, "redis": {...}, "rabbitmq": {...}}``."""
    bench_run.OUT.mkdir(parents=True, exist_ok=True)
    now = utcnow()
    rows = read_model_rows(size, now - dt.timedelta(minutes=1))
    batch = messages(size, EVENTS[size.name], now)
    result: dict[str, Any] = {"events": len(batch), "processes": PROCESSES}
    for name in BROKERS:
        console.print(
            f"inbound on {name}: {len(batch)} events, the no-op baseline "
            f"({BASELINE_REPEATS} tries), then the service"
        )
        result[name] = on_broker(name, f"{postgres}/{DATABASE}", rows, batch)
    result["met"] = all(result[name]["met"] for name in BROKERS)
    return result


def peaks(stage: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The stage's peak RSS per broker, as the report's memory section lists stages."""
    return {f"inbound_{name}": stage[name]["peak_rss_mb"] for name in BROKERS}


def table_rows(stage: dict[str, Any]) -> list[tuple[str, str, str, str, str, dict[str, Any]]]:
    """(stage, service, baseline, figure, target, the part judged) for each broker."""
    rows = []
    for name in BROKERS:
        part = stage[name]
        rows.append(
            (
                f"inbound, {name}",
                f"{part['events_per_second']:.0f} events/s ({stage['events']} in "
                f"{part['seconds']:.1f} s)",
                f"{part['baseline_events_per_second']:.0f}/s no-op",
                f"{part['ratio']:.2f}x the rate",
                part["target"],
                part,
            )
        )
    return rows


# --- the stage alone (``python -m bench --stage inbound``) --------------------------------


def report(size: Size, postgres: str, console: Any) -> dict[str, Any]:
    """The inbound stage alone: its figures and its memory, judged at full size."""
    stage = run_stage(size, postgres, console)
    stage_peaks = peaks(stage)
    highest = max(mb for stage_peak in stage_peaks.values() for mb in stage_peak.values())
    memory = {
        "per_stage_mb": stage_peaks,
        "highest_mb": highest,
        **bench_run.verdict(highest, bench_run.MEMORY_LIMIT_MB, None, False),
    }
    judged = size.name == "full"
    return {
        "size": size.name,
        "judged": judged,
        "all_targets_met": (stage["met"] and memory["met"]) if judged else None,
        "measured_at": utcnow().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processes": PROCESSES},
        "inbound": stage,
        "memory": memory,
    }


def print_table(result: dict[str, Any], console: Any) -> None:
    def mark(part: dict[str, Any]) -> str:
        if not result["judged"]:
            return "not judged"
        return "[green]met[/]" if part["met"] else "[red]MISSED[/]"

    grid = rich_table.Table(title=f"comms bench ({result['size']}): inbound, {PROCESSES} process")
    for column in ("stage", "service", "baseline", "figure", "target", ""):
        grid.add_column(column)
    for *cells, part in table_rows(result["inbound"]):
        grid.add_row(*cells, mark(part))
    memory = result["memory"]
    grid.add_row(*memory_cells(memory), mark(memory))
    console.print(grid)
