"""``celery -A comms_tasks flower`` never runs open (SPEC §2, §10).

A real Flower process is started from a folder outside the project (no flowerconfig.py,
no Makefile, no compose): without basic auth it refuses to start with one line naming
FLOWER_BASIC_AUTH; with it, pages need the credentials; and it listens on the loopback
address unless given another one. Where it listens is read from the kernel's socket
table (/proc/net/tcp), not from Flower's own banner.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, free_port, wait_for, worker_environment

START_TIMEOUT = 30
REFUSAL_TIMEOUT = 60
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


def flower_env(tmp_path: Path, **flower: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in worker_environment(
            COMMS_BROKER_URL=REDIS_URL, COMMS_VAR_DIR=str(tmp_path / "var")
        ).items()
        if not key.startswith("FLOWER_")
    }
    env.update(flower)
    return env


def flower_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "comms_tasks", "flower", *arguments]


class Flower:
    def __init__(self, tmp_path: Path, env: dict[str, str], *arguments: str) -> None:
        self.port = free_port()
        self.log_path = tmp_path / f"flower-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            flower_command(f"--port={self.port}", *arguments),
            cwd=tmp_path,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def listening() -> bool:
            assert self.process.poll() is None, self.log()
            return bool(listening_addresses(self.port))

        wait_for(listening, timeout=START_TIMEOUT, explain=self.log)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str, credentials: str | None = None) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if credentials is not None:
            token = base64.b64encode(credentials.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with OPENER.open(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def listening_addresses(port: int) -> set[str]:
    """The IPv4/IPv6 addresses a socket listens on at ``port``, from the kernel's table."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == LISTEN and int(port_hex, 16) == port:
                found.add(decode_address(address))
    return found


def decode_address(hex_address: str) -> str:
    if len(hex_address) == 8:  # IPv4, little-endian
        return ".".join(str(int(hex_address[i : i + 2], 16)) for i in (6, 4, 2, 0))
    return "::" if set(hex_address) == {"0"} else "ipv6:" + hex_address


@pytest.fixture
def credentials() -> str:
    return f"ops:{secrets.token_urlsafe(16)}"


@pytest.fixture
def flowers() -> Iterator[list[Flower]]:
    started: list[Flower] = []
    yield started
    for flower in started:
        flower.stop()


@pytest.mark.parametrize(
    "flower_settings",
    [{}, {"FLOWER_BASIC_AUTH": ""}, {"FLOWER_BASIC_AUTH": "ops"}, {"FLOWER_BASIC_AUTH": "ops:"}],
    ids=["unset", "empty", "no-password", "empty-password"],
)
def test_flower_without_basic_auth_refuses_to_start(
    tmp_path: Path, flower_settings: dict[str, str]
) -> None:
    port = free_port()
    started = time.monotonic()
    result = subprocess.run(
        flower_command(f"--port={port}"),
        cwd=tmp_path,
        env=flower_env(tmp_path, **flower_settings),
        capture_output=True,
        text=True,
        timeout=REFUSAL_TIMEOUT,
        check=False,
    )

    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "FLOWER_BASIC_AUTH" in lines[0]
    assert "Traceback" not in result.stderr
    # It stopped before listening.
    assert time.monotonic() - started < REFUSAL_TIMEOUT
    assert listening_addresses(port) == set()


def test_flower_with_basic_auth_answers_only_with_the_credentials(
    tmp_path: Path, credentials: str, flowers: list[Flower]
) -> None:
    flower = Flower(tmp_path, flower_env(tmp_path, FLOWER_BASIC_AUTH=credentials))
    flowers.append(flower)

    for path in ("/", "/tasks", "/workers"):
        assert flower.get(path) == 401, path
        assert flower.get(path, "ops:wrong") == 401, path
        assert flower.get(path, credentials) == 200, path


def test_flower_listens_on_loopback_unless_told_otherwise(
    tmp_path: Path, credentials: str, flowers: list[Flower]
) -> None:
    env = flower_env(tmp_path, FLOWER_BASIC_AUTH=credentials)
    default = Flower(tmp_path, env)
    flowers.append(default)
    assert listening_addresses(default.port) == {"127.0.0.1"}, default.log()

    everywhere = Flower(tmp_path, env, "--address=0.0.0.0")
    flowers.append(everywhere)
    assert listening_addresses(everywhere.port) == {"0.0.0.0"}, everywhere.log()


def test_flower_takes_basic_auth_from_the_command_line_too(
    tmp_path: Path, credentials: str, flowers: list[Flower]
) -> None:
    flower = Flower(tmp_path, flower_env(tmp_path), f"--basic-auth={credentials}")
    flowers.append(flower)

    assert flower.get("/") == 401
    assert flower.get("/", credentials) == 200
