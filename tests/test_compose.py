"""docker-compose.yml runs the production shape, with the same commands as make and README.

PyYAML is not a dependency of the project, so the file is read by ``read_compose``: a
strict reader of the block-YAML subset compose files use (mappings, sequences, flow
sequences of scalars, quoted scalars, anchors, aliases and ``<<`` merges). Anything else
is an error, so a construct it does not understand fails these tests instead of being
misread.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
MAILCATCHER_FILE = PROJECT_ROOT / "docker-compose.mailcatcher.yml"
RABBITMQ_FILE = PROJECT_ROOT / "docker-compose.rabbitmq.yml"
SERVICES = ("postgres", "redis", "migrate", "worker", "beat", "flower")
# The processes that read the settings (and so need the same mail settings).
COMMS_SERVICES = ("migrate", "worker", "beat", "flower")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH|TOKEN", re.IGNORECASE)
# ${VAR} or ${VAR:?message} / ${VAR?message}: a value that must come from outside, with
# no default (a default would be a secret written into the file).
REQUIRED_INTERPOLATION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*)?\}")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}")
# scheme://user:password@ (the password may be an interpolation with spaces inside).
URL_CREDENTIALS = re.compile(
    r"[a-z][a-z0-9+.-]*://(?P<user>[^:@/\s]*):(?P<password>(?:\$\{[^}]*\}|[^@/\s$])+)@"
)


# --- a strict reader for the YAML subset of compose files ----------------------------


class ComposeSyntaxError(ValueError):
    pass


def _strip_comment(line: str) -> str:
    quote = ""
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'" and (index == 0 or line[index - 1] in " \t[,:-"):
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index]
    return line


MAPPING_ENTRY = re.compile(r"^(?P<key><<|[A-Za-z0-9_][A-Za-z0-9_.-]*)\s*:(?:\s+(?P<rest>.*))?$")


class _Reader:
    def __init__(self, text: str) -> None:
        self.lines: list[tuple[int, str, int]] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = _strip_comment(raw).rstrip()
            if not line.strip():
                continue
            if "\t" in line[: len(line) - len(line.lstrip())]:
                raise ComposeSyntaxError(f"line {number}: tab in indentation")
            if line.strip() in ("---", "..."):
                raise ComposeSyntaxError(f"line {number}: several documents")
            indent = len(line) - len(line.lstrip(" "))
            self.lines.append((indent, line.strip(), number))
        self.pos = 0
        self.anchors: dict[str, Any] = {}

    def read(self) -> Any:
        value = self.block(self.lines[0][0])
        if self.pos != len(self.lines):
            raise ComposeSyntaxError(f"line {self.lines[self.pos][2]}: unexpected indentation")
        return value

    def _at(self, indent: int) -> bool:
        return self.pos < len(self.lines) and self.lines[self.pos][0] == indent

    @staticmethod
    def _is_item(text: str) -> bool:
        return text == "-" or text.startswith("- ")

    def block(self, indent: int) -> Any:
        if self._is_item(self.lines[self.pos][1]):
            return self.sequence(indent)
        return self.mapping(indent)

    def mapping(self, indent: int) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        while self._at(indent) and not self._is_item(self.lines[self.pos][1]):
            _, text, number = self.lines[self.pos]
            match = MAPPING_ENTRY.match(text)
            if match is None:
                raise ComposeSyntaxError(f"line {number}: not a 'key: value' entry: {text!r}")
            self.pos += 1
            key = match["key"]
            value = self.value(match["rest"] or "", indent, number)
            if key == "<<":
                if not isinstance(value, dict):
                    raise ComposeSyntaxError(f"line {number}: '<<' needs a mapping")
                merged.update(value)
            elif key in entries:
                raise ComposeSyntaxError(f"line {number}: duplicate key {key!r}")
            else:
                entries[key] = value
        return {**merged, **entries}

    def sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while self._at(indent) and self._is_item(self.lines[self.pos][1]):
            _, text, number = self.lines[self.pos]
            rest = text[1:].strip()
            if MAPPING_ENTRY.match(rest):
                # "- key: value": a mapping whose entries line up with this key.
                self.lines[self.pos] = (indent + len(text) - len(rest), rest, number)
                items.append(self.mapping(self.lines[self.pos][0]))
            else:
                self.pos += 1
                items.append(self.value(rest, indent, number))
        return items

    def value(self, rest: str, indent: int, number: int) -> Any:
        anchor = None
        if rest.startswith("&"):
            anchor, _, rest = rest[1:].partition(" ")
            rest = rest.strip()
        if rest:
            value = self.scalar(rest, number)
        elif self.pos < len(self.lines) and (
            self.lines[self.pos][0] > indent
            or (self._at(indent) and self._is_item(self.lines[self.pos][1]))
        ):
            value = self.block(self.lines[self.pos][0])
        else:
            value = None
        if anchor:
            self.anchors[anchor] = value
        return value

    def scalar(self, text: str, number: int) -> Any:
        if text.startswith("*"):
            if text[1:] not in self.anchors:
                raise ComposeSyntaxError(f"line {number}: unknown alias {text!r}")
            return self.anchors[text[1:]]
        if text.startswith("["):
            if not text.endswith("]"):
                raise ComposeSyntaxError(f"line {number}: flow sequence over several lines")
            return [self.scalar(item, number) for item in _split_flow(text[1:-1], number)]
        if text.startswith('"'):
            try:
                decoded = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ComposeSyntaxError(f"line {number}: bad double-quoted scalar") from exc
            if not isinstance(decoded, str):
                raise ComposeSyntaxError(f"line {number}: bad double-quoted scalar")
            return decoded
        if text.startswith("'"):
            if len(text) < 2 or not text.endswith("'"):
                raise ComposeSyntaxError(f"line {number}: bad single-quoted scalar")
            return text[1:-1].replace("''", "'")
        if text[0] in "{|>!%@`&":
            raise ComposeSyntaxError(f"line {number}: unsupported YAML: {text!r}")
        return text


def _split_flow(text: str, number: int) -> Iterator[str]:
    item, quote = "", ""
    for char in text:
        if quote:
            item += char
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
            item += char
        elif char in "[]{}":
            raise ComposeSyntaxError(f"line {number}: nested flow collection")
        elif char == ",":
            yield item.strip()
            item = ""
        else:
            item += char
    if quote:
        raise ComposeSyntaxError(f"line {number}: unclosed quote")
    if item.strip():
        yield item.strip()


def read_compose(text: str) -> dict[str, Any]:
    document = _Reader(text).read()
    if not isinstance(document, dict):
        raise ComposeSyntaxError("the file is not a mapping")
    return document


def test_reader_handles_the_constructs_compose_files_use() -> None:
    document = read_compose(
        "x-base: &base\n"
        "  image: app  # a comment\n"
        "  environment: &env\n"
        "    A: '1'\n"
        "services:\n"
        "  one:\n"
        "    <<: *base\n"
        "    image: other\n"
        '    command: ["a", "b c", plain]\n'
        "    env_file:\n"
        "      - path: .env\n"
        "        required: false\n"
        "    ports:\n"
        '      - "127.0.0.1:1:1"\n'
        "    healthcheck:\n"
        "      test: x # y\n"
    )
    one = document["services"]["one"]
    assert one["image"] == "other"
    assert one["environment"] == {"A": "1"}
    assert one["command"] == ["a", "b c", "plain"]
    assert one["env_file"] == [{"path": ".env", "required": "false"}]
    assert one["ports"] == ["127.0.0.1:1:1"]
    assert one["healthcheck"] == {"test": "x"}
    for unsupported in ("a: |\n  text\n", "a: {b: 1}\n", "a:\n  b: 1\n   c: 2\n", "a: 1\na: 2\n"):
        with pytest.raises(ComposeSyntaxError):
            read_compose(unsupported)


# --- the compose file -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return read_compose(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def mailcatcher_shape() -> dict[str, Any]:
    return read_compose(MAILCATCHER_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rabbitmq_shape() -> dict[str, Any]:
    return read_compose(RABBITMQ_FILE.read_text(encoding="utf-8"))


def interpolated_default(value: str) -> str:
    """What compose makes of ``${VAR:-default}`` when VAR is not set (a plain value as is)."""
    match = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", value)
    return match[1] if match else value


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    value = compose["services"][name]
    assert isinstance(value, dict), name
    return value


def command_words(compose: dict[str, Any], name: str) -> list[str]:
    command = service(compose, name).get("command")
    if isinstance(command, str):
        return shlex.split(command)
    assert isinstance(command, list), f"{name} has no command"
    return [str(word) for word in command]


def makefile_command(target: str, program: str) -> list[str]:
    """The words of the recipe line of ``target`` that runs ``$(BIN)/<program>``."""
    lines = (PROJECT_ROOT / "Makefile").read_text(encoding="utf-8").splitlines()
    start = lines.index(next(line for line in lines if re.match(rf"^{target}\s*:", line)))
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        words = shlex.split(line.strip().lstrip("@-+"))
        if words and words[0] == f"$(BIN)/{program}":
            return [program, *words[1:]]
    raise AssertionError(f"make {target} runs no $(BIN)/{program}")


def readme_command(process: str) -> list[str]:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^\| {process} \| `([^`]+)`", readme, re.MULTILINE)
    assert match, f"README's process table has no {process} row"
    return shlex.split(match[1])


def same_words(make_words: list[str], compose_words: list[str]) -> bool:
    """Equal word for word, except that an option whose value make takes from a variable
    (``--port=$(FLOWER_PORT)``) matches that option with any value."""

    def matches(in_make: str, in_compose: str) -> bool:
        name, eq, value = in_make.partition("=")
        if eq and "$(" in value:
            return in_compose.startswith(f"{name}=")
        return in_make == in_compose

    return len(make_words) == len(compose_words) and all(
        matches(a, b) for a, b in zip(make_words, compose_words, strict=True)
    )


def walk(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every scalar of the document with the name it goes by: its mapping key, or the
    name in ``NAME=value`` / ``--name=value`` strings (environment lists, commands)."""
    if isinstance(value, dict):
        for child_key, child in value.items():
            yield from walk(child, str(child_key))
    elif isinstance(value, list):
        for child in value:
            yield from walk(child, key)
    elif value is not None:
        text = str(value)
        named = re.match(r"^(?:--)?([A-Za-z_][A-Za-z0-9_-]*)=(.*)$", text, re.DOTALL)
        if named:
            yield named[1], named[2]
        yield key, text


def literal_secrets(document: Any) -> list[str]:
    problems = []
    for key, value in walk(document):
        # A switch named after authentication (..._CLEARTEXT_AUTH: "true") holds no secret.
        is_switch = value in ("true", "false")
        if (
            SECRET_NAME.search(key)
            and not is_switch
            and not REQUIRED_INTERPOLATION.fullmatch(value)
        ):
            problems.append(f"{key}: {value!r}")
        for match in URL_CREDENTIALS.finditer(value):
            if not REQUIRED_INTERPOLATION.fullmatch(match["password"]):
                problems.append(f"{key}: password written into {value!r}")
    return problems


def test_every_service_is_there(compose: dict[str, Any]) -> None:
    assert set(SERVICES) <= set(compose["services"]), sorted(compose["services"])


@pytest.mark.parametrize("process", ["worker", "beat", "flower"])
def test_celery_processes_run_the_makefile_and_readme_commands(
    compose: dict[str, Any], process: str
) -> None:
    in_compose = command_words(compose, process)
    in_make = makefile_command(process, "celery")
    assert in_make[:4] == ["celery", "-A", "comms_tasks", process]
    assert same_words(in_make, in_compose), f"make: {in_make}\ncompose: {in_compose}"
    in_readme = readme_command(process)
    subcommand = in_readme.index(process) + 1
    assert in_compose[:subcommand] == in_readme[:subcommand]
    # Options README names are there too (with the value compose gives them).
    for option in in_readme[subcommand:]:
        name = option.partition("=")[0]
        assert any(word.partition("=")[0] == name for word in in_compose), option


def test_migrations_run_once_before_the_other_services(compose: dict[str, Any]) -> None:
    assert command_words(compose, "migrate") == ["comms", "db", "upgrade"]
    assert readme_command("migrations") == ["comms", "db", "upgrade"]
    assert makefile_command("run", "comms")[:3] == ["comms", "db", "upgrade"]
    assert service(compose, "migrate").get("restart") == "no"
    for name in ("worker", "beat", "flower"):
        depends = service(compose, name)["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name


def test_redis_keeps_every_message(compose: dict[str, Any]) -> None:
    words = command_words(compose, "redis")
    pairs = dict(zip(words[1::2], words[2::2], strict=False))
    assert words[0] == "redis-server"
    assert pairs.get("--maxmemory-policy") == "noeviction", words
    assert pairs.get("--appendonly") == "yes", words
    assert service(compose, "redis").get("volumes"), "redis data lost with the container"


def test_postgres_data_is_on_a_named_volume(compose: dict[str, Any]) -> None:
    volumes = service(compose, "postgres").get("volumes") or []
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in volumes if ":" in str(v)}
    assert "/var/lib/postgresql/data" in mounts, volumes
    assert mounts["/var/lib/postgresql/data"] in (compose.get("volumes") or {})


def test_the_secret_check_finds_literals() -> None:
    assert literal_secrets({"environment": {"SMTP_PASSWORD": "hunter2"}})
    assert literal_secrets({"environment": ["COMMS_SMTP_PASSWORD=hunter2"]})
    assert literal_secrets({"environment": {"X": "${P:-hunter2}"}, "P_TOKEN": "${P:-x}"})
    assert literal_secrets({"command": ["flower", "--basic-auth=ops:hunter2"]})
    assert literal_secrets({"environment": {"URL": "postgresql://comms:hunter2@db/comms"}})
    assert literal_secrets({"environment": {"URL": "redis://:hunter2@redis:6379/0"}})
    assert not literal_secrets({"environment": {"URL": "postgresql://u:${P:?set P}@db/x"}})
    assert not literal_secrets({"command": ["flower", "--basic-auth=${A:?set A}"]})


def test_no_secret_is_written_into_the_file(compose: dict[str, Any]) -> None:
    assert literal_secrets(compose) == []


def test_flower_gets_its_basic_auth_from_the_environment(compose: dict[str, Any]) -> None:
    flower = service(compose, "flower")
    # Passed through from .env or the shell, never written here; Flower itself refuses to
    # start without it (tests/worker/test_flower_auth.py).
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] is None
    assert not any(w.startswith("--basic-auth") for w in command_words(compose, "flower"))
    # It gets the settings of every other process too.
    assert set(service(compose, "worker")["environment"]) <= set(flower["environment"])
    # Published on the host's loopback only: Flower's /metrics answers without auth.
    for port in flower.get("ports") or []:
        assert str(port).startswith("127.0.0.1:"), port


def test_only_flower_needs_flower_basic_auth(compose: dict[str, Any]) -> None:
    """``docker compose up worker`` works without FLOWER_BASIC_AUTH: compose interpolates
    the whole file, so no ${...:?} may require it, and only POSTGRES_PASSWORD (which
    every service needs, through the database URL) is required."""
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text))
    assert required == {"POSTGRES_PASSWORD"}, required
    assert "${FLOWER_BASIC_AUTH" not in text


def test_beat_uses_redbeat(compose: dict[str, Any]) -> None:
    environment = service(compose, "beat")["environment"]
    assert str(environment.get("COMMS_REDBEAT_REDIS_URL", "")).startswith("redis://")


def test_every_variable_compose_uses_is_in_env_example(
    compose: dict[str, Any], rabbitmq_shape: dict[str, Any]
) -> None:
    example = (PROJECT_ROOT / ".env.example").read_text(encoding="utf-8")
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    for shape in (compose, rabbitmq_shape):
        used = {key for key, _ in walk(shape) if key.startswith("COMMS_")}
        used |= {name for _, value in walk(shape) for name in INTERPOLATION.findall(value)}
        assert used, "no variable found: the walk is broken"
        assert used - documented == set()


def test_rabbitmq_shape_moves_tasks_and_events_and_keeps_redbeat_on_redis(
    compose: dict[str, Any], rabbitmq_shape: dict[str, Any]
) -> None:
    for name in COMMS_SERVICES:
        environment = service(rabbitmq_shape, name)["environment"]
        assert str(environment["COMMS_BROKER_URL"]).startswith("amqp://comms:"), name
        assert "COMMS_EVENTS_BROKER_URL" not in environment, name  # events go with the tasks
    for name in ("worker", "beat", "flower"):
        depends = service(rabbitmq_shape, name)["depends_on"]
        assert depends["rabbitmq"]["condition"] == "service_healthy", name
    assert str(service(compose, "beat")["environment"]["COMMS_REDBEAT_REDIS_URL"]).startswith(
        "redis://"
    )
    rabbitmq = service(rabbitmq_shape, "rabbitmq")
    assert str(rabbitmq["image"]).endswith("-management")
    assert [str(port) for port in rabbitmq["ports"]] == ["127.0.0.1:15672:15672"]
    assert "rabbitmq-data" in rabbitmq_shape["volumes"]
    # Flower's Broker page: the management API, its password from the environment.
    api = str(service(rabbitmq_shape, "flower")["environment"]["FLOWER_BROKER_API"])
    assert api.startswith("http://comms:") and api.endswith("@rabbitmq:15672/api/")
    assert not any("broker" in word for word in command_words(compose, "flower"))
    # Senders with Celery's defaults declare the task queue the same way (operations.md).
    mounted = [str(volume).split(":")[0] for volume in rabbitmq["volumes"]]
    config = PROJECT_ROOT / mounted[0]
    assert "default_queue_type = quorum" in config.read_text(encoding="utf-8")
    assert literal_secrets(rabbitmq_shape) == []


def test_make_flower_without_basic_auth_refuses_to_start() -> None:
    started = time.monotonic()
    result = subprocess.run(
        ["make", "-s", "flower", "FLOWER_BASIC_AUTH="],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "FLOWER_BASIC_AUTH" in output
    # Refused before anything ran: no install, no Celery.
    assert time.monotonic() - started < 10
    assert "pip" not in output and "celery" not in output.lower(), output


# --- mail: STARTTLS in production, clear text only towards the mail catcher ------------


def test_production_shape_sends_over_starttls_by_default(compose: dict[str, Any]) -> None:
    for name in COMMS_SERVICES:
        environment = service(compose, name)["environment"]
        assert interpolated_default(environment["COMMS_SMTP_SECURITY"]) == "starttls", name
        assert "COMMS_SMTP_INSECURE_CLEARTEXT_AUTH" not in environment, name
    # The catcher runs beside them (SPEC §2), but nothing is sent to it.
    assert "mailcatcher" in compose["services"]
    for name in COMMS_SERVICES:
        host = service(compose, name)["environment"].get("COMMS_SMTP_HOST", "")
        assert "mailcatcher" not in host, name


def test_mailcatcher_shape_says_clear_text_and_opts_in(
    compose: dict[str, Any], mailcatcher_shape: dict[str, Any]
) -> None:
    assert "mailcatcher" in service(mailcatcher_shape, "worker")["depends_on"]
    for port in service(compose, "mailcatcher").get("ports") or []:
        assert str(port).startswith("127.0.0.1:"), port
    for name in COMMS_SERVICES:
        assert name in compose["services"], name
        environment = service(mailcatcher_shape, name)["environment"]
        assert environment["COMMS_SMTP_HOST"] == "mailcatcher", name
        assert environment["COMMS_SMTP_SECURITY"] == "none", name
        assert environment["COMMS_SMTP_INSECURE_CLEARTEXT_AUTH"] == "true", name
    assert literal_secrets(mailcatcher_shape) == []


def test_mailcatcher_shape_settings_load_with_credentials_of_a_copied_env(
    mailcatcher_shape: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catcher's environment on top of an .env with a relay's login still starts."""
    from comms_tasks.settings import load_settings

    for name in [n for n in os.environ if n.startswith("COMMS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("COMMS_SMTP_USERNAME", "relay-user")
    monkeypatch.setenv("COMMS_SMTP_PASSWORD", "relay-password")
    for key, value in service(mailcatcher_shape, "worker")["environment"].items():
        monkeypatch.setenv(key, value)

    settings = load_settings()

    assert (settings.smtp_host, settings.smtp_security) == ("mailcatcher", "none")


def test_compose_never_runs_the_file_backend(
    compose: dict[str, Any], mailcatcher_shape: dict[str, Any]
) -> None:
    # Written as a value, not ${COMMS_MAIL_BACKEND:-smtp}: a COMMS_MAIL_BACKEND=file copied
    # from .env.example must not reach a container whose var/outbox/ nobody reads.
    for shape in (compose, mailcatcher_shape):
        for name in COMMS_SERVICES:
            assert service(shape, name)["environment"]["COMMS_MAIL_BACKEND"] == "smtp", name
