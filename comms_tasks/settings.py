"""One typed settings object, read from ``COMMS_*`` environment variables.

Every business number (7 days, 5 patients, 5 minutes, ...) lives here with a name,
so the rule that uses it reads it from one place. A bad value stops start-up with a
message that names the variable (see :func:`get_settings`).
"""

from __future__ import annotations

import functools
import ssl
import zoneinfo
from pathlib import Path
from typing import Literal

import holidays
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from comms_tasks import database_urls
from comms_tasks.contracts.common import EmailAddress, Name
from comms_tasks.contracts.limits import MAX_TAGGABLE_EMAIL

ENV_PREFIX = "COMMS_"
DEFAULT_VAR_DIR = Path("var")

HOLIDAY_COUNTRY = "DE"


def _holiday_subdivisions() -> dict[str, str]:
    """Every spelling of a German subdivision the ``holidays`` library knows, mapped to
    the code it takes: the 16 state codes (``BY``), the city of Augsburg, which has a
    holiday of its own, and the states' names (``Bayern``)."""
    calendar = holidays.country_holidays(HOLIDAY_COUNTRY)
    spellings = {code: code for code in calendar.subdivisions}
    for name, code in calendar.subdivisions_aliases.items():
        spellings.setdefault(name, code)
    return spellings


HOLIDAY_SUBDIVISIONS = _holiday_subdivisions()
_HOLIDAY_SUBDIVISIONS_FOLDED = {
    name.casefold(): code for name, code in HOLIDAY_SUBDIVISIONS.items()
}


class ConfigurationError(RuntimeError):
    """Raised at start-up when an environment variable holds a value we cannot use."""


def is_rabbitmq_url(url: str) -> bool:
    """An AMQP URL, as kombu's RabbitMQ transports take them (schemes ignore case)."""
    return url.split("://", 1)[0].lower() in {"amqp", "amqps", "pyamqp"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        # An empty variable (as in a copied .env.example) means "not set".
        env_ignore_empty=True,
    )

    # Where the embedded default keeps its SQLite file, broker folders and .eml files.
    var_dir: Path = DEFAULT_VAR_DIR

    # May hold a password: kept out of the settings' repr.
    database_url: str | None = Field(default=None, repr=False)
    broker_url: str | None = None
    # Where published events go; the task broker unless set.
    events_broker_url: str | None = None
    # On RabbitMQ, the type of the task queue `celery`: quorum (replicated, the default) or
    # classic, for a broker whose other services declare the queue the classic way.
    rabbitmq_queue_type: Literal["quorum", "classic"] = "quorum"
    result_backend: str | None = None
    redbeat_redis_url: str | None = None

    mail_backend: Literal["smtp", "file"] = "file"
    smtp_host: str = "localhost"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_security: Literal["none", "starttls", "tls"] = "starttls"
    # Credentials (and health data) in clear text: only for a mail catcher on a private
    # network. Loudly named so that nobody sets it by accident.
    smtp_insecure_cleartext_auth: bool = False
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_password_file: Path | None = None
    smtp_timeout: float = Field(default=30.0, gt=0)
    # Extra CA bundle to verify the relay's certificate with (e.g. a private CA); the
    # system's trust store otherwise. Verification itself cannot be turned off.
    smtp_ca_file: Path | None = None
    # Connections a backlog is sent over at once (each a task of its own; a relay may
    # limit how many it accepts from one client).
    smtp_connections: int = Field(default=2, ge=1, le=20)
    # Inbound messages that arrived while the worker's pool was busy are applied together,
    # up to this many in one transaction (comms_tasks.inbound.batcher); 1: one by one.
    inbound_batch: int = Field(default=50, ge=1, le=500)
    # In the contract's shapes and as wide as the email columns (one source of limits,
    # contracts/limits.py): a sender no email row can hold stops start-up instead.
    sender_email: EmailAddress = "anfragen@therapievermittlung.example"
    sender_name: Name = "Therapievermittlung"
    reply_to: EmailAddress | None = None
    # The mailbox: replies go to COMMS_REPLY_ADDRESS plus each email's token
    # (``antwort+<token>@...``, as Reply-To, in place of COMMS_REPLY_TO); bounces to
    # COMMS_BOUNCE_ADDRESS plus the token as the envelope sender (VERP). Both addresses
    # must reach the mailbox the service reads, with plus addressing on.
    reply_address: EmailAddress | None = None
    bounce_address: EmailAddress | None = None

    timezone: str = "Europe/Berlin"
    max_patients_per_email: int = Field(default=5, ge=1, le=50)
    contact_interval_days: int = Field(default=7, ge=1)
    follow_up_after_days: int = Field(default=7, ge=1)
    call_lead_time_minutes: int = Field(default=120, ge=0)
    call_horizon_days: int = Field(default=14, ge=1, le=90)
    calls_per_slot: int = Field(default=1, ge=1)
    call_slot_minutes: int = Field(default=5, ge=1)
    call_duration_minutes: int = Field(default=5, ge=1)
    holiday_state: str | None = None
    retention_days: int = Field(default=180, ge=1)

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Operational limits of the worker; not business rules.
    task_soft_time_limit: int = Field(default=240, ge=1)
    task_time_limit: int = Field(default=300, ge=1)
    outbox_batch_size: int = Field(default=500, ge=1)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("reply_address", "bounce_address")
    @classmethod
    def _taggable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        local = value.rpartition("@")[0]
        if "+" in local:
            raise ValueError("the address gets each email's token after a '+': give it without")
        if len(value) > MAX_TAGGABLE_EMAIL:
            raise ValueError(
                f"at most {MAX_TAGGABLE_EMAIL} characters, to leave room for the reply token"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, value: str | None) -> str | None:
        return None if value is None else database_urls.database_url_for_driver(value)

    @field_validator("holiday_state", mode="before")
    @classmethod
    def _known_state(cls, value: object) -> object:
        if value in ("", "none", "None"):
            return None
        if isinstance(value, str):
            code = _HOLIDAY_SUBDIVISIONS_FOLDED.get(value.strip().casefold())
            if code is None:
                # Exactly what is accepted, in any case.
                accepted = ", ".join(HOLIDAY_SUBDIVISIONS)
                raise ValueError(f"unknown German state {value!r}; one of {accepted}")
            return code
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("COMMS_TASK_SOFT_TIME_LIMIT must be below COMMS_TASK_TIME_LIMIT")
        if self.smtp_password is not None and self.smtp_password_file is not None:
            raise ValueError("set COMMS_SMTP_PASSWORD or COMMS_SMTP_PASSWORD_FILE, not both")
        if self.mail_backend == "smtp":
            self._check_cleartext_credentials()
            self._check_smtp_files()
        return self

    def _check_cleartext_credentials(self) -> None:
        has_credentials = bool(self.smtp_username) or self.smtp_password is not None
        if (
            self.smtp_security == "none"
            and has_credentials
            and not self.smtp_insecure_cleartext_auth
        ):
            raise ValueError(
                "COMMS_SMTP_SECURITY=none would send COMMS_SMTP_USERNAME and its password "
                "(and every email) unencrypted; use starttls or tls, or set "
                "COMMS_SMTP_INSECURE_CLEARTEXT_AUTH=true for a local mail catcher only"
            )

    def _check_smtp_files(self) -> None:
        # Read once now, so that a wrong path stops start-up instead of failing every
        # connection as a temporary error (8 retries, then failed). The password file is
        # still read again at each connection (rotation); nothing read here is kept.
        if self.smtp_password_file is not None:
            try:
                password = self.smtp_password_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeError) as exc:
                raise ValueError(f"COMMS_SMTP_PASSWORD_FILE: {_file_problem(exc)}") from None
            if not password and self.smtp_username:
                raise ValueError("COMMS_SMTP_PASSWORD_FILE: the file is empty")
        if self.smtp_ca_file is not None:
            try:
                ssl.create_default_context(cafile=self.smtp_ca_file)
            except ssl.SSLError:
                raise ValueError("COMMS_SMTP_CA_FILE: holds no PEM certificate") from None
            except OSError as exc:
                raise ValueError(f"COMMS_SMTP_CA_FILE: {_file_problem(exc)}") from None

    # Derived values: the embedded default lives under var_dir.

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir / 'comms.db'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def rabbitmq(self) -> bool:
        """Tasks travel over RabbitMQ (AMQP)."""
        return is_rabbitmq_url(self.effective_broker_url)

    @property
    def effective_events_broker_url(self) -> str:
        return self.events_broker_url or self.effective_broker_url

    @property
    def broker_folder(self) -> Path:
        return self.var_dir / "broker"

    @property
    def outbox_folder(self) -> Path:
        return self.var_dir / "outbox"

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def smtp_password_value(self) -> str | None:
        """The SMTP password, read from the file at use so that a rotation needs no restart."""
        if self.smtp_password is not None:
            return self.smtp_password.get_secret_value()
        if self.smtp_password_file is not None:
            return self.smtp_password_file.read_text(encoding="utf-8").strip()
        return None

    # --- The mailbox: where replies, automatic answers and bounces are read from -------
    # (comms_tasks/mailbox/sources.py; docs/operations.md "Mailbox: where it reads").
    mailbox_backend: Literal["maildir", "imap"] = "maildir"
    # The embedded default's Maildir; var_dir / "mailbox" unless set.
    mailbox_dir: Path | None = None
    imap_host: str | None = None
    # 993 for tls, 143 for starttls and none, unless set.
    imap_port: int | None = Field(default=None, ge=1, le=65535)
    imap_security: Literal["tls", "starttls", "none"] = "tls"
    imap_username: str | None = None
    imap_password: SecretStr | None = None
    imap_password_file: Path | None = None
    # XOAUTH2 (Microsoft 365, Google): an access token that something else keeps fresh.
    imap_oauth2_token_file: Path | None = None
    # Extra CA bundle, as for SMTP; verification itself cannot be turned off.
    imap_ca_file: Path | None = None
    imap_folder: str = "INBOX"
    imap_timeout: float = Field(default=30.0, gt=0)
    # Messages one poll reads, and the bytes one message (and one fetch) may take in
    # memory: a larger message is read as its header only.
    mailbox_batch: int = Field(default=50, ge=1, le=1000)
    mailbox_max_bytes: int = Field(default=10 * 1024 * 1024, ge=64 * 1024, le=1024**3)

    @field_validator("imap_host", "imap_username", "imap_folder")
    @classmethod
    def _single_line(cls, value: str | None) -> str | None:
        # These travel in IMAP commands: a line break would end the command.
        if value is not None and (not value.strip() or any(ord(c) < 32 for c in value)):
            raise ValueError("must be one line without control characters")
        return value

    @model_validator(mode="after")
    def _usable_mailbox(self) -> Settings:
        if self.imap_password is not None and self.imap_password_file is not None:
            raise ValueError("set COMMS_IMAP_PASSWORD or COMMS_IMAP_PASSWORD_FILE, not both")
        has_password = self.imap_password is not None or self.imap_password_file is not None
        if has_password and self.imap_oauth2_token_file is not None:
            raise ValueError(
                "set a password (COMMS_IMAP_PASSWORD or _FILE) or COMMS_IMAP_OAUTH2_TOKEN_FILE,"
                " not both"
            )
        if self.mailbox_backend != "imap":
            return self
        if self.imap_host is None:
            raise ValueError("COMMS_IMAP_HOST is required when COMMS_MAILBOX_BACKEND=imap")
        if self.imap_username is None:
            raise ValueError("COMMS_IMAP_USERNAME is required when COMMS_MAILBOX_BACKEND=imap")
        if not has_password and self.imap_oauth2_token_file is None:
            raise ValueError(
                "COMMS_MAILBOX_BACKEND=imap needs COMMS_IMAP_PASSWORD, COMMS_IMAP_PASSWORD_FILE"
                " or COMMS_IMAP_OAUTH2_TOKEN_FILE"
            )
        return self

    @property
    def mailbox_folder(self) -> Path:
        return self.mailbox_dir or self.var_dir / "mailbox"

    @property
    def effective_imap_port(self) -> int:
        return self.imap_port or (993 if self.imap_security == "tls" else 143)

    def imap_password_value(self) -> str | None:
        """The IMAP password, read from its file at every connect (rotation needs no restart)."""
        if self.imap_password is not None:
            return self.imap_password.get_secret_value()
        if self.imap_password_file is not None:
            return self.imap_password_file.read_text(encoding="utf-8").strip()
        return None

    def imap_oauth2_token_value(self) -> str | None:
        """The XOAUTH2 access token, read from its file at every connect (tokens expire)."""
        if self.imap_oauth2_token_file is None:
            return None
        return self.imap_oauth2_token_file.read_text(encoding="utf-8").strip()

    # --- end of the mailbox settings -----------------------------------------------------


def startup_warnings(settings: Settings) -> list[str]:
    """Settings that work but are almost surely a mistake, one line each, for start-up."""
    warnings = []
    database = make_url(settings.effective_database_url).get_backend_name()
    if settings.mail_backend == "file" and database == "postgresql":
        warnings.append(
            "COMMS_MAIL_BACKEND=file beside a PostgreSQL database: every email is marked "
            f"sent and only written to {settings.outbox_folder}/ (the outbox); nobody "
            "receives it. Set COMMS_MAIL_BACKEND=smtp for production."
        )
    if settings.mail_backend == "smtp" and settings.smtp_insecure_cleartext_auth:
        warnings.append(
            "COMMS_SMTP_INSECURE_CLEARTEXT_AUTH is on: SMTP login and email to "
            f"{settings.smtp_host}:{settings.smtp_port} may travel unencrypted; "
            "for a local mail catcher only."
        )
    return warnings


def _file_problem(exc: OSError | UnicodeError) -> str:
    """Why a configured file cannot be read, without its content."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(exc, PermissionError):
        return "cannot be read (permission denied)"
    if isinstance(exc, UnicodeError):
        return "is not UTF-8 text"
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        name = f"{ENV_PREFIX}{field.upper()}" if field else "configuration"
        # Pydantic prefixes our own validators' messages with "Value error, ".
        lines.append(f"{name}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def load_settings() -> Settings:
    """Read the environment afresh; raise :class:`ConfigurationError` naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigurationError(f"invalid configuration: {_describe(exc)}") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
