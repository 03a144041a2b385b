"""Reads one POP3 mailbox: the messages whose UIDL was not handed on before, then acts on them.

Takes a :class:`~shared.settings.MailboxSettings` of kind ``pop3``, its server's
:class:`~shared.settings.ServerProfile` and the set of UIDLs already handed to the broker
(``persist.mailbox_state``); gives :class:`Pop3Source`.  TLS per the profile (``ssl``: POP3S,
``starttls``: STLS), certificates verified unless the profile opts out; login by USER/PASS
(own password or ``user*master``), SASL PLAIN with an authorization identity, or XOAUTH2.
POP3 deletes take effect only at QUIT: a session dropped after DELE re-lists the messages, but
their UIDLs were recorded before the DELE, so the next poll deletes them again without
handing them on twice.  ``after: delete`` deletes; keep and seen leave the messages.
Fails with :class:`~ingest.errors.MailboxAuthError` when the login is refused and
:class:`~ingest.errors.MailboxUnavailable` on network, TLS, timeout or protocol errors.
"""

from __future__ import annotations

import base64
import logging
import poplib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

from ingest.credentials import Credentials, Login, xoauth2_string
from ingest.errors import MailboxAuthError, MailboxUnavailable
from ingest.imap_source import tls_context
from ingest.source import Batch, FetchedMessage, byte_bounded
from shared.logs import one_line
from shared.secrets import reveal
from shared.settings import MailboxSettings, ServerProfile

log = logging.getLogger(__name__)


class Pop3Source:
    """One POP3 mailbox, opened for one poll."""

    def __init__(self, mailbox: MailboxSettings, profile: ServerProfile, seen: set[str],
                 credentials: Credentials | None = None) -> None:
        self._box = mailbox
        self._profile = profile
        self._seen = seen
        self._credentials = credentials or Credentials()
        self._pop: poplib.POP3 | None = None
        self._numbers: dict[str, int] = {}
        self.listed: list[str] = []

    @property
    def uidvalidity(self) -> int | None:
        return None

    def has_news(self, uidvalidity: int | None, last_uid: int) -> bool:
        return True

    def __enter__(self) -> Pop3Source:
        profile = self._profile
        with self._translate("connect"):
            if profile.tls == "ssl":
                pop: poplib.POP3 = poplib.POP3_SSL(profile.host, profile.port,
                                                   timeout=profile.timeout,
                                                   context=tls_context(profile))
            else:
                pop = poplib.POP3(profile.host, profile.port, timeout=profile.timeout)
        self._pop = pop
        try:
            if profile.tls == "starttls":
                with self._translate("stls"):
                    pop.stls(tls_context(profile))
            self._login(pop, self._credentials.login_for(self._box, profile))
        except BaseException:
            self._drop()
            raise
        return self

    def _login(self, pop: poplib.POP3, login: Login) -> None:
        refused = f"mailbox {self._box.name}: {login.method} login as {login.login_name!r} " \
                  f"on {self._profile.host} refused"
        try:
            with self._translate("login"):
                if login.method == "xoauth2" and login.tokens is not None:
                    try:
                        self._auth(pop, "XOAUTH2", xoauth2_string(login.user, login.tokens.token()))
                    except poplib.error_proto:
                        fresh = login.tokens.token(refresh=True)
                        try:
                            self._auth(pop, "XOAUTH2", xoauth2_string(login.user, fresh))
                        except poplib.error_proto as exc:
                            raise MailboxUnavailable(f"{refused} with a fresh token: "
                                                     f"{_text(exc)}") from None
                elif login.method == "authzid":
                    self._auth(pop, "PLAIN", f"{login.user}\0{login.login_name}\0"
                               f"{reveal(login.password)}".encode())
                else:
                    pop.user(login.login_name)
                    pop.pass_(reveal(login.password))
        except _AuthRefused as exc:
            raise MailboxAuthError(f"{refused}: {exc}") from None

    @staticmethod
    def _auth(pop: Any, mechanism: str, initial: bytes) -> None:
        # poplib has no AUTH; RFC 5034 allows the initial response on the command line.
        response = pop._shortcmd(f"AUTH {mechanism} {base64.b64encode(initial).decode()}")
        if not response.startswith(b"+OK"):
            # A "+ <error details>" challenge (XOAUTH2): answer empty, then read the -ERR.
            pop._putcmd("")
            response = pop._getresp()
            if not response.startswith(b"+OK"):
                raise poplib.error_proto(response)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        pop, self._pop = self._pop, None
        if pop is None:
            return
        if exc_type is None:
            with self._translate("quit"):
                pop.quit()  # the DELEs take effect here
        else:
            self._drop(pop)

    def _drop(self, pop: poplib.POP3 | None = None) -> None:
        pop = pop or self._pop
        self._pop = None
        if pop is not None:
            try:
                pop.close()
            except OSError:
                log.debug("mailbox %s: could not close the connection", self._box.name)

    def summary(self) -> str:
        with self._translate("stat"):
            count, size = self._require().stat()
        return f"{count} message(s), {size} bytes"

    def batches(self, after_uid: int = 0) -> Iterator[Batch]:
        pop = self._require()
        with self._translate("uidl"):
            _, lines, _ = pop.uidl()
        listing = []
        for line in lines:
            number_text, uidl = line.decode("ascii", "replace").split(" ", 1)
            listing.append((int(number_text), uidl.strip()))
        self.listed = [uidl for _, uidl in listing]
        self._numbers = {uidl: number for number, uidl in listing}
        stale = [uidl for _, uidl in listing if uidl in self._seen]
        if stale and self._box.after == "delete":
            # Handed on before, but the session that deleted them ended before QUIT.
            self.after_confirm(Batch(messages=[
                FetchedMessage(uid=u, raw=b"", received_at=datetime.now(UTC)) for u in stale]))
        fresh = [(n, u) for n, u in listing if u not in self._seen]
        for run in byte_bounded(fresh, self._sizes(fresh), max(1, self._box.batch_size),
                                self._box.batch_bytes):
            messages = []
            for number, uidl in run:
                with self._translate("retr"):
                    _, body_lines, _ = pop.retr(number)
                raw = b"\r\n".join(body_lines) + b"\r\n"
                messages.append(FetchedMessage(uid=uidl, raw=raw, received_at=_date_of(raw)))
            yield Batch(messages=messages)

    def _sizes(self, fresh: list[tuple[int, str]]) -> list[int]:
        """Each message's size from ``LIST`` (0 where the server gives none); a single message
        needs none."""
        if len(fresh) <= 1:
            return [0] * len(fresh)
        with self._translate("list"):
            _, lines, _ = self._require().list()
        sizes: dict[int, int] = {}
        for line in lines:
            fields = line.split()
            if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
                sizes[int(fields[0])] = int(fields[1])
        return [sizes.get(number, 0) for number, _ in fresh]

    def after_confirm(self, batch: Batch) -> None:
        if self._box.after != "delete":
            return
        pop = self._require()
        with self._translate("dele"):
            for message in batch.messages:
                number = self._numbers.get(message.uid)
                if number is not None:
                    pop.dele(number)

    def _require(self) -> poplib.POP3:
        if self._pop is None:
            raise MailboxUnavailable(f"mailbox {self._box.name}: not connected")
        return self._pop

    @contextmanager
    def _translate(self, step: str) -> Iterator[None]:
        try:
            yield
        except poplib.error_proto as exc:
            text = _text(exc)
            if step == "login" and refused_by_server(text):
                raise _AuthRefused(text) from None
            raise MailboxUnavailable(f"mailbox {self._box.name}: {step} on "
                                     f"{self._profile.host}:{self._profile.port} failed: "
                                     f"POP3 error: {text}") from None
        except OSError as exc:
            raise MailboxUnavailable(
                f"mailbox {self._box.name}: {step} on {self._profile.host}:"
                f"{self._profile.port} failed: {type(exc).__name__}: {_text(exc)}") from exc


class _AuthRefused(Exception):
    pass


# RFC 2449/3206 codes that say "try later"; "-ERR EOF" is poplib's word for a dropped connection.
_TRANSIENT_POP3_CODES = ("[SYS/TEMP]", "[IN-USE]", "[LOGIN-DELAY]")


def refused_by_server(text: str) -> bool:
    """True when the server's -ERR answer to the login means the credentials were refused."""
    upper = text.upper()
    if upper.startswith("-ERR EOF") or not upper.startswith("-ERR"):
        return False
    return not any(code in upper for code in _TRANSIENT_POP3_CODES)


def _text(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith(("b'", 'b"')):
        text = text[2:-1]
    return one_line(text)


def _date_of(raw: bytes) -> datetime:
    """POP3 has no arrival time; the Date header, else now."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"date:"):
            try:
                value = parsedate_to_datetime(line[5:].decode("ascii", "replace").strip())
            except (TypeError, ValueError):
                break
            return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.now(UTC)
