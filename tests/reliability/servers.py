"""A private PostgreSQL instance for tests that stop and start it (never the shared one)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.conftest import free_port, wait_for

OS_USER = "postgres"


def postgres_bin_dir() -> Path:
    """The bin folder of the newest installed PostgreSQL that has ``initdb`` and ``pg_ctl``."""
    candidates = [
        Path(path)
        for path in glob.glob("/usr/lib/postgresql/*/bin")
        if (Path(path) / "initdb").exists() and (Path(path) / "pg_ctl").exists()
    ]
    if not candidates:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return max(candidates, key=lambda path: _version(path.parent.name))


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


class PrivatePostgres:
    """A PostgreSQL server of our own on a free port, that a test may stop and start.

    ``initdb`` refuses to run as root, so when this process is root the server binaries
    run as the ``postgres`` OS user, which owns the temporary folder.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.bin_dir = postgres_bin_dir()
        self.directory = Path(tempfile.mkdtemp(prefix="comms-postgres-"))
        self.data_dir = self.directory / "data"
        self.log_file = self.directory / "postgres.log"
        self._as_other_user = os.geteuid() == 0
        if self._as_other_user:
            shutil.chown(self.directory, user=OS_USER, group=OS_USER)
        self.directory.chmod(0o700)
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.running = False

    def _run(self, *command: str, timeout: float = 120) -> None:
        prefix = ["runuser", "-u", OS_USER, "--"] if self._as_other_user else []
        result = subprocess.run(
            [*prefix, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                + result.stdout.decode("utf-8", "replace")
            )

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        self.running = True
        wait_for(self._accepts_connections, timeout=30, interval=0.2)

    def _accepts_connections(self) -> bool:
        engine = create_engine(self.url, connect_args={"connect_timeout": 2})
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except OperationalError:
            return False
        finally:
            engine.dispose()

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"
            )
            self.running = False

    def crash(self) -> None:
        """Stopped as by a crash: every server process ends at once, nothing is flushed
        on the way out (``pg_ctl -m immediate``); the next start recovers from the WAL."""
        self.stop("immediate")

    def create_database(self, name: str) -> str:
        admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.url_for(name)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
