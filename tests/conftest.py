"""Test fixtures on real components: PostgreSQL, Redis and Celery workers of this machine.

URLs come from the environment and default to the local servers:
- ``COMMS_TEST_POSTGRES_URL``: a server where the tests may create databases;
- ``COMMS_TEST_REDIS_URL``: a Redis database the tests may flush;
- ``COMMS_TEST_RABBITMQ_URL``: a RabbitMQ node (without a virtual host) where the tests
  may create and delete virtual hosts of their own, named after this process.

Every test that runs a real worker runs on both brokers (the ``broker_kind`` fixture),
each run with a broker of its own: a Redis database or a RabbitMQ virtual host.

Each database test runs inside a transaction that is rolled back. Tests that need a real
worker (which commits) use a separate database whose tables are emptied after each test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from celery import Celery
from kombu.utils.url import parse_url
from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from comms_tasks import migrate
from comms_tasks.db import make_engine, reset_engine
from comms_tasks.models import SCHEMA, Base
from comms_tasks.settings import get_settings
from comms_tasks.settings import is_rabbitmq_url as is_rabbitmq
from tests.smtp import smtp_sink  # noqa: F401  (the plain SMTP server fixture, for every test)

if TYPE_CHECKING:
    from tests.servers import PrivateRabbitMQ, PrivateRedis
    from tests.smtp import SmtpSink

POSTGRES_URL = os.environ.get(
    "COMMS_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("COMMS_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
RABBITMQ_URL = os.environ.get("COMMS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
BROKERS = ("redis", "rabbitmq")
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Whatever this process writes under the var folder (embedded broker folders, .eml files)
# goes to a scratch folder, not into the working tree.
os.environ.setdefault("COMMS_VAR_DIR", tempfile.mkdtemp(prefix="comms-test-var-"))
WORKER_START_TIMEOUT = 60


def database_url(name: str) -> str:
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


def recreate_database(name: str) -> str:
    """An empty database ``name`` on the test server; its URL."""
    url = database_url(name)
    migrate.recreate_database(url)
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def count_rows(engine: Engine, model: Any, *where: Any) -> int:
    """Rows of ``model`` (matching ``where``), read in a session of their own."""
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def waiting_on_locks(engine: Engine) -> int:
    """Backends of ``engine``'s database waiting for a lock (another connection holds it)."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def terminate_backend(engine: Engine, connection: Connection) -> None:
    """``connection``'s server process ends, as in a PostgreSQL restart; returns once it
    is gone (``pg_terminate_backend`` only signals it)."""
    pid = connection.connection.dbapi_connection.get_backend_pid()  # type: ignore[union-attr]

    def gone() -> bool:
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            other.commit()
            alive = other.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            )
        return not alive

    wait_for(gone, timeout=5, interval=0.02)


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 30,
    interval: float = 0.1,
    explain: Callable[[], str] | None = None,
) -> Any:
    """Poll until ``condition()`` is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            details = f"\n{explain()}" if explain else ""
            pytest.fail(f"condition not met within {timeout} s{details}")
        time.sleep(interval)


@pytest.fixture
def smtp(
    committed_db: Engine,
    smtp_sink: SmtpSink,  # noqa: F811 - the fixture imported above
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[SmtpSink]:
    """The plain SMTP server, with this process's settings pointed at it (2 s timeout)."""
    for name, value in {**smtp_sink.worker_settings(), "COMMS_SMTP_TIMEOUT": "2"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield smtp_sink
    get_settings.cache_clear()


# --- The app's tasks ------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def every_task_registered() -> None:
    """Each stage's tasks.py loaded, as worker and beat load them (app.autodiscover_tasks)."""
    from comms_tasks.app import app

    app.loader.import_default_modules()


# --- PostgreSQL --------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A fresh database, migrated to head with the project's own migrations."""
    url = recreate_database(f"comms_test_{os.getpid()}")
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_connection(pg_engine: Engine) -> Iterator[Connection]:
    with pg_engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


@pytest.fixture
def db(pg_connection: Connection) -> Iterator[Session]:
    """A session in a transaction that is rolled back after the test."""
    session = Session(bind=pg_connection, join_transaction_mode="create_savepoint")
    yield session
    session.close()


def truncate_all(engine: Engine) -> None:
    tables = ", ".join(f'"{SCHEMA}"."{table.name}"' for table in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        # A test that leaked an open transaction fails here instead of hanging the suite.
        connection.execute(text("SET LOCAL lock_timeout = '10s'"))
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(scope="session")
def committed_url() -> str:
    """A database for code that commits (workers, ``comms``), emptied after each test."""
    url = recreate_database(f"comms_test_committed_{os.getpid()}")
    migrate.upgrade(url)
    return url


@pytest.fixture
def committed_db(committed_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """Point this process's settings at the committed database; empty it afterwards."""
    monkeypatch.setenv("COMMS_DATABASE_URL", committed_url)
    get_settings.cache_clear()
    reset_engine()
    engine = make_engine(committed_url)
    yield engine
    truncate_all(engine)
    engine.dispose()
    reset_engine()
    get_settings.cache_clear()


@pytest.fixture
def domain_db(committed_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Connection]:
    """For domain tests that stay in this process: every session of the service (and the
    test's own) joins one transaction, rolled back after the test, as warehouse's
    ``db_session`` does. Nothing is committed, so nothing is emptied afterwards.

    The service's ``transaction()`` becomes a savepoint of that transaction: its commit
    releases it, its rollback undoes only its own work. Tests that cross processes or
    connections (workers, ``comms``, two writers) keep ``committed_db``.
    """
    import functools

    from sqlalchemy.orm import sessionmaker

    from comms_tasks import db as service_db

    monkeypatch.setenv("COMMS_DATABASE_URL", committed_url)
    get_settings.cache_clear()
    reset_engine()
    engine = make_engine(committed_url)
    connection = engine.connect()
    outer = connection.begin()
    joined = sessionmaker(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )
    monkeypatch.setattr(service_db, "_session_factory", functools.cache(lambda: joined))
    try:
        yield connection
    finally:
        outer.rollback()
        connection.close()
        engine.dispose()
        reset_engine()
        get_settings.cache_clear()


# --- Brokers and Celery ------------------------------------------------------------


def broker_url_of(kind: str, slot: int) -> str:
    """A broker of its own for ``slot``: Redis database ``slot`` (0-15) of the test Redis,
    or the RabbitMQ virtual host ``comms-test-<pid>-<slot>``."""
    if kind == "redis":
        return REDIS_URL.rsplit("/", 1)[0] + f"/{slot}"
    if kind == "rabbitmq":
        return f"{RABBITMQ_URL}/comms-test-{os.getpid()}-{slot}"
    raise ValueError(f"unknown broker {kind!r}")


def rabbitmqctl(*arguments: str) -> str:
    node = os.environ.get("COMMS_TEST_RABBITMQ_NODE")
    command = ["rabbitmqctl", *(["-n", node] if node else []), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")
    return done.stdout


def vhost_of(url: str) -> str:
    vhost = parse_url(url)["virtual_host"]
    if not vhost or not vhost.startswith("comms-test-"):
        raise ValueError("tests empty only virtual hosts of their own (comms-test-*)")
    return vhost


def empty_broker(url: str) -> None:
    """Nothing left on the broker at ``url``: its Redis database flushed, or its RabbitMQ
    virtual host deleted and made again (queues, exchanges and bindings gone)."""
    if not is_rabbitmq(url):
        redis.Redis.from_url(url).flushdb()
        return
    vhost = vhost_of(url)
    # One call of the CLI (its start dominates): delete if there, add, let guest in. The
    # host's default queue type is quorum, as in production (docs/operations.md).
    rabbitmqctl(
        "eval",
        f'V = <<"{vhost}">>, catch rabbit_vhost:delete(V, <<"tests">>), '
        'ok = rabbit_vhost:add(V, #{default_queue_type => <<"quorum">>}, <<"tests">>), '
        'rabbit_auth_backend_internal:set_permissions(<<"guest">>, V, <<".*">>, <<".*">>, '
        '<<".*">>, <<"tests">>).',
    )


def drop_broker(url: str) -> None:
    """Remove what :func:`empty_broker` made (a RabbitMQ virtual host goes entirely)."""
    if not is_rabbitmq(url):
        redis.Redis.from_url(url).flushdb()
        return
    rabbitmqctl("eval", f'catch rabbit_vhost:delete(<<"{vhost_of(url)}">>, <<"tests">>).')


@pytest.fixture(scope="session", params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """``redis`` or ``rabbitmq``: every test that asks for it runs once on each."""
    return str(request.param)


@pytest.fixture(scope="session")
def worker_broker_url(broker_kind: str) -> Iterator[str]:
    """The session worker's broker: the test Redis database, or virtual host slot 13."""
    url = broker_url_of(broker_kind, 13) if broker_kind == "rabbitmq" else REDIS_URL
    empty_broker(url)
    yield url
    drop_broker(url)


@pytest.fixture
def broker_url(broker_kind: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A broker of this test module's own (slot ``BROKER_SLOT`` of the module), empty."""
    slot = getattr(request.module, "BROKER_SLOT", None)
    if slot is None:
        raise RuntimeError(f"{request.module.__name__} sets no BROKER_SLOT")
    url = broker_url_of(broker_kind, int(slot))
    empty_broker(url)
    yield url
    drop_broker(url)


def other_service(broker_url: str) -> Celery:
    """Another service's Celery app: it knows only task names, never our code, and keeps
    Celery's defaults (on RabbitMQ, the virtual host makes its queue a quorum queue)."""
    app = Celery("other-service", broker=broker_url, set_as_current=False)
    app.conf.task_serializer = "json"
    return app


@pytest.fixture(scope="session")
def sender(worker_broker_url: str) -> Iterator[Celery]:
    app = other_service(worker_broker_url)
    yield app
    app.close()


def worker_environment(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMS_")}
    env.update(overrides)
    return env


def broker_environment(
    database_url: str, broker_url: str, var_dir: Path, **settings: str
) -> dict[str, str]:
    """A worker's environment on ``broker_url``, which is emptied first."""
    empty_broker(broker_url)
    return worker_environment(
        COMMS_DATABASE_URL=database_url,
        COMMS_BROKER_URL=broker_url,
        COMMS_VAR_DIR=str(var_dir),
        **settings,
    )


class CeleryProcess:
    """``celery -A comms_tasks <arguments>`` in a subprocess, its output kept in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *arguments: str) -> None:
        self.name = arguments[0]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "comms_tasks", *arguments],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_until_ready(self, ready: Callable[[], bool], timeout: float) -> None:
        """Wait for ``ready()``; stop the process if it exits first or never gets there."""

        def alive_and_ready() -> bool:
            self.check_alive()
            return ready()

        try:
            self.wait_for(alive_and_ready, timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 60) -> str:
        return f"{self.name} log (tail):\n" + "\n".join(self.log().splitlines()[-lines:])

    def wait_for(self, condition: Callable[[], Any], timeout: float = 30) -> Any:
        """Like :func:`wait_for`, with the end of this process's log if it fails."""
        return wait_for(condition, timeout=timeout, explain=self.tail)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class WorkerProcess(CeleryProcess):
    """A real ``celery -A comms_tasks worker``, started and ready to take tasks."""

    def __init__(self, env: dict[str, str], log_path: Path, *extra: str) -> None:
        super().__init__(
            env,
            log_path,
            "worker",
            "--loglevel=INFO",
            "--concurrency=2",
            "--without-mingle",
            "--without-gossip",
            *extra,
        )
        self.wait_until_ready(lambda: " ready." in self.log(), WORKER_START_TIMEOUT)


@contextmanager
def worker_on_broker(
    database_url: str, broker_url: str, log_dir: Path, name: str
) -> Iterator[WorkerProcess]:
    """A worker named by ``name`` on a broker database of its own, emptied before and after."""
    env = broker_environment(database_url, broker_url, log_dir / f"{name}-var")
    process = WorkerProcess(env, log_dir / f"{name}-worker-{uuid.uuid4().hex}.log")
    try:
        yield process
    finally:
        process.stop()
        empty_broker(broker_url)


def start_workers(env: dict[str, str], log_dir: Path, count: int = 2) -> list[WorkerProcess]:
    """Workers ``w1@…``, ``w2@…``; if one fails to start, those already up are stopped."""
    workers: list[WorkerProcess] = []
    try:
        for n in range(1, count + 1):
            workers.append(WorkerProcess(env, log_dir / f"worker{n}.log", f"--hostname=w{n}@%h"))
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers


@pytest.fixture(scope="session")
def worker_log_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="comms-worker-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def worker(
    committed_url: str, worker_broker_url: str, worker_log_dir: Path
) -> Iterator[WorkerProcess]:
    """One worker for the session, on the committed database and the test Redis."""
    env = worker_environment(
        COMMS_DATABASE_URL=committed_url,
        COMMS_BROKER_URL=worker_broker_url,
        COMMS_VAR_DIR=str(worker_log_dir / "var"),
    )
    process = WorkerProcess(env, worker_log_dir / "worker.log")
    yield process
    process.stop()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of this test's own, for tests that stop or restart it."""
    from tests.servers import PrivateRedis  # tests.servers imports this module

    server = PrivateRedis()
    server.start()
    yield server
    server.close()


@pytest.fixture
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of this test's own (virtual host ``comms``), for tests that stop
    and start it; killed and removed afterwards, whatever the test did."""
    from tests.servers import PrivateRabbitMQ  # tests.servers imports this module

    server = PrivateRabbitMQ()
    server.start()
    try:
        yield server
    finally:
        server.close()
