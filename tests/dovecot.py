"""A private Dovecot 2.3 for tests: its own config, ports, users and Maildirs in a temp dir.

Takes nothing but the machine's ``/usr/sbin/dovecot`` (Debian's dovecot-imapd/-pop3d) and,
for TLS, the ``openssl`` command; gives :class:`DovecotServer`, which listens on 127.0.0.1 free
ports for IMAP (plain, STARTTLS allowed), IMAPS and POP3 with a self-signed certificate for
``localhost``/``127.0.0.1`` (``cert_path`` is its own CA file), a passwd-file of users that
tests add at any time, and ``doveadm`` bound to this instance.  With ``sieve=True`` also
Pigeonhole: ManageSieve on ``sieve_port`` and LMTP on ``lmtp_port``, where each user's active
Sieve script (``~/sieve``, active ``~/.dovecot.sieve``) runs on delivery and ``redirect``
hands mail back to this server's LMTP (see ``_write_sendmail``); master users
(:meth:`DovecotServer.add_master_user`) log in to ManageSieve as any user with SASL PLAIN's
authzid.  With ``sieve=True`` users are found by the local part of a login
(``alice@corp.example.com`` is alice).  Also :func:`dovecot_fixture`,
a pytest fixture factory.  Fails with :class:`DovecotError` (with the end of Dovecot's log)
when the server does not start or a doveadm command fails.  Usable without pytest.

    with DovecotServer() as dovecot:
        dovecot.add_user("alice", "secret")
        uid = dovecot.deliver("alice", b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
        profile = dovecot.server_profile("local")   # a shared.settings.ServerProfile

    with DovecotServer(sieve=True) as dovecot:
        dovecot.add_user("alice", "secret")
        dovecot.deliver_lmtp("alice@corp.example.com", raw)   # runs alice's Sieve script
"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from imapclient import IMAPClient

from shared.secrets import Secret
from shared.settings import RuleServerSettings, ServerProfile, TlsMode
from tests.ports import free_port
from tests.tls import self_signed_certificate

DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
START_TIMEOUT = 20.0


class DovecotError(RuntimeError):
    """The test Dovecot did not start, or a doveadm command failed."""


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            # A login process answers with a greeting once it is really serving.
            sock.settimeout(2.0)
            return sock.recv(64).startswith((b"* OK", b"+OK", b'"IMPLEMENTATION"', b"220 "))
    except OSError:
        return False


class DovecotServer:
    """One private Dovecot instance; start() / stop(), or use it as a context manager."""

    def __init__(self, *, tls: bool = True, root: str | Path | None = None,
                 extra_config: str = "", sieve: bool = False) -> None:
        self.extra_config = extra_config  # appended to the generated dovecot.conf
        # Pigeonhole: ManageSieve on sieve_port, LMTP with Sieve on lmtp_port.
        self.sieve = sieve
        self.root = Path(tempfile.mkdtemp(prefix="mailroute-dovecot-", dir=root))
        self.tls = tls and shutil.which("openssl") is not None
        self.config_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.passwd_dir = self.root / "users"
        self.mail_root = self.root / "mail"
        self.cert_path = self.root / "cert.pem"
        self.key_path = self.root / "key.pem"
        self.host = "127.0.0.1"
        self.imap_port = free_port()
        self.imaps_port = free_port() if self.tls else 0
        self.pop3_port = free_port()
        self.sieve_port = free_port() if sieve else 0
        self.lmtp_port = free_port() if sieve else 0
        self._passwords: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        # Dovecot's unprivileged login processes must be able to reach base_dir.
        self.root.chmod(0o711)
        self.mail_root.mkdir()
        # Dovecot refuses mail access as UID 0: as root, mail belongs to the "dovecot" user.
        self._mail_uid, self._mail_gid = _mail_owner()
        os.chown(self.mail_root, self._mail_uid, self._mail_gid)
        (self.root / "run").mkdir()
        (self.root / "state").mkdir()
        self.passwd_dir.mkdir()
        # Master users (``user*master`` or SASL PLAIN authzid) log in to any user's mailbox.
        self.masters_path = self.root / "masters"
        self.masters_path.write_text("")
        if self.tls:
            self.cert_path, self.key_path = self_signed_certificate(self.root)
        if sieve:
            self._write_sendmail()
        self.config_path.write_text(self._config())

    # ---- life cycle -------------------------------------------------------------------

    def start(self) -> DovecotServer:
        if self._process is not None and self._process.poll() is None:
            return self
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        ports = [p for p in (self.imap_port, self.imaps_port, self.pop3_port,
                             self.sieve_port, self.lmtp_port) if p]
        waiting = list(ports)
        while waiting:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode(errors="replace") if \
                    self._process.stderr else ""
                self._process = None
                raise DovecotError(f"dovecot exited at start: {err}\n{self.log_tail()}")
            if self._logged_fatal(log_start) or time.monotonic() > deadline:
                self._kill()
                raise DovecotError("dovecot did not start listening\n"
                                   f"{self.log_tail()}")
            if waiting[0] == self.imaps_port or _accepts(waiting[0]):
                # The IMAPS port speaks TLS first; its listener comes up with the others.
                waiting.pop(0)
            else:
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the server and remove every file it had (config, mail, log)."""
        self._kill()
        # Dovecot's children (log, imap) may still be finishing a write for a moment.
        deadline = time.monotonic() + 10
        while self.root.exists():
            shutil.rmtree(self.root, ignore_errors=time.monotonic() < deadline)
            if self.root.exists():
                time.sleep(0.05)

    def restart(self) -> None:
        """Stop and start again on the same ports, keeping users and mail."""
        self._kill()
        self.start()

    def _logged_fatal(self, offset: int) -> bool:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return b"Fatal:" in log.read()
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()
        # The master is gone; wait until its ports are free again so restart() can bind them.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                _accepts_tcp(p) for p in (self.imap_port, self.pop3_port, self.sieve_port,
                                          self.lmtp_port) if p):
            time.sleep(0.05)

    def __enter__(self) -> DovecotServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- users and mail ---------------------------------------------------------------

    def add_user(self, name: str, password: str, userdb_fields: str = "") -> None:
        """Add a user, before or after start.

        One passwd-file per user: Dovecot checks a passwd-file for changes at most once a
        second, but opens a user's file it has never seen at once.  ``userdb_fields`` are
        the passwd-file's extra fields, e.g. ``userdb_sieve_quota_max_scripts=1``.
        """
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"unusable user name {name!r}")
        self._passwords[name] = password
        home = self.mail_root / name
        line = (f"{name}:{{PLAIN}}{password}:{self._mail_uid}:{self._mail_gid}::{home}::"
                f"{userdb_fields}\n")
        target = self.passwd_dir / name.lower()  # the config looks up %Lu
        tmp = self.passwd_dir / f".{name}.tmp"
        tmp.write_text(line)
        os.replace(tmp, target)

    def add_master_user(self, name: str, password: str) -> None:
        """A master user: ``<user>*<name>`` with this password opens any user's mailbox."""
        lines = [line for line in self.masters_path.read_text().splitlines()
                 if not line.startswith(f"{name}:")]
        lines.append(f"{name}:{{PLAIN}}{password}")
        tmp = self.root / ".masters.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.masters_path)

    def password(self, user: str) -> str:
        return self._passwords[user]

    def maildir(self, user: str) -> Path:
        return self.mail_root / user / "Maildir"

    def client(self, user: str, folder: str | None = None) -> IMAPClient:
        """A logged-in plain IMAP client (caller logs out); selects ``folder`` if given."""
        imap = IMAPClient(self.host, port=self.imap_port, ssl=False, timeout=10)
        imap.login(user, self._passwords[user])
        if folder is not None:
            imap.select_folder(folder)
        return imap

    def deliver(self, user: str, raw: bytes, folder: str = "INBOX",
                flags: Sequence[bytes] = (), when: datetime | None = None) -> int:
        """APPEND ``raw`` to ``folder`` as ``user`` (creating the folder); returns its UID."""
        with self.client(user) as imap:
            if folder != "INBOX" and not imap.folder_exists(folder):
                imap.create_folder(folder)
            response = imap.append(folder, raw, flags=tuple(flags), msg_time=when)
        # "[APPENDUID <uidvalidity> <uid>] Append completed."
        text = response.decode() if isinstance(response, bytes) else str(response)
        if "APPENDUID" not in text:
            raise DovecotError(f"APPEND gave no APPENDUID: {text}")
        return int(text.split("APPENDUID", 1)[1].split("]", 1)[0].split()[1])

    def deliver_lmtp(self, recipient: str, raw: bytes,
                     sender: str = "sender@example.org") -> None:
        """Hand ``raw`` to LMTP for ``recipient`` (an address: ``alice@any.domain`` is alice),
        so that the user's active Sieve script runs on it (``sieve=True`` only)."""
        if not self.lmtp_port:
            raise DovecotError("this DovecotServer was started without sieve=True")
        with smtplib.LMTP(self.host, self.lmtp_port) as lmtp:
            refused = lmtp.sendmail(sender, [recipient], raw)
        if refused:
            raise DovecotError(f"LMTP refused {recipient}: {refused}")

    def wait_for_mail(self, user: str, count: int, folder: str = "INBOX",
                      timeout: float = 10.0) -> list[int]:
        """The UIDs in ``folder`` once there are at least ``count`` (redirects arrive a moment
        after the LMTP delivery that caused them); raises DovecotError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            uids = self.uids(user, folder)
            if len(uids) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if len(uids) < count:
            raise DovecotError(f"{user}/{folder} has {len(uids)} message(s), expected "
                               f"{count}\n{self.log_tail()}")
        return uids

    def sieve_scripts(self, user: str) -> dict[str, str]:
        """The user's Sieve scripts by name, read from disk (``sieve=True`` only)."""
        folder = self.mail_root / user / "sieve"
        if not folder.is_dir():
            return {}
        return {path.name.removesuffix(".sieve"): path.read_text()
                for path in folder.glob("*.sieve")}

    def active_sieve(self, user: str) -> str | None:
        """The name of the user's active Sieve script, or None."""
        link = self.mail_root / user / ".dovecot.sieve"
        if not link.is_symlink():
            return None
        return Path(os.readlink(link)).name.removesuffix(".sieve")

    def uids(self, user: str, folder: str = "INBOX") -> list[int]:
        with self.client(user, folder) as imap:
            return sorted(int(u) for u in imap.search("ALL"))

    def flags(self, user: str, folder: str = "INBOX") -> dict[int, tuple[bytes, ...]]:
        """UID -> flags of every message in ``folder`` (read-only, changes nothing)."""
        with self.client(user) as imap:
            imap.select_folder(folder, readonly=True)
            data = imap.fetch(imap.search("ALL"), ["FLAGS"])
            # \Recent only says which session saw the message first; leave it out.
            return {int(uid): tuple(f for f in item[b"FLAGS"] if f != b"\\Recent")
                    for uid, item in data.items()}

    def uidvalidity(self, user: str, folder: str = "INBOX") -> int:
        with self.client(user) as imap:
            return int(imap.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"])

    def set_uidvalidity(self, user: str, value: int, folder: str = "INBOX") -> None:
        self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(value), folder)

    def doveadm(self, *args: str, stdin: bytes | None = None) -> str:
        """Run ``doveadm -c <this config> args...``; returns stdout, raises on failure."""
        result = subprocess.run([DOVEADM, "-c", str(self.config_path), *args], input=stdin,
                                capture_output=True, timeout=60, check=False)
        if result.returncode != 0:
            raise DovecotError(f"doveadm {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode(errors="replace")

    # ---- what other code needs to connect ---------------------------------------------

    def server_profile(self, name: str = "dovecot", tls: TlsMode = "none") -> ServerProfile:
        """A ServerProfile for this server: tls "none" (IMAP port), "starttls" or "ssl"."""
        if tls != "none" and not self.tls:
            raise DovecotError("this DovecotServer was started without TLS")
        port = self.imaps_port if tls == "ssl" else self.imap_port
        ca_file = str(self.cert_path) if tls != "none" else None
        return ServerProfile(name=name, host=self.host, port=port, tls=tls, ca_file=ca_file,
                             timeout=10.0)

    def rule_server(self, name: str = "sieve", tls: TlsMode = "none",
                    admin_user: str | None = None,
                    admin_password: str | None = None) -> RuleServerSettings:
        """A ManageSieve RuleServerSettings for this server (``sieve=True`` only); give a
        master user (:meth:`add_master_user`) as ``admin_user`` to log in as any user."""
        if not self.sieve_port:
            raise DovecotError("this DovecotServer was started without sieve=True")
        if tls != "none" and not self.tls:
            raise DovecotError("this DovecotServer was started without TLS")
        return RuleServerSettings(
            name=name, kind="managesieve", host=self.host, port=self.sieve_port, tls=tls,
            ca_file=str(self.cert_path) if tls != "none" else None, timeout=10.0,
            admin_user=admin_user,
            admin_password=Secret(admin_password) if admin_password is not None else None)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no dovecot log)"

    # ---- files ------------------------------------------------------------------------

    def _users_config(self) -> str:
        uid, gid = self._mail_uid, self._mail_gid
        if os.getuid() == 0:
            # Login processes refuse to run as root: use the Debian package's own users.
            internal = "dovecot" if _user_exists("dovecot") else "nobody"
            login = "dovenull" if _user_exists("dovenull") else "nobody"
        else:
            internal = login = pwd.getpwuid(uid).pw_name
        return (f"default_internal_user = {internal}\ndefault_login_user = {login}\n"
                f"first_valid_uid = {uid}\nfirst_valid_gid = {gid}\n")

    def _config(self) -> str:
        r = self.root
        if self.tls:
            ssl = (f"ssl = yes\nssl_cert = <{self.cert_path}\nssl_key = <{self.key_path}\n"
                   "ssl_min_protocol = TLSv1.2\n")
            imaps = f"  inet_listener imaps {{\n    address = 127.0.0.1\n" \
                    f"    port = {self.imaps_port}\n    ssl = yes\n  }}\n"
        else:
            ssl, imaps = "ssl = no\n", ""
        return f"""\
# Generated by tests/dovecot.py for one test run.
protocols = imap pop3{" sieve lmtp" if self.sieve else ""}
listen = 127.0.0.1
instance_name = {r.name}
base_dir = {r}/run
state_dir = {r}/state
log_path = {self.log_path}
info_log_path = {self.log_path}
debug_log_path = {self.log_path}
{ssl}disable_plaintext_auth = no
# XOAUTH2/OAUTHBEARER check the bearer token against the passdb like a password, so a
# user whose password is a token stands in for an OAuth2 server in tests.
auth_mechanisms = plain login xoauth2 oauthbearer
auth_master_user_separator = *
# Tests check refused logins; the default 2 s delay only slows them down.
auth_failure_delay = 0
{self._users_config()}mail_location = maildir:~/Maildir
mail_privileged_group =
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  master = yes
  args = scheme=PLAIN {self.masters_path}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.passwd_dir}/%Lu
}}
userdb {{
  driver = passwd-file
  args = {self.passwd_dir}/%Lu
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
{imaps}}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
# No authentication penalty: failed logins in one test must not slow down the next.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
{self._sieve_config() if self.sieve else ""}{self.extra_config}
"""


    def _write_sendmail(self) -> None:
        """The ``sendmail`` Sieve's redirect runs: hands the message to this Dovecot's LMTP.

        Pigeonhole's other route, ``submission_host``, speaks SMTP (EHLO), which Dovecot's
        own LMTP service refuses (tried: "500 5.5.1 Unknown command" at RCPT).  Calling
        ``dovecot-lda`` here would probably work too (not tried); handing the message back
        to LMTP keeps one delivery path.  Dovecot runs this as the mail user with ``-i -f
        <sender> -- <recipients>``; it uses only the standard library of the system's Python.
        """
        script = self.root / "sendmail"
        script.write_text(f"""#!/usr/bin/python3
import smtplib, sys
args = sys.argv[1:]
sender = args[args.index("-f") + 1] if "-f" in args else ""
recipients = args[args.index("--") + 1:] if "--" in args else [a for a in args if a[:1] != "-"]
with smtplib.LMTP("127.0.0.1", {self.lmtp_port}) as lmtp:
    refused = lmtp.sendmail(sender, recipients, sys.stdin.buffer.read())
sys.exit(1 if refused else 0)
""")
        script.chmod(0o755)

    def _sieve_config(self) -> str:
        return f"""\
service managesieve-login {{
  inet_listener sieve {{
    address = 127.0.0.1
    port = {self.sieve_port}
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
protocol lmtp {{
  mail_plugins = $mail_plugins sieve
}}
# Sieve's redirect needs addresses with a domain; users are found by their local part.
auth_username_format = %Ln
postmaster_address = postmaster@localhost
# fileinto a folder the user has not made yet creates it, as most installations do.
lda_mailbox_autocreate = yes
sendmail_path = {self.root / "sendmail"}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
  sieve_redirect_envelope_from = orig_recipient
}}
"""


def _mail_owner() -> tuple[int, int]:
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    for name in ("dovecot", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise DovecotError("running as root but found no unprivileged user to own the mail")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def dovecot_fixture(scope: Any = "function", **kwargs: Any) -> Callable[..., Any]:
    """Make a pytest fixture yielding a started DovecotServer, stopped afterwards.

    In a test module: ``dovecot = dovecot_fixture()`` (or ``dovecot_fixture(scope="module")``).
    """
    import pytest

    @pytest.fixture(scope=scope)
    def _fixture() -> Iterator[DovecotServer]:
        server = DovecotServer(**kwargs)
        try:
            server.start()
            yield server
        finally:
            server.stop()

    return _fixture
