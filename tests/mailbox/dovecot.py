"""A private Dovecot IMAP server for tests: its own config, state and Maildirs in a temp folder.

Any username logs in with :attr:`PrivateDovecot.password` (a static passdb) and gets a
mailbox of its own under ``<root>/mail/<username>``, so tests isolate themselves by using
a fresh username. The server can be stopped and started again on the same port with the
same mail, like a real server restarting. Facts about Dovecot on this machine:
/work/shared/notes/imap-testing.md (``dovecot-imapd``, Debian 12).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imapclient import IMAPClient

from tests.conftest import free_port, wait_for

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
# Dovecot refuses mail owned by system users (uid < 500 by default); nobody is above that.
MAIL_UID = 65534
START_TIMEOUT = 15


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def dovecot_installed() -> bool:
    return Path(DOVECOT).is_file()


class PrivateDovecot:
    """``dovecot -F -c <conf>`` on a free loopback port, plaintext login, Maildir++ mail.

    ``separator`` is the hierarchy separator of the mail namespace (``.`` is Dovecot's
    default for Maildir, ``/`` is what many servers show); ``capabilities`` replaces the
    list announced after login (to play a server without MOVE or UIDPLUS);
    ``mechanisms`` are the SASL mechanisms offered.
    """

    password = "dovecot-test-password"

    def __init__(
        self,
        *,
        separator: str = ".",
        capabilities: str | None = None,
        mechanisms: str = "plain login",
        certificate: tuple[Path, Path] | None = None,
    ) -> None:
        self.port = free_port()
        # With a (certificate, key): STARTTLS on ``port`` and implicit TLS on ``tls_port``.
        self.certificate = certificate
        self.tls_port = free_port() if certificate else 0
        self.root = Path(tempfile.mkdtemp(prefix="comms-dovecot-"))
        # Mail is owned by MAIL_UID: every folder above it must be traversable.
        self.root.chmod(0o755)
        self.mail = self.root / "mail"
        self.mail.mkdir()
        self.separator = separator
        self.capabilities = capabilities
        self.mechanisms = mechanisms
        self.config = self.root / "dovecot.conf"
        self.log = self.root / "dovecot.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        if os.geteuid() == 0:
            uid = gid = MAIL_UID
            users = ""
            os.chown(self.mail, MAIL_UID, MAIL_UID)
        else:
            # Not root: every Dovecot process runs as the current user, and so does mail.
            uid, gid = os.getuid(), os.getgid()
            name = pwd.getpwuid(uid).pw_name
            users = (
                f"default_login_user = {name}\ndefault_internal_user = {name}\n"
                f"first_valid_uid = {uid}\nfirst_valid_gid = {gid}\n"
            )
        capability = f"imap_capability = {self.capabilities}\n" if self.capabilities else ""
        if self.certificate:
            cert, key = self.certificate
            tls = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n"
        else:
            tls = "ssl = no\n"
        self.config.write_text(
            f"""\
protocols = imap
listen = 127.0.0.1
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.log}
info_log_path = {self.log}
{tls}disable_plaintext_auth = no
auth_mechanisms = {self.mechanisms}
auth_failure_delay = 0
{users}{capability}passdb {{
  driver = static
  args = password={self.password}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.mail}/%u
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = {self.separator}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
""",
            encoding="utf-8",
        )

    def start(self) -> None:
        with self.log.open("ab") as log:
            # A process group of its own: see stop().
            self.process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.config)],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_for(self._accepts, timeout=START_TIMEOUT, explain=self.tail)

    def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"dovecot exited with {self.process.returncode}:\n{self.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(100).startswith(b"* OK")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the master and its children, and wait until the port is free.

        An ``imap`` process serving a connection outlives its master's SIGTERM (and so do
        ``log`` and ``stats``), still answering its client: a restart would not be one.
        And the master alone takes one to three seconds to exit. So the whole process
        group of the server (all started by us, the master first) gets the SIGTERM at
        once: gone in a few tens of milliseconds.
        """
        if self.process is not None and self.process.poll() is None:
            group = os.getpgid(self.process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            wait_for(lambda: not _group_alive(group), timeout=START_TIMEOUT, explain=self.tail)
        self.process = None
        wait_for(lambda: not self._accepts_quietly(), timeout=START_TIMEOUT, explain=self.tail)

    def _accepts_quietly(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no dovecot log)"

    @staticmethod
    def new_user() -> str:
        """A username no test used yet: a mailbox of its own."""
        return f"user-{uuid.uuid4().hex[:12]}"

    @contextmanager
    def client(self, username: str) -> Iterator[IMAPClient]:
        """A logged-in IMAPClient of the test's own (to APPEND, look, meddle)."""
        client = IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=10)
        try:
            client.login(username, self.password)
            yield client
        finally:
            try:
                client.logout()
            except Exception:
                client.shutdown()
