"""Private server instances for tests that stop or kill them (never the shared ones)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import redis

from tests.conftest import free_port, wait_for


class PrivateRedis:
    """A ``redis-server`` of our own on a free port, that a test may stop and start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="comms-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: self._ping(client), timeout=15)

    @staticmethod
    def _ping(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


RABBITMQ_USER = "rabbitmq"
_rabbitmq_nodes = itertools.count(1)


class PrivateRabbitMQ:
    """A RabbitMQ node of our own (never the machine's ``rabbit@localhost``) that a test
    may stop and start: its own node name, AMQP port, distribution port, data, logs, pid
    file and configuration under a temporary folder owned by the ``rabbitmq`` user (the
    server switches to it). It runs in the foreground as a child process.

    The machine's ``/etc/rabbitmq/rabbitmq.conf`` names a listener on port 5672, which
    wins over ``RABBITMQ_NODE_PORT``: the node gets a configuration file of its own, and an
    environment file of its own instead of ``/etc/rabbitmq/rabbitmq-env.conf``.

    Clients use the virtual host ``comms``, whose default queue type is quorum as in
    production. :meth:`stop` keeps the data (durable queues and persistent messages are
    there after :meth:`start`); :meth:`close` kills what is left and removes the folder.
    """

    VHOST = "comms"
    START_TIMEOUT = 60

    def __init__(self, management: bool = False) -> None:
        """``management``: with the management plugin, its API on :attr:`management_port`."""
        self.port = free_port()
        self.dist_port = free_port()
        self.management_port = free_port() if management else None
        self.node = f"comms-test-{os.getpid()}-{next(_rabbitmq_nodes)}@localhost"
        self.directory = Path(tempfile.mkdtemp(prefix="comms-rabbitmq-"))
        self.log_path = self.directory / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.beam_pid: int | None = None
        self._vhost_made = False
        config = f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
        if self.management_port is not None:
            config += (
                f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
            )
        (self.directory / "enabled_plugins").write_text(
            "[rabbitmq_management].\n" if management else "[].\n"
        )
        (self.directory / "rabbitmq.conf").write_text(config)
        (self.directory / "rabbitmq-env.conf").write_text(
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        for name in ("mnesia", "log"):
            (self.directory / name).mkdir()
        for path in (self.directory, *self.directory.rglob("*")):
            shutil.chown(path, RABBITMQ_USER, RABBITMQ_USER)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{self.VHOST}"

    def environment(self) -> dict[str, str]:
        folder = self.directory
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
        }

    def ctl(self, *arguments: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n <this node> <arguments>``; its output, or an error."""
        command = ["rabbitmqctl", "-n", self.node, *arguments]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["rabbitmq-server"],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for(self._accepting, timeout=self.START_TIMEOUT, interval=0.2, explain=self.tail)
            self.ctl("await_startup")
            self.beam_pid = int((self.directory / "rabbitmq.pid").read_text().split()[0])
            if not self._vhost_made:
                self.ctl("add_vhost", self.VHOST, "--default-queue-type", "quorum")
                self.ctl("set_permissions", "-p", self.VHOST, "guest", ".*", ".*", ".*")
                self._vhost_made = True
        except BaseException:
            self.kill()
            raise

    def _accepting(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "rabbitmq-server output (tail):\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the node as an operator would (``rabbitmqctl stop``); its data stays."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                self.ctl("stop")
                self.process.wait(timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                self.kill()
        self._wait_beam_gone()
        self.process = None
        self.beam_pid = None

    def kill(self) -> None:
        """SIGKILL to the node's Erlang VM and to the server command started here."""
        # The VM runs in a session of its own (``su`` starts one): killing our child's
        # group would leave it running, so it is killed by the pid the server wrote.
        pid_file = self.directory / "rabbitmq.pid"
        if self.beam_pid is None and self.process is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.beam_pid = int(pid_file.read_text().split()[0])
        if self.beam_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.beam_pid, signal.SIGKILL)
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        self._wait_beam_gone()
        pid_file.unlink(missing_ok=True)
        self.process = None
        self.beam_pid = None

    def _wait_beam_gone(self) -> None:
        if self.beam_pid is not None:
            wait_for(lambda: not Path(f"/proc/{self.beam_pid}").exists(), timeout=30)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            shutil.rmtree(self.directory, ignore_errors=True)
