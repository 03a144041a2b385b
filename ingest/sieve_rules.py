"""mailroute's forwarding rule in Sieve mailboxes over ManageSieve (RFC 5804).

Takes a ManageSieve :class:`~shared.settings.RuleServerSettings` (Dovecot/Pigeonhole, Cyrus,
Stalwart) and :class:`~ingest.forwarding_rules.RuleTarget` s; gives
:class:`ManageSieveBackend`, the :class:`~ingest.forwarding_rules.RuleBackend` for them, and
the pure script functions (:func:`rule_script`, :func:`wrapper_script`, :func:`parse_redirect`,
:func:`parse_includes`) it is built on.  Every failure is a
:class:`~ingest.forwarding_rules.RuleError` naming the server and the problem (refused login,
unreachable server, a script the server rejects with its reason); never a password.

Beside, not over: ManageSieve has one active script per user.  mailroute writes its own
script ``<rule_name>`` (``redirect :copy`` to the forward mailbox).  A user without an active
script gets it activated directly.  A user whose own script is active gets a wrapper,
``<rule_name>-main``, that ``include``s mailroute's script and then the user's own script, and
the wrapper is activated; the user's script stays as it was.  ``remove`` re-activates the
script the wrapper names and deletes mailroute's two scripts.

The client is sievelib's ``Client`` with two things changed by a small subclass: the TCP
connect has the configured timeout (sievelib's has none; its reads time out after a fixed 5
s), and TLS uses the configured CA file and ``verify_tls`` (sievelib trusts only the system's
CAs).  Logins always use SASL PLAIN, which carries the authorization identity of an admin (a
Dovecot master user, a Cyrus admin) logging in as each user.
"""

from __future__ import annotations

import re
import socket
import ssl
from typing import Any

from sievelib.managesieve import Client
from sievelib.managesieve import Error as SieveLibError

from ingest.forwarding_rules import Inspection, RuleError, RuleTarget
from shared.settings import RuleServerSettings

WRAPPER_SUFFIX = "-main"
# A plain addr-spec: what a redirect can take without quoting surprises.
ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_REDIRECT = re.compile(r'redirect\s+(?::copy\s+)?"((?:[^"\\]|\\.)*)"\s*;')
_INCLUDE = re.compile(r'include\s+:personal\s+"((?:[^"\\]|\\.)*)"\s*;')


# ---- the scripts (pure) -------------------------------------------------------------------

def sieve_string(text: str) -> str:
    """``text`` as a Sieve quoted string (RFC 5228 section 2.4.2)."""
    if any(ord(c) < 32 and c not in "\t" for c in text):
        raise RuleError(f"{text!r} has a control character; it cannot go into a Sieve script")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def rule_script(forward_address: str, canary_sender: str | None = None) -> str:
    """mailroute's script: a copy of each incoming message to ``forward_address``.

    With ``canary_sender``, mailroute's canaries from it go to the forward mailbox only
    (``stop`` also ends the user's own script when the wrapper includes it, RFC 6609).
    """
    for address in (forward_address, canary_sender):
        if address is not None and not ADDRESS.fullmatch(address):
            raise RuleError(f"address {address!r} is not a plain email address")
    canaries = "" if canary_sender is None else (
        "# mailroute's canaries (marked test messages) go to the forward mailbox only.\n"
        f'if allof (exists "X-Mailroute-Canary", address :is "from" '
        f"{sieve_string(canary_sender)}) {{\n"
        f"    redirect {sieve_string(forward_address)};\n"
        "    stop;\n"
        "}\n")
    return ("# mailroute: a copy of every incoming message to the forward mailbox.\n"
            "# Written by `mailroute rules deploy`; `mailroute rules remove` takes it out.\n"
            'require ["copy"];\n'
            f"{canaries}"
            f"redirect :copy {sieve_string(forward_address)};\n")


def wrapper_script(rule_name: str, original: str) -> str:
    """The active script when the user had their own: mailroute's, then the user's."""
    return ("# mailroute: runs mailroute's forwarding rule, then this user's own script.\n"
            "# `mailroute rules remove` activates the user's script again and deletes this.\n"
            'require ["include"];\n'
            f"include :personal {sieve_string(rule_name)};\n"
            f"include :personal {sieve_string(original)};\n")


def parse_redirect(script: str) -> list[str]:
    """The addresses a script redirects to (as mailroute writes them)."""
    return [_unquote(m) for m in _REDIRECT.findall(_strip_comments(script))]


def parse_includes(script: str) -> list[str]:
    """The personal scripts a script includes, in order."""
    return [_unquote(m) for m in _INCLUDE.findall(_strip_comments(script))]


def _strip_comments(script: str) -> str:
    return "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))


def _same_text(a: str, b: str) -> bool:
    def normal(text: str) -> list[str]:
        return [line.rstrip() for line in text.strip().splitlines()]
    return normal(a) == normal(b)


def wrapper_name(server: RuleServerSettings) -> str:
    return server.rule_name + WRAPPER_SUFFIX


# ---- the client ---------------------------------------------------------------------------

class SieveClient(Client):
    """sievelib's client with a connect timeout and our TLS context (see the module doc)."""

    sock: Any  # a socket, an SSL socket, or None once shut

    def __init__(self, server: RuleServerSettings) -> None:
        assert server.host is not None
        super().__init__(server.host, server.port)
        self.server = server

    def _Client__enable_ssl(self, keyfile: Any = None, certfile: Any = None) -> None:
        # Replaces sievelib's private TLS set-up (called for STARTTLS and for implicit TLS).
        context = ssl.create_default_context(cafile=self.server.ca_file)
        if not self.server.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=self.srvhostname)
        except (ssl.SSLError, OSError) as exc:
            raise RuleError(f"{_where(self.server)}: TLS failed: {exc}") from exc

    def open(self, login: str, password: str, authz_id: str) -> None:
        """Connect, TLS as configured, log in with SASL PLAIN; RuleError on any failure."""
        server, where = self.server, _where(self.server)
        try:
            self.sock = socket.create_connection((self.srvaddr, self.srvport),
                                                 timeout=server.timeout)
        except OSError as exc:
            raise RuleError(f"{where}: server unreachable: {exc}") from exc
        try:
            if server.tls == "ssl":
                self._Client__enable_ssl()
            if not self._Client__get_capabilities():
                raise RuleError(f"{where}: no capabilities in the server's greeting")
            if server.tls == "starttls":
                if not self.has_tls_support():
                    raise RuleError(f"{where}: the server offers no STARTTLS")
                if not self._Client__starttls():
                    raise RuleError(f"{where}: STARTTLS refused: {self.reason()}")
            if "PLAIN" not in self._mechanisms():
                hint = " without TLS (set tls: starttls)" if server.tls == "none" else ""
                raise RuleError(f"{where}: the server offers no SASL PLAIN login{hint}")
            if not self._Client__authenticate(login, password, authz_id, "PLAIN"):
                who = f"{login} as {authz_id}" if authz_id else login
                raise RuleError(f"{where}: login refused for {who}: {self.reason()}")
        except SieveLibError as exc:
            raise RuleError(f"{where}: {exc}") from exc
        except OSError as exc:
            raise RuleError(f"{where}: connection failed: {exc}") from exc

    def _mechanisms(self) -> list[str]:
        try:
            return [m.upper() for m in self.get_sasl_mechanisms()]
        except (KeyError, AttributeError):  # no SASL capability at all
            return []

    def reason(self) -> str:
        """The server's last NO text (sievelib keeps it in errmsg)."""
        raw = self.errmsg or b""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return " ".join(text.split()) or "no reason given"

    def __enter__(self) -> SieveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shut()

    def shut(self) -> None:
        if self.sock is None:
            return
        try:
            if self.authenticated:
                self.logout()
        except (SieveLibError, OSError):
            pass
        finally:
            try:
                self.sock.close()
            finally:
                self.sock = None


def _where(server: RuleServerSettings) -> str:
    return f"managesieve {server.name} ({server.host}:{server.port})"


# ---- the backend --------------------------------------------------------------------------

class ManageSieveBackend:
    """mailroute's rule on one ManageSieve server: inspect, install, remove (per user).

    One connection per user: an ``inspect`` followed by ``install`` or ``remove`` for the
    same user reuses it; the next user's call, or :meth:`close`, ends it.
    """

    def __init__(self, server: RuleServerSettings) -> None:
        if server.kind != "managesieve" or not server.host:
            raise ValueError(f"rule server {server.name!r} is not a ManageSieve server")
        self.server = server
        self._session: tuple[RuleTarget, SieveClient] | None = None

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session[1].shut()

    def __enter__(self) -> ManageSieveBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the RuleBackend protocol -----------------------------------------------------

    def inspect(self, target: RuleTarget) -> Inspection:
        return self._guarded(target, self._inspect)

    def install(self, target: RuleTarget) -> None:
        self._guarded(target, self._install)

    def remove(self, target: RuleTarget) -> bool:
        return bool(self._guarded(target, self._remove))

    # -- the work -------------------------------------------------------------------------

    def _inspect(self, client: SieveClient, target: RuleTarget) -> Inspection:
        name, wrapper = self.server.rule_name, wrapper_name(self.server)
        active, scripts = self._list(client)
        if name not in scripts:
            return Inspection("missing", f"no script {name!r}")
        text = self._get(client, name)
        addresses = parse_redirect(text)
        if set(addresses) != {target.forward_address}:
            where = ", ".join(addresses) if addresses else "nowhere"
            return Inspection("differs", f"script {name!r} forwards to {where}, "
                                         f"not {target.forward_address}")
        if not _same_text(text, rule_script(target.forward_address, target.canary_sender)):
            return Inspection("differs", f"script {name!r} was changed")
        if active == name:
            return Inspection("present", f"script {name!r} active")
        if active == wrapper:
            includes = parse_includes(self._get(client, wrapper))
            if not includes or includes[0] != name:
                return Inspection("differs", f"script {wrapper!r} no longer runs {name!r}")
            original = includes[1] if len(includes) > 1 else None
            if original is not None and original not in scripts:
                return Inspection("differs", f"script {wrapper!r} includes the user's script "
                                             f"{original!r}, which is gone")
            beside = f", then the user's {original!r}" if original else ""
            return Inspection("present", f"script {wrapper!r} active: {name!r}{beside}")
        if active is None:
            return Inspection("differs", f"script {name!r} is not active (no active script)")
        return Inspection("differs", f"script {name!r} is not active: the user's {active!r} "
                                     "is")

    def _install(self, client: SieveClient, target: RuleTarget) -> None:
        name, wrapper = self.server.rule_name, wrapper_name(self.server)
        script = rule_script(target.forward_address, target.canary_sender)
        self._require(client, "copy")
        active, scripts = self._list(client)
        self._put(client, name, script)
        if active == wrapper:
            includes = parse_includes(self._get(client, wrapper))
            original = next((s for s in includes if s not in (name, wrapper)), None)
        elif active in (None, name):
            original = None
        else:
            original = active
        if original is None or original not in scripts:
            self._activate(client, name)
            if wrapper in scripts:
                self._delete(client, wrapper)
            return
        self._require(client, "include")
        self._put(client, wrapper, wrapper_script(name, original))
        self._activate(client, wrapper)

    def _remove(self, client: SieveClient, target: RuleTarget) -> bool:
        name, wrapper = self.server.rule_name, wrapper_name(self.server)
        active, scripts = self._list(client)
        ours = [s for s in (wrapper, name) if s in scripts]
        if not ours:
            return False
        if active == wrapper:
            includes = parse_includes(self._get(client, wrapper))
            original = next((s for s in includes if s not in (name, wrapper)), None)
            self._activate(client, original if original in scripts else "")
        elif active == name:
            self._activate(client, "")
        for script in ours:
            self._delete(client, script)
        return True

    # -- protocol steps, each a RuleError with the server's reason --------------------------

    def _guarded(self, target: RuleTarget, work: Any) -> Any:
        client = self._client(target)
        try:
            return work(client, target)
        except RuleError:
            raise
        except SieveLibError as exc:
            self.close()
            raise RuleError(f"{_where(self.server)}: {target.login}: {exc}") from exc
        except OSError as exc:
            self.close()
            raise RuleError(f"{_where(self.server)}: {target.login}: connection failed: "
                            f"{exc}") from exc

    def _client(self, target: RuleTarget) -> SieveClient:
        if self._session is not None:
            if self._session[0] == target and self._session[1].sock is not None:
                return self._session[1]
            self.close()
        server = self.server
        if server.admin_user:
            assert server.admin_password is not None  # settings validation
            login, password, authz_id = (server.admin_user, server.admin_password.reveal(),
                                         target.login)
        elif target.password is not None:
            login, password, authz_id = target.login, target.password.reveal(), ""
        else:
            raise RuleError(f"{_where(server)}: no admin_user and no password for "
                            f"{target.login}")
        client = SieveClient(server)
        try:
            client.open(login, password, authz_id)
        except RuleError:
            client.shut()
            raise
        self._session = (target, client)
        return client

    def _fail(self, client: SieveClient, what: str) -> RuleError:
        return RuleError(f"{_where(self.server)}: {what}: {client.reason()}")

    def _list(self, client: SieveClient) -> tuple[str | None, set[str]]:
        listing = client.listscripts()
        if listing is None:
            raise self._fail(client, "LISTSCRIPTS failed")
        active, others = listing
        scripts = set(others)
        if active is not None:
            scripts.add(active)
        return active, scripts

    def _get(self, client: SieveClient, name: str) -> str:
        text = client.getscript(name)
        if text is None:
            raise self._fail(client, f"cannot read script {name!r}")
        return str(text)

    def _put(self, client: SieveClient, name: str, text: str) -> None:
        if not client.putscript(name, text):
            raise self._fail(client, f"script {name!r} rejected")

    def _activate(self, client: SieveClient, name: str) -> None:
        if not client.setactive(name):
            what = f"cannot activate script {name!r}" if name else "cannot deactivate scripts"
            raise self._fail(client, what)

    def _delete(self, client: SieveClient, name: str) -> None:
        if not client.deletescript(name):
            raise self._fail(client, f"cannot delete script {name!r}")

    def _require(self, client: SieveClient, extension: str) -> None:
        try:
            extensions = client.get_sieve_capabilities()
        except KeyError:
            return  # no SIEVE capability listed: let PUTSCRIPT decide
        if extension not in extensions:
            raise RuleError(f"{_where(self.server)}: the server's Sieve has no {extension!r} "
                            "extension, which mailroute's rule needs")
