"""Configuration from ``COMMS_*`` environment variables (SPEC §2).

Defaults are the business numbers of the spec, a bad value stops start-up with a
message naming the variable, secrets never show in a repr, and ``.env.example``
lists every setting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from comms_tasks.contracts.limits import MAX_EMAIL, MAX_NAME
from comms_tasks.rules import office_hours
from comms_tasks.settings import ConfigurationError, Settings, load_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COMMS_SCRIPT = Path(sys.executable).parent / "comms"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``COMMS_*`` variable of the machine or of other tests leaks into a test."""
    for name in list(os.environ):
        if name.startswith("COMMS_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_are_those_of_the_spec(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()

    assert settings.max_patients_per_email == 5
    assert settings.contact_interval_days == 7
    assert settings.follow_up_after_days == 7
    assert settings.call_lead_time_minutes == 120
    assert settings.call_horizon_days == 14
    assert settings.calls_per_slot == 1
    assert settings.retention_days == 180
    assert settings.timezone == "Europe/Berlin"
    assert str(settings.zone) == "Europe/Berlin"
    assert settings.holiday_state is None
    assert settings.mail_backend == "file"
    # No secret has a default.
    assert settings.smtp_password is None
    assert settings.smtp_password_file is None
    assert settings.smtp_password_value() is None


def test_values_come_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("COMMS_MAX_PATIENTS_PER_EMAIL", "3")
    clean_env.setenv("COMMS_SMTP_PORT", "587")
    clean_env.setenv("COMMS_TIMEZONE", "Europe/Vienna")
    clean_env.setenv("COMMS_MAIL_BACKEND", "smtp")

    settings = load_settings()

    assert settings.max_patients_per_email == 3
    assert settings.smtp_port == 587
    assert settings.timezone == "Europe/Vienna"
    assert settings.mail_backend == "smtp"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COMMS_SMTP_PORT", "abc"),
        ("COMMS_SMTP_PORT", "70000"),
        ("COMMS_TIMEZONE", "Mars/Base"),
        ("COMMS_TIMEZONE", "../../etc/passwd"),
        ("COMMS_HOLIDAY_STATE", "XX"),
        ("COMMS_MAX_PATIENTS_PER_EMAIL", "0"),
        ("COMMS_MAX_PATIENTS_PER_EMAIL", "five"),
        ("COMMS_SMTP_SECURITY", "ssl"),
        ("COMMS_MAIL_BACKEND", "sendmail"),
        ("COMMS_CALL_HORIZON_DAYS", "-1"),
        ("COMMS_SMTP_TIMEOUT", "0"),
        ("COMMS_SENDER_EMAIL", "a@b.de\r\nBcc: x@y.de"),
        # As wide as the email columns, and in the contract's shape.
        ("COMMS_SENDER_NAME", "N" * 201),
        ("COMMS_SENDER_NAME", "Therapie\x07vermittlung"),
        ("COMMS_SENDER_NAME", "=?utf-8?q?Bcc=3A_x=40y=2Ede?="),
        ("COMMS_SENDER_EMAIL", "a" * 250 + "@b.de"),
        ("COMMS_SENDER_EMAIL", "anfragen"),
        ("COMMS_REPLY_TO", "antwort@" + "d" * 250 + ".de"),
        ("COMMS_REPLY_TO", "not an address"),
        ("COMMS_REPLY_ADDRESS", "antwort+x@praxis.example"),
        ("COMMS_REPLY_ADDRESS", "a" * 220 + "@praxis.example"),
        ("COMMS_BOUNCE_ADDRESS", "bounce+x@praxis.example"),
        ("COMMS_BOUNCE_ADDRESS", "two@a.example, three@b.example"),
    ],
)
def test_a_bad_value_names_the_variable(
    clean_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    clean_env.setenv(variable, value)

    with pytest.raises(ConfigurationError, match=variable):
        load_settings()


def test_a_time_zone_folder_is_a_bad_value(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("COMMS_TIMEZONE", "Europe")

    with pytest.raises(ConfigurationError, match="COMMS_TIMEZONE"):
        load_settings()


@pytest.mark.parametrize(("value", "expected"), [("by", "BY"), ("BY", "BY"), ("nw", "NW")])
def test_holiday_state_is_a_german_state_code_in_any_case(
    clean_env: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    clean_env.setenv("COMMS_HOLIDAY_STATE", value)

    assert load_settings().holiday_state == expected


def test_an_empty_variable_means_not_set(clean_env: pytest.MonkeyPatch) -> None:
    # As in a copied .env.example.
    clean_env.setenv("COMMS_HOLIDAY_STATE", "")
    clean_env.setenv("COMMS_SMTP_PORT", "")

    settings = load_settings()

    assert settings.holiday_state is None
    assert settings.smtp_port == 25


def test_password_and_password_file_together_are_refused(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    password_file = tmp_path / "smtp-password"
    password_file.write_text("from-file\n", encoding="utf-8")
    clean_env.setenv("COMMS_SMTP_PASSWORD", "from-env")
    clean_env.setenv("COMMS_SMTP_PASSWORD_FILE", str(password_file))

    with pytest.raises(ConfigurationError, match="COMMS_SMTP_PASSWORD_FILE") as caught:
        load_settings()

    assert "from-env" not in str(caught.value)


def test_the_password_file_is_read_and_stripped(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    password_file = tmp_path / "smtp-password"
    password_file.write_text("  s3cret-from-file \n", encoding="utf-8")
    clean_env.setenv("COMMS_SMTP_PASSWORD_FILE", str(password_file))

    settings = load_settings()

    assert settings.smtp_password_value() == "s3cret-from-file"
    # Read at use, so a rotated secret needs no restart.
    password_file.write_text("rotated\n", encoding="utf-8")
    assert settings.smtp_password_value() == "rotated"


def test_the_password_never_shows_in_repr(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("COMMS_SMTP_PASSWORD", "hunter2-do-not-print")

    settings = load_settings()

    assert settings.smtp_password_value() == "hunter2-do-not-print"
    assert "hunter2-do-not-print" not in repr(settings)
    assert "hunter2-do-not-print" not in str(settings)
    assert "hunter2-do-not-print" not in settings.model_dump_json()


# --- the console script stops at start-up -------------------------------------------


def run_comms_with_bad_port(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        name: value
        for name, value in os.environ.items()
        # COLUMNS would change where the console wraps lines.
        if not name.startswith("COMMS_") and name not in ("COLUMNS", "LINES")
    }
    env.update({"COMMS_SMTP_PORT": "abc", "COMMS_VAR_DIR": str(tmp_path / "var")})
    return subprocess.run(
        [str(COMMS_SCRIPT), "status"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_comms_with_a_bad_value_exits_2_naming_the_variable(tmp_path: Path) -> None:
    result = run_comms_with_bad_port(tmp_path)

    assert result.returncode == 2, result.stderr
    assert "COMMS_SMTP_PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    # It stopped before doing anything.
    assert not (tmp_path / "var").exists()


def test_comms_with_a_bad_value_prints_one_line(tmp_path: Path) -> None:
    result = run_comms_with_bad_port(tmp_path)

    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "COMMS_SMTP_PORT" in lines[0]


# --- .env.example --------------------------------------------------------------------


def test_env_example_lists_every_setting() -> None:
    env_example = PROJECT_ROOT / ".env.example"
    assert env_example.is_file(), ".env.example is missing (SPEC §2)"
    listed = set(re.findall(r"^\s*#?\s*(COMMS_[A-Z0-9_]+)=", env_example.read_text("utf-8"), re.M))
    expected = {f"COMMS_{name.upper()}" for name in Settings.model_fields}

    assert not expected - listed, f"missing in .env.example: {sorted(expected - listed)}"
    assert not listed - expected, f"not a setting: {sorted(listed - expected)}"


def test_the_longest_sender_the_settings_accept_is_stored_in_every_email(
    committed_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings and columns agree: start-up never passes a sender no email can hold."""
    from comms_tasks.db import transaction
    from comms_tasks.emails.weekly import batch_chunk
    from comms_tasks.models import Email, PlacementRequest, PlacementRequestStatus
    from comms_tasks.settings import get_settings
    from tests import factories

    local_part = "a" * 64
    domain = ".".join(["d" * 60] * 3) + ".de"
    address = f"{local_part}@{domain}"
    monkeypatch.setenv("COMMS_SENDER_NAME", "N" * MAX_NAME)
    monkeypatch.setenv("COMMS_SENDER_EMAIL", address[:MAX_EMAIL])
    monkeypatch.setenv("COMMS_REPLY_TO", address[:MAX_EMAIL])
    get_settings.cache_clear()
    settings = load_settings()
    assert len(settings.sender_name) == MAX_NAME

    with transaction() as session:
        factories.make_therapist(session, 1)
        session.add(
            PlacementRequest(
                id=1,
                patient_id=1,
                therapist_id=1,
                status=PlacementRequestStatus.OPEN,
                created_at=factories.BASE_TIME,
                last_event_at=factories.BASE_TIME,
            )
        )
    with transaction() as session:
        [email_id] = batch_chunk(session, [1], factories.at(60), settings).email_ids
    with Session(committed_db) as session:
        email = session.get(Email, email_id)
        assert email is not None
        assert email.sender_name == "N" * MAX_NAME


# --- files and states that cannot work stop start-up ---------------------------------


@pytest.mark.parametrize("variable", ["COMMS_SMTP_PASSWORD_FILE", "COMMS_SMTP_CA_FILE"])
@pytest.mark.parametrize("problem", ["missing", "a folder", "unreadable"])
def test_an_smtp_file_that_cannot_be_read_stops_start_up_naming_the_variable(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, variable: str, problem: str
) -> None:
    path = tmp_path / "secret"
    if problem == "a folder":
        path.mkdir()
    elif problem == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads every file")
        path.write_text("x", encoding="utf-8")
        path.chmod(0)
    clean_env.setenv("COMMS_MAIL_BACKEND", "smtp")
    clean_env.setenv("COMMS_SMTP_USERNAME", "relay-user")
    clean_env.setenv(variable, str(path))

    with pytest.raises(ConfigurationError, match=variable):
        load_settings()


def test_a_ca_file_that_holds_no_certificate_stops_start_up(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate\n", encoding="utf-8")
    clean_env.setenv("COMMS_MAIL_BACKEND", "smtp")
    clean_env.setenv("COMMS_SMTP_CA_FILE", str(path))

    with pytest.raises(ConfigurationError, match="COMMS_SMTP_CA_FILE"):
        load_settings()


def test_an_empty_password_file_with_a_username_stops_start_up(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "smtp-password"
    path.write_text("\n", encoding="utf-8")
    clean_env.setenv("COMMS_MAIL_BACKEND", "smtp")
    clean_env.setenv("COMMS_SMTP_USERNAME", "relay-user")
    clean_env.setenv("COMMS_SMTP_PASSWORD_FILE", str(path))

    with pytest.raises(ConfigurationError, match="COMMS_SMTP_PASSWORD_FILE"):
        load_settings()


def test_the_file_backend_does_not_look_at_smtp_files(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The file backend never connects: a staging .env may keep the relay's paths.
    clean_env.setenv("COMMS_MAIL_BACKEND", "file")
    clean_env.setenv("COMMS_SMTP_PASSWORD_FILE", str(tmp_path / "missing"))
    clean_env.setenv("COMMS_SMTP_CA_FILE", str(tmp_path / "missing-ca"))

    assert load_settings().mail_backend == "file"


def holiday_states_listed() -> list[str]:
    """What the error message for a wrong COMMS_HOLIDAY_STATE offers."""
    os.environ["COMMS_HOLIDAY_STATE"] = "XX"
    try:
        load_settings()
    except ConfigurationError as exc:
        message = str(exc)
    finally:
        del os.environ["COMMS_HOLIDAY_STATE"]
    listed = message.split("one of ", 1)[1]
    return [name.strip() for name in re.split(r",|\bor\b", listed.split(";")[0]) if name.strip()]


def test_every_holiday_state_the_message_lists_is_accepted(clean_env: pytest.MonkeyPatch) -> None:
    listed = holiday_states_listed()
    assert "BY" in listed and len(listed) >= 16, listed

    for name in listed:
        clean_env.setenv("COMMS_HOLIDAY_STATE", name)
        assert load_settings().holiday_state, name


@pytest.mark.parametrize(
    ("value", "expected"), [("Augsburg", "Augsburg"), ("augsburg", "Augsburg"), ("Bayern", "BY")]
)
def test_holiday_state_accepts_the_city_and_state_names_of_the_holidays_library(
    clean_env: pytest.MonkeyPatch, value: str, expected: str
) -> None:

    clean_env.setenv("COMMS_HOLIDAY_STATE", value)

    state = load_settings().holiday_state
    assert state == expected
    # The Augsburger Friedensfest (8 August) is a holiday in Augsburg only.
    import datetime as dt

    assert (dt.date(2026, 8, 8) in office_hours.Holidays(state)) is (expected == "Augsburg")


# --- SMTP credentials never travel in clear by accident --------------------------------


@pytest.mark.parametrize("credential", ["COMMS_SMTP_USERNAME", "COMMS_SMTP_PASSWORD"])
def test_credentials_with_smtp_security_none_are_refused(
    clean_env: pytest.MonkeyPatch, credential: str
) -> None:
    clean_env.setenv("COMMS_MAIL_BACKEND", "smtp")
    clean_env.setenv("COMMS_SMTP_SECURITY", "none")
    clean_env.setenv(credential, "relay-credential")

    with pytest.raises(ConfigurationError, match="COMMS_SMTP_SECURITY") as caught:
        load_settings()

    assert "COMMS_SMTP_INSECURE_CLEARTEXT_AUTH" in str(caught.value)
    assert "relay-credential" not in str(caught.value)


def test_credentials_with_smtp_security_none_need_the_loud_opt_in(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("COMMS_MAIL_BACKEND", "smtp")
    clean_env.setenv("COMMS_SMTP_SECURITY", "none")
    clean_env.setenv("COMMS_SMTP_USERNAME", "catcher")
    clean_env.setenv("COMMS_SMTP_PASSWORD", "catcher")
    clean_env.setenv("COMMS_SMTP_INSECURE_CLEARTEXT_AUTH", "true")

    settings = load_settings()

    assert settings.smtp_insecure_cleartext_auth is True
    from comms_tasks.mail.sender import SmtpSender, sender_from_settings

    sender = sender_from_settings(settings)
    assert isinstance(sender, SmtpSender) and sender.insecure_cleartext_auth


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_credentials_over_tls_need_no_opt_in(clean_env: pytest.MonkeyPatch, security: str) -> None:
    clean_env.setenv("COMMS_MAIL_BACKEND", "smtp")
    clean_env.setenv("COMMS_SMTP_SECURITY", security)
    clean_env.setenv("COMMS_SMTP_USERNAME", "relay-user")

    assert load_settings().smtp_username == "relay-user"


def test_no_credentials_with_smtp_security_none_is_allowed(clean_env: pytest.MonkeyPatch) -> None:
    # A catcher or a local relay without AUTH (the test suite's own SMTP server).
    clean_env.setenv("COMMS_MAIL_BACKEND", "smtp")
    clean_env.setenv("COMMS_SMTP_SECURITY", "none")

    assert load_settings().smtp_security == "none"
