"""The mailbox sources: the same behaviour on a Maildir and on a real IMAP server (Dovecot)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from comms_tasks.mailbox.imap import ImapSource
from comms_tasks.mailbox.maildir import MaildirSource
from comms_tasks.mailbox.sources import (
    AUTO_REPLIES,
    BOUNCES,
    FOLDERS,
    REPLIES,
    UNMATCHED,
    Fetched,
    MailboxPermanentError,
    MailboxTemporaryError,
    StaleKeyError,
    folder_for,
    open_source,
)
from comms_tasks.settings import ConfigurationError, Settings, load_settings
from tests.conftest import free_port
from tests.mailbox.conftest import (
    Harness,
    ImapHarness,
    message,
    start_dovecot,
    subject_of,
)
from tests.mailbox.dovecot import PrivateDovecot

# Dovecot's post-login capabilities on this machine, without MOVE (and without UIDPLUS).
DOVECOT_CAPABILITIES = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES "
    "THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN "
    "NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES "
    "WITHIN CONTEXT=SEARCH LIST-STATUS BINARY SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW "
    "STATUS=SIZE SAVEDATE LITERAL+ NOTIFY"
)
WITHOUT_MOVE = DOVECOT_CAPABILITIES
WITHOUT_MOVE_OR_UIDPLUS = DOVECOT_CAPABILITIES.replace(" UIDPLUS", "")


def fill(mailbox: Harness, count: int, **kwargs: Any) -> list[str]:
    subjects = [f"Antwort {number}" for number in range(1, count + 1)]
    for subject in subjects:
        mailbox.append(message(subject, **kwargs))
    return subjects


def subjects(fetched: list[Fetched]) -> list[str]:
    return [subject_of(item.raw) for item in fetched]


# The same behaviour on both backends.


def test_fetch_returns_the_oldest_messages_within_the_limit_and_marks_none_seen(
    mailbox: Harness,
) -> None:
    sent = fill(mailbox, 5)
    with mailbox.source() as source:
        first = source.fetch_new(3)
        again = source.fetch_new(10)

    assert subjects(first) == sent[:3]
    # Fetching changes nothing: all five are still new, and none is marked seen.
    assert subjects(again) == sent
    assert [item.key for item in again[:3]] == [item.key for item in first]
    assert len({item.key for item in again}) == 5
    assert all(item.size == len(item.raw) and not item.headers_only for item in again)
    assert b"anbei meine Antwort" in again[0].raw
    assert not mailbox.seen_anywhere()
    assert mailbox.subjects() == sent


def test_moved_messages_land_in_their_folders_and_are_not_fetched_again(
    mailbox: Harness,
) -> None:
    fill(mailbox, 4)
    with mailbox.source() as source:
        reply, auto_reply, bounce, unrelated = source.fetch_new(10)
        source.move(reply.key, REPLIES)
        source.move(auto_reply.key, AUTO_REPLIES)
        source.move(bounce.key, BOUNCES)
        source.move(unrelated.key, UNMATCHED)
        left = source.fetch_new(10)

    assert left == []
    assert mailbox.subjects() == []
    assert mailbox.subjects(REPLIES) == ["Antwort 1"]
    assert mailbox.subjects(AUTO_REPLIES) == ["Antwort 2"]
    assert mailbox.subjects(BOUNCES) == ["Antwort 3"]
    assert mailbox.subjects(UNMATCHED) == ["Antwort 4"]
    assert not mailbox.seen_anywhere()


def test_moving_a_message_again_is_harmless(mailbox: Harness) -> None:
    fill(mailbox, 2)
    with mailbox.source() as source:
        first, _ = source.fetch_new(10)
        source.move(first.key, REPLIES)
    # As after a crash between the caller's commit and its move: a new source, same key.
    with mailbox.source() as source:
        source.move(first.key, REPLIES)
        source.move(first.key, UNMATCHED)
        assert subjects(source.fetch_new(10)) == ["Antwort 2"]

    assert mailbox.subjects(REPLIES) == ["Antwort 1"]
    assert mailbox.subjects(UNMATCHED) == []
    assert mailbox.subjects() == ["Antwort 2"]


def test_two_sources_at_once_fail_nothing_and_lose_nothing(
    mailbox: Harness,
) -> None:
    sent = fill(mailbox, 6)
    results: dict[str, list[Fetched]] = {}
    errors: list[BaseException] = []

    def poll(name: str) -> None:
        try:
            with mailbox.source() as source:
                results[name] = source.fetch_new(10)
                for item in results[name]:
                    source.move(item.key, REPLIES)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=poll, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    # Without the caller's lock both may read a message, and neither fails; no message
    # is lost or left behind. A Maildir rename happens once; Dovecot's MOVE of one UID by
    # two sessions at once may leave a second copy in the folder (a duplicate, never a
    # loss: the caller's lock is what prevents it).
    assert set(subjects(results["a"])) | set(subjects(results["b"])) == set(sent)
    assert mailbox.subjects() == []
    moved = mailbox.subjects(REPLIES)
    assert set(moved) == set(sent)
    if mailbox.backend == "maildir":
        assert sorted(moved) == sorted(sent)


def test_a_message_above_the_limit_comes_as_its_header_only(mailbox: Harness) -> None:
    attachment = "QUJDRA==" * 40_000 + "\r\n"  # ~320 kB of "base64"
    mailbox.append(message("Antwort 1"))
    mailbox.append(message("Antwort mit Anhang", body=attachment))
    mailbox.append(message("Antwort 3"))

    with mailbox.source(max_bytes=100_000) as source:
        small, big, last = source.fetch_new(10)
        source.move(big.key, UNMATCHED)

    assert (subject_of(small.raw), subject_of(last.raw)) == ("Antwort 1", "Antwort 3")
    assert not small.headers_only and not last.headers_only
    assert big.headers_only
    assert subject_of(big.raw) == "Antwort mit Anhang"
    assert big.raw.endswith((b"\r\n\r\n", b"\n\n"))
    assert b"QUJDRA==" not in big.raw
    assert big.size > 320_000 > 100_000 > len(big.raw)
    # Moving it moves the whole message, not the header that was read.
    assert mailbox.subjects(UNMATCHED) == ["Antwort mit Anhang"]


def test_one_fetch_holds_at_most_the_byte_limit_and_the_rest_follows(mailbox: Harness) -> None:
    sent = fill(mailbox, 4, body="x" * 40_000 + "\r\n")
    seen = []
    with mailbox.source(max_bytes=100_000) as source:
        while batch := source.fetch_new(10):
            assert sum(len(item.raw) for item in batch) <= 100_000
            seen.extend(batch)
            for item in batch:
                source.move(item.key, REPLIES)

    assert subjects(seen) == sent
    assert len(seen) == 4


def test_moving_to_a_folder_that_is_not_ours_is_refused(mailbox: Harness) -> None:
    fill(mailbox, 1)
    with mailbox.source() as source:
        (item,) = source.fetch_new(1)
        with pytest.raises(ValueError, match="not a mailbox folder"):
            source.move(item.key, "Trash")
    assert mailbox.subjects() == ["Antwort 1"]


def test_the_folders_are_named_for_what_the_caller_made_of_a_message() -> None:
    assert folder_for("reply") == "Processed/Replies"
    assert folder_for("auto_reply") == "Processed/AutoReplies"
    assert folder_for("bounce") == "Processed/Bounces"
    assert folder_for("unrelated") == folder_for("unmatched") == "Unmatched"
    assert set(FOLDERS.values()) == {REPLIES, AUTO_REPLIES, BOUNCES, UNMATCHED}
    with pytest.raises(ValueError, match="no folder for kind"):
        folder_for("spam")


# IMAP only: what a real server does that a directory does not.


@pytest.fixture
def imap(dovecot: PrivateDovecot) -> ImapHarness:
    return ImapHarness(dovecot)


@pytest.fixture
def restartable() -> Any:
    """A Dovecot of the test's own, to stop and start, or to annoy."""
    server = start_dovecot()
    yield server
    server.close()


def test_a_server_restart_mid_poll_is_temporary_and_the_next_poll_works(
    restartable: PrivateDovecot,
) -> None:
    mailbox = ImapHarness(restartable)
    fill(mailbox, 2)
    source = mailbox.source()
    first, second = source.fetch_new(10)

    restartable.stop()
    with pytest.raises(MailboxTemporaryError) as lost:
        source.move(first.key, REPLIES)
    with pytest.raises(MailboxTemporaryError) as refused:
        source.fetch_new(10)
    restartable.start()  # same port, same mail

    # The same source reconnects; the keys of before the restart still hold.
    source.move(first.key, REPLIES)
    assert subjects(source.fetch_new(10)) == ["Antwort 2"]
    source.close()
    with mailbox.source() as next_poll:
        next_poll.move(second.key, REPLIES)

    assert mailbox.subjects(REPLIES) == ["Antwort 1", "Antwort 2"]
    for error in (lost.value, refused.value):
        message_text = str(error)
        assert message_text.startswith(f"imap://{mailbox.user}@127.0.0.1:{restartable.port}/")
        assert "\n" not in message_text
        assert restartable.password not in message_text


def test_a_wrong_password_is_permanent_and_never_shown(restartable: PrivateDovecot) -> None:
    # One test only, on a server of its own: after a failed login Dovecot makes every
    # login from the address wait (its auth penalty), which would slow the other tests.
    imap = ImapHarness(restartable)
    wrong = "Falsch-Passwort-4711"
    with (
        imap.source(password=lambda: wrong) as source,
        pytest.raises(MailboxPermanentError) as failed,
    ):
        source.fetch_new(10)

    assert "authentication failed" in str(failed.value)
    assert wrong not in str(failed.value)
    assert imap.server.password not in str(failed.value)


def test_a_missing_source_folder_is_permanent(imap: ImapHarness) -> None:
    with imap.source(folder="Eingang") as source, pytest.raises(MailboxPermanentError) as failed:
        source.fetch_new(10)
    assert "fetch: refused" in str(failed.value)


def test_a_refused_connection_is_temporary() -> None:
    source = ImapSource(
        host="127.0.0.1",
        port=free_port(),
        security="none",
        username="nobody",
        password=lambda: "secret",
        timeout=5,
    )
    with source, pytest.raises(MailboxTemporaryError, match="connection failed"):
        source.fetch_new(1)


def test_a_key_from_an_earlier_uidvalidity_moves_nothing(dovecot: PrivateDovecot) -> None:
    mailbox = ImapHarness(dovecot, folder="Eingang")
    fill(mailbox, 1)
    with mailbox.source() as source:
        (old,) = source.fetch_new(10)
        # The folder is deleted and made again (a server migration, a restore): the
        # same message now has a UID under a new UIDVALIDITY.
        with dovecot.client(mailbox.user) as client:
            client.delete_folder("Eingang")
            client.create_folder("Eingang")
            client.append("Eingang", message("Neue Nachricht"))
            client.append("Eingang", message("Antwort 1"))
        (renewed, _) = source.fetch_new(10)
        with pytest.raises(StaleKeyError, match="UIDVALIDITY"):
            source.move(old.key, REPLIES)
    with mailbox.source() as next_poll:
        with pytest.raises(StaleKeyError):
            next_poll.move(old.key, REPLIES)
        # The UID of the old key now names another message: that one stayed put.
        assert old.key.split(":")[1] == renewed.key.split(":")[1]
        assert old.key != renewed.key
        assert mailbox.subjects(REPLIES) == []
        next_poll.move(renewed.key, REPLIES)

    assert mailbox.subjects(REPLIES) == ["Neue Nachricht"]
    assert mailbox.subjects() == ["Antwort 1"]


@pytest.fixture
def without_move() -> Any:
    server = start_dovecot(capabilities=WITHOUT_MOVE, separator="/")
    yield server
    server.close()


@pytest.fixture
def without_move_or_uidplus() -> Any:
    server = start_dovecot(capabilities=WITHOUT_MOVE_OR_UIDPLUS, separator="/")
    yield server
    server.close()


def flag_deleted(mailbox: ImapHarness, subject: str) -> None:
    """Another mail client flags a message ``\\Deleted`` and does not expunge it."""
    with mailbox.server.client(mailbox.user) as client:
        client.select_folder("INBOX")
        for uid in client.search(["HEADER", "Subject", subject]):
            client.add_flags([uid], [b"\\Deleted"])


def capabilities(mailbox: ImapHarness) -> tuple[bytes, ...]:
    with mailbox.server.client(mailbox.user) as client:
        return tuple(client.capabilities())


def test_without_move_the_fallback_expunges_that_message_only(
    without_move: PrivateDovecot,
) -> None:
    mailbox = ImapHarness(without_move)
    assert b"MOVE" not in capabilities(mailbox) and b"UIDPLUS" in capabilities(mailbox)
    fill(mailbox, 2)
    mailbox.append(message("Papierkorb"))
    flag_deleted(mailbox, "Papierkorb")

    with mailbox.source() as source:
        fetched = source.fetch_new(10)
        assert subjects(fetched) == ["Antwort 1", "Antwort 2"]  # \Deleted is not new
        source.move(fetched[0].key, REPLIES)
        source.move(fetched[0].key, REPLIES)

    # A plain EXPUNGE would have taken "Papierkorb" with it.
    assert mailbox.subjects() == ["Antwort 2", "Papierkorb"]
    assert mailbox.subjects(REPLIES) == ["Antwort 1"]


def test_without_move_a_move_stopped_before_its_expunge_is_finished_without_a_second_copy(
    without_move: PrivateDovecot,
) -> None:
    mailbox = ImapHarness(without_move)
    fill(mailbox, 1)
    with mailbox.source() as source:
        (item,) = source.fetch_new(10)
    # What a crashed earlier move left: the copy made, the original flagged, no expunge.
    with without_move.client(mailbox.user) as client:
        client.create_folder("Processed/Replies")
        client.select_folder("INBOX")
        uid = int(item.key.split(":")[1])
        client.copy([uid], "Processed/Replies")
        client.add_flags([uid], [b"\\Deleted"])

    with mailbox.source() as source:
        source.move(item.key, REPLIES)

    assert mailbox.subjects() == []
    assert mailbox.subjects(REPLIES) == ["Antwort 1"]


def test_without_move_or_uidplus_the_original_stays_flagged_and_nothing_else_goes(
    without_move_or_uidplus: PrivateDovecot,
) -> None:
    mailbox = ImapHarness(without_move_or_uidplus)
    caps = capabilities(mailbox)
    assert b"MOVE" not in caps and b"UIDPLUS" not in caps
    fill(mailbox, 2)
    mailbox.append(message("Papierkorb"))
    flag_deleted(mailbox, "Papierkorb")

    with mailbox.source() as source:
        first, _ = source.fetch_new(10)
        source.move(first.key, REPLIES)
        assert subjects(source.fetch_new(10)) == ["Antwort 2"]

    assert mailbox.subjects(REPLIES) == ["Antwort 1"]
    assert mailbox.subjects(with_deleted=False) == ["Antwort 2"]
    assert mailbox.subjects() == ["Antwort 1", "Antwort 2", "Papierkorb"]


def test_a_source_from_the_settings_logs_in_with_an_oauth2_token_from_its_file(
    imap: ImapHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dovecot's XOAUTH2 mechanism hands the token to the passdb as the password, so the
    # static passdb checks it: the SASL exchange on the wire is the real one.
    token_file = tmp_path / "token"
    token_file.write_text(imap.server.password + "\n", encoding="utf-8")
    env = {
        "COMMS_MAILBOX_BACKEND": "imap",
        "COMMS_IMAP_HOST": "127.0.0.1",
        "COMMS_IMAP_PORT": str(imap.server.port),
        "COMMS_IMAP_SECURITY": "none",
        "COMMS_IMAP_USERNAME": imap.user,
        "COMMS_IMAP_OAUTH2_TOKEN_FILE": str(token_file),
        "COMMS_IMAP_TIMEOUT": "5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fill(imap, 1)

    with open_source(load_settings()) as source:
        assert source.name == f"imap://{imap.user}@127.0.0.1:{imap.server.port}/INBOX"
        assert subjects(source.fetch_new(10)) == ["Antwort 1"]


# Settings.


def test_the_default_source_is_the_maildir_under_the_var_folder(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path)
    source = open_source(settings)
    assert isinstance(source, MaildirSource)
    assert source.name == f"maildir:{tmp_path.resolve() / 'mailbox'}"
    assert settings.mailbox_batch >= 1


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"COMMS_MAILBOX_BACKEND": "imap"}, "COMMS_IMAP_HOST"),
        (
            {"COMMS_MAILBOX_BACKEND": "imap", "COMMS_IMAP_HOST": "imap.example"},
            "COMMS_IMAP_USERNAME",
        ),
        (
            {"COMMS_MAILBOX_BACKEND": "imap", "COMMS_IMAP_HOST": "h", "COMMS_IMAP_USERNAME": "u"},
            "COMMS_IMAP_OAUTH2_TOKEN_FILE",
        ),
        (
            {"COMMS_IMAP_PASSWORD": "a", "COMMS_IMAP_PASSWORD_FILE": "/f"},
            "COMMS_IMAP_PASSWORD_FILE",
        ),
        ({"COMMS_IMAP_PASSWORD": "a", "COMMS_IMAP_OAUTH2_TOKEN_FILE": "/f"}, "COMMS_IMAP_OAUTH2"),
        ({"COMMS_IMAP_SECURITY": "ssl"}, "COMMS_IMAP_SECURITY"),
        ({"COMMS_IMAP_FOLDER": "INBOX\r\nA1 DELETE INBOX"}, "COMMS_IMAP_FOLDER"),
        ({"COMMS_MAILBOX_MAX_BYTES": "1000"}, "COMMS_MAILBOX_MAX_BYTES"),
        ({"COMMS_MAILBOX_BATCH": "0"}, "COMMS_MAILBOX_BATCH"),
    ],
)
def test_an_unusable_mailbox_configuration_stops_start_up_naming_the_variable(
    env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=named):
        load_settings()


def test_the_imap_port_follows_the_security() -> None:
    assert Settings(imap_security="tls").effective_imap_port == 993
    assert Settings(imap_security="starttls").effective_imap_port == 143
    assert Settings(imap_security="tls", imap_port=10993).effective_imap_port == 10993


# TLS: certificates are verified, against the system's trust store or COMMS_IMAP_CA_FILE.


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA, and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, request = folder / "server.pem", folder / "server.key", folder / "server.csr"
    extensions = folder / "server.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1\n", encoding="utf-8")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    days = ("-days", "2")
    openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", *days, "-subj", "/CN=comms test CA"),
        *("-keyout", str(ca_key), "-out", str(ca)),
    )
    openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1"),
        *("-keyout", str(key), "-out", str(request)),
    )
    openssl(
        *("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key)),
        *("-CAcreateserial", *days, "-extfile", str(extensions), "-out", str(cert)),
    )
    return ca, cert, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("certificates")
    folder.chmod(0o755)
    ca, cert, key = make_certificates(folder)
    server = start_dovecot(certificate=(cert, key))
    yield server, ca
    server.close()


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_tls_and_starttls_read_mail_from_a_server_signed_by_the_ca_file(
    tls_server: tuple[PrivateDovecot, Path], security: str
) -> None:
    server, ca_file = tls_server
    mailbox = ImapHarness(server)
    fill(mailbox, 1)
    port = server.tls_port if security == "tls" else server.port
    with mailbox.source(security=security, port=port, ca_file=ca_file) as source:
        (item,) = source.fetch_new(10)
        source.move(item.key, REPLIES)
    assert mailbox.subjects(REPLIES) == ["Antwort 1"]


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_a_certificate_no_trusted_ca_signed_is_refused_before_login(
    tls_server: tuple[PrivateDovecot, Path], security: str
) -> None:
    server, _ = tls_server
    mailbox = ImapHarness(server)
    fill(mailbox, 1)
    port = server.tls_port if security == "tls" else server.port
    with (
        mailbox.source(security=security, port=port) as source,
        pytest.raises(MailboxPermanentError, match="certificate verification failed"),
    ):
        source.fetch_new(10)
