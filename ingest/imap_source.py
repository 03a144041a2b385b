"""Reads one folder of one IMAP mailbox: new messages by UID, in batches, then acts on them.

Takes a :class:`~shared.settings.MailboxSettings` and its server's
:class:`~shared.settings.ServerProfile`; gives :class:`ImapSource`, a context manager that
connects (TLS per the profile, certificates always verified unless ``verify_tls`` is false) and
logs in (own password, master user, SASL authzid or XOAUTH2, see ``ingest.credentials``; an
XOAUTH2 token the server refuses is refreshed once).  :meth:`ImapSource.has_news` is the cheap
check (``STATUS UIDNEXT UIDVALIDITY``) before the folder is selected; :meth:`idle_wait` waits
in IDLE for new mail.  :meth:`ImapSource.batches` yields the messages whose UID is
above ``after_uid`` (``UID SEARCH n:*`` always returns the last message, so UIDs at or below
the cursor are dropped), ``batch_size`` at a time and at most ``batch_bytes`` (the sizes of
messages too large for a full batch are asked for first), each body paired with the UID its
own FETCH response carries; a message expunged meanwhile is simply missing.  The next
batch's FETCH is sent as a batch is handed over (IMAP pipelining), so the server sends it
while the caller publishes; its answer is read before any other command is sent.
:meth:`after_confirm` applies keep / seen / move / delete to one batch.  UID commands only.

Fails with :class:`~ingest.errors.MailboxAuthError` when the login is refused and
:class:`~ingest.errors.MailboxUnavailable` on network, TLS, timeout or protocol errors.
"""

from __future__ import annotations

import imaplib
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from types import TracebackType
from typing import Any

from imapclient import IMAPClient
from imapclient.datetime_util import parse_to_datetime
from imapclient.exceptions import IMAPClientError, LoginError
from imapclient.imapclient import join_message_ids

from ingest.credentials import Credentials, Login
from ingest.errors import MailboxAuthError, MailboxUnavailable
from ingest.fetch_response import parse_fetch
from ingest.source import Batch, FetchedMessage, byte_bounded
from shared.logs import one_line
from shared.secrets import reveal
from shared.settings import MailboxSettings, ServerProfile

log = logging.getLogger(__name__)

SEEN = b"\\Seen"
DELETED = b"\\Deleted"
FETCH_ITEMS = "(BODY.PEEK[] INTERNALDATE)"
# The next batch is asked for while this one is published only when this one is smaller than
# this: a mailbox of very large messages does not hold two batches in memory.
PREFETCH_BELOW_BYTES = 16 * 1024 * 1024

ClientFactory = Callable[..., IMAPClient]


def tls_context(profile: ServerProfile) -> ssl.SSLContext:
    """A context that verifies the server (against ``ca_file`` if set), unless told not to."""
    context = ssl.create_default_context(cafile=profile.ca_file)
    if not profile.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ImapSource:
    """One IMAP folder, opened for one poll."""

    def __init__(self, mailbox: MailboxSettings, profile: ServerProfile,
                 client_factory: ClientFactory = IMAPClient,
                 credentials: Credentials | None = None) -> None:
        self._mailbox = mailbox
        self._profile = profile
        self._client_factory = client_factory
        self._credentials = credentials or Credentials()
        self._client: IMAPClient | None = None
        self._uidvalidity: int | None = None
        self._selected = False
        # A FETCH sent ahead (tag, UIDs) and, once read, its messages (UIDs, messages)
        self._pending: tuple[Any, list[int]] | None = None
        self._prefetched: tuple[list[int], list[FetchedMessage]] | None = None

    @property
    def uidvalidity(self) -> int | None:
        if not self._selected and self._client is not None:
            self.select()
        return self._uidvalidity

    # ---- session ----------------------------------------------------------------------

    def __enter__(self) -> ImapSource:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        profile, box = self._profile, self._mailbox
        with self._translate("connect"):
            if profile.tls == "ssl":
                client = self._client_factory(profile.host, port=profile.port, ssl=True,
                                              ssl_context=tls_context(profile),
                                              timeout=profile.timeout)
            else:
                client = self._client_factory(profile.host, port=profile.port, ssl=False,
                                              timeout=profile.timeout)
        self._client = client
        try:
            with self._translate("starttls"):
                if profile.tls == "starttls":
                    client.starttls(tls_context(profile))
            # Aware datetimes as the server sent them, not converted to naive local time.
            client.normalise_times = False
            quiet_imaplib(client)
            self._login(client, self._credentials.login_for(box, profile))
        except BaseException:
            self.close()
            raise

    def _login(self, client: IMAPClient, login: Login) -> None:
        box, profile = self._mailbox, self._profile
        refused = f"mailbox {box.name}: {login.method} login as {login.login_name!r} " \
                  f"on {profile.host} refused"
        with self._translate("login"):
            try:
                if login.method == "xoauth2" and login.tokens is not None:
                    try:
                        client.oauth2_login(login.user, login.tokens.token().reveal())
                    except LoginError:
                        # The token may have expired early: one fresh token, then give up
                        # for this poll (the mailbox is failing, not disabled).
                        try:
                            client.oauth2_login(login.user,
                                                login.tokens.token(refresh=True).reveal())
                        except LoginError as exc:
                            raise MailboxUnavailable(f"{refused} with a fresh token: "
                                                     f"{_text(exc)}") from None
                elif login.method == "authzid":
                    client.plain_login(login.login_name, reveal(login.password),
                                       authorization_identity=login.user)
                else:
                    client.login(login.login_name, reveal(login.password))
            except LoginError as exc:
                if not refused_by_server(exc):
                    raise MailboxUnavailable(f"{refused}: {_text(exc)} (connection lost or "
                                             f"server busy, not a credentials failure)") from None
                raise MailboxAuthError(f"{refused}: {_text(exc)}") from None

    # ---- the cheap check, and selecting -------------------------------------------------

    def has_news(self, uidvalidity: int | None, last_uid: int) -> bool:
        """False when STATUS says nothing arrived above ``last_uid`` under ``uidvalidity``.

        On an already selected folder (an IDLE session) the search itself is the check.
        """
        if self._selected or uidvalidity is None:
            return True
        self._settle()
        client = self._require_client()
        with self._translate("status"):
            status = client.folder_status(self._mailbox.folder, [b"UIDNEXT", b"UIDVALIDITY"])
        if int(status[b"UIDVALIDITY"]) != uidvalidity:
            return True
        return int(status[b"UIDNEXT"]) > last_uid + 1

    def summary(self) -> str:
        """For ``mailroute mailbox test``: the folder's size and UIDVALIDITY, without SELECT."""
        self._settle()
        client = self._require_client()
        with self._translate("status"):
            status = client.folder_status(self._mailbox.folder,
                                          [b"MESSAGES", b"UIDNEXT", b"UIDVALIDITY"])
        return (f"folder {self._mailbox.folder}: {int(status[b'MESSAGES'])} message(s), "
                f"UIDVALIDITY {int(status[b'UIDVALIDITY'])}, UIDNEXT {int(status[b'UIDNEXT'])}")

    def select(self) -> int:
        self._settle()
        client = self._require_client()
        with self._translate("select"):
            status = client.select_folder(self._mailbox.folder)
        self._uidvalidity = int(status[b"UIDVALIDITY"])
        self._selected = True
        return self._uidvalidity

    def _ensure_selected(self) -> None:
        if not self._selected:
            self.select()

    # ---- push -----------------------------------------------------------------------------

    def idle_wait(self, timeout: float, stopped: Callable[[], bool] = lambda: False) -> bool:
        """Wait in IDLE up to ``timeout`` s; True as soon as the server reports new mail."""
        self._ensure_selected()
        self._drop_sent_ahead()
        client = self._require_client()
        deadline = time.monotonic() + timeout
        # imaplib files untagged responses that come with a command's answer away instead of
        # returning them; Dovecot reports mail that arrived just before IDLE along with its
        # continuation.  Drop what earlier commands left (the poll that just ran searched
        # after them), then look at what IDLE itself brought.
        pending = getattr(getattr(client, "_imap", None), "untagged_responses", {})
        for kind in ("EXISTS", "RECENT"):
            pending.pop(kind, None)
        # Dovecot does not always announce mail that arrived between the last command and
        # IDLE; a NOOP first syncs the session and reports it.
        with self._translate("noop"):
            _, responses = client.noop()
        if any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses) or any(
                pending.pop(kind, None) for kind in ("EXISTS", "RECENT")):
            return True
        with self._translate("idle"):
            client.idle()
            news = any(pending.pop(kind, None) for kind in ("EXISTS", "RECENT"))
            try:
                while not news and not stopped():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    for response in client.idle_check(timeout=min(left, 1.0)):
                        if len(response) > 1 and response[1] in (b"EXISTS", b"RECENT"):
                            news = True
                        if response and response[0] == b"BYE":
                            raise MailboxUnavailable(
                                f"mailbox {self._mailbox.name}: the server ended IDLE (BYE)")
            finally:
                client.idle_done()
        return news

    def close(self) -> None:
        client, self._client = self._client, None
        self._selected = False
        self._pending = self._prefetched = None  # LOGOUT reads past an unread FETCH answer
        if client is None:
            return
        try:
            client.logout()
        except Exception:  # the session may already be gone; nothing to do
            try:
                client.shutdown()
            except Exception:
                log.debug("mailbox %s: could not close the connection", self._mailbox.name)

    # ---- reading ----------------------------------------------------------------------

    def new_uids(self, after_uid: int) -> list[int]:
        """UIDs above ``after_uid``, ascending (the n:* answer filtered to UIDs > n-1)."""
        self._ensure_selected()
        self._drop_sent_ahead()
        client = self._require_client()
        with self._translate("search"):
            if after_uid == 0 and self._mailbox.since:
                found = client.search(["SINCE", date.fromisoformat(self._mailbox.since)])
            else:
                found = client.search(["UID", f"{after_uid + 1}:*"])
        return sorted({int(uid) for uid in found if int(uid) > after_uid})

    def batches(self, after_uid: int) -> Iterator[Batch]:
        self._ensure_selected()
        uids = self.new_uids(after_uid)
        chunks = byte_bounded(uids, self._size_bounds(uids), max(1, self._mailbox.batch_size),
                              self._mailbox.batch_bytes)
        for index, wanted in enumerate(chunks):
            messages = self._fetched(wanted)
            if index + 1 < len(chunks) and \
                    sum(len(m.raw) for m in messages) <= PREFETCH_BELOW_BYTES:
                # Ask for the next batch now: the server sends it while this one is published
                # and confirmed, instead of after.
                self._pending = (self._send_fetch(chunks[index + 1]), chunks[index + 1])
            if not messages:
                continue  # all expunged meanwhile
            yield Batch(messages=messages, uidvalidity=self._uidvalidity,
                        last_uid=max(int(m.uid) for m in messages))
            del messages  # not held while the next batch is fetched

    def _size_bounds(self, uids: list[int]) -> list[int]:
        """A bound on each message's size: its ``RFC822.SIZE`` if it is larger than a full
        batch's share of ``batch_bytes``, else that share.  One ``SEARCH LARGER`` tells which
        are (most polls find none); a single new message needs no bound."""
        box = self._mailbox
        share = max(1, box.batch_bytes // max(1, box.batch_size))
        if len(uids) <= 1:
            return [share] * len(uids)
        client = self._require_client()
        with self._translate("search"):
            found = client.search(["UID", f"{uids[0]}:{uids[-1]}", "LARGER", share])
        larger = sorted({int(uid) for uid in found} & set(uids))
        if not larger:
            return [share] * len(uids)
        sizes = self._sizes(larger)
        return [sizes.get(uid, share) for uid in uids]

    def _sizes(self, uids: list[int]) -> dict[int, int]:
        """``RFC822.SIZE`` of each of ``uids`` still in the folder."""
        client = self._require_client()
        sizes: dict[int, int] = {}
        with self._translate("fetch"):
            tag = client._imap._command("UID", "FETCH", uid_ranges(uids), "(RFC822.SIZE)")
            for _sequence, items in parse_fetch(self._fetch_responses(tag)):
                uid, size = items.get(b"UID"), items.get(b"RFC822.SIZE")
                if isinstance(uid, bytes) and uid.isdigit() and isinstance(size, bytes) \
                        and size.isdigit():
                    sizes[int(uid)] = int(size)
        return sizes

    def _fetch_responses(self, tag: Any) -> Any:
        """The untagged FETCH responses of the command ``tag``, once it completed."""
        imap = self._require_client()._imap
        typ, data = imap._command_complete("FETCH", tag)
        if typ != "OK":
            detail = data[0].decode(errors="replace") if data and isinstance(
                data[0], bytes) else str(data)
            raise IMAPClientError(f"fetch failed: {typ} {detail}")
        return imap._untagged_response(typ, data, "FETCH")[1]

    def _send_fetch(self, uids: list[int]) -> Any:
        """Send ``UID FETCH`` for ``uids``; gives its tag, for :meth:`_read_fetch`."""
        client = self._require_client()
        with self._translate("fetch"):
            return client._imap._command("UID", "FETCH", join_message_ids(uids), FETCH_ITEMS)

    def _settle(self) -> None:
        """Read the answer to a FETCH sent ahead, before any other command: imaplib would
        otherwise hand its untagged responses to that command."""
        if self._pending is not None:
            tag, uids = self._pending
            self._pending = None
            self._prefetched = (uids, self._read_fetch(tag, uids))

    def _drop_sent_ahead(self) -> None:
        """Read a FETCH sent ahead and forget it: what follows asks the folder afresh."""
        self._settle()
        self._prefetched = None

    def _fetched(self, uids: list[int]) -> list[FetchedMessage]:
        self._settle()
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == uids:
            return prefetched[1]
        return self._read_fetch(self._send_fetch(uids), uids)

    def _read_fetch(self, tag: Any, uids: list[int]) -> list[FetchedMessage]:
        wanted = set(uids)
        found: dict[int, FetchedMessage] = {}
        dates: dict[Any, datetime] = {}  # messages delivered together share an INTERNALDATE
        with self._translate("fetch"):
            # imapclient's fetch() issues the same command; its general response parser cost
            # more CPU than the rest of ingest together, so the responses are read here.
            for _sequence, items in parse_fetch(self._fetch_responses(tag)):
                body = items.get(b"BODY[]")
                if not isinstance(body, bytes):
                    continue  # an unsolicited FETCH (flags), or no body
                # Each body is paired with the UID of its own response, never by position.
                uid = items.get(b"UID")
                if not isinstance(uid, bytes) or not uid.isdigit():
                    raise IMAPClientError(f"fetch: a body came without its UID ({uid!r})")
                if int(uid) in wanted:
                    internaldate = items.get(b"INTERNALDATE")
                    if internaldate not in dates:
                        dates[internaldate] = _internaldate(internaldate)
                    found[int(uid)] = FetchedMessage(uid=str(int(uid)), raw=body,
                                                     received_at=dates[internaldate])
        return [found[uid] for uid in sorted(found)]

    # ---- after-processing ---------------------------------------------------------------

    def after_confirm(self, batch: Batch) -> None:
        """Apply the mailbox's action to the batch's messages (call only once confirmed)."""
        uids = [int(m.uid) for m in batch.messages]
        action = self._mailbox.after
        if not uids or action == "keep":
            return
        self._settle()
        client = self._require_client()
        with self._translate(f"after-processing ({action})"):
            if action == "seen":
                client.add_flags(uids, [SEEN], silent=True)
            elif action == "delete":
                client.add_flags(uids, [DELETED], silent=True)
                self._expunge(uids)
            elif action == "move":
                self._move(uids, self._mailbox.move_to or "")

    def _move(self, uids: list[int], folder: str) -> None:
        client = self._require_client()
        try:
            self._move_once(uids, folder)
        except IMAPClientError as exc:
            if "TRYCREATE" not in _text(exc).upper():
                raise
            log.info("mailbox %s: creating folder %r to move messages to",
                     self._mailbox.name, folder)
            client.create_folder(folder)
            self._move_once(uids, folder)

    def _move_once(self, uids: list[int], folder: str) -> None:
        client = self._require_client()
        if client.has_capability("MOVE"):
            client.move(uids, folder)
            return
        client.copy(uids, folder)
        client.add_flags(uids, [DELETED], silent=True)
        self._expunge(uids)

    def _expunge(self, uids: list[int]) -> None:
        client = self._require_client()
        if client.has_capability("UIDPLUS"):
            client.uid_expunge(uids)
        else:
            # Without UID EXPUNGE this also removes other messages already marked \Deleted.
            client.expunge()

    # ---- helpers ------------------------------------------------------------------------

    def _require_client(self) -> IMAPClient:
        if self._client is None:
            raise MailboxUnavailable(f"mailbox {self._mailbox.name}: not connected")
        return self._client

    @contextmanager
    def _translate(self, step: str) -> Iterator[None]:
        try:
            yield
        except LoginError as exc:
            if refused_by_server(exc):
                raise MailboxAuthError(f"mailbox {self._mailbox.name}: {step}: {_text(exc)}") \
                    from None
            raise MailboxUnavailable(f"mailbox {self._mailbox.name}: {step} on "
                                     f"{self._profile.host}:{self._profile.port} failed: "
                                     f"{_text(exc)}") from None
        except (IMAPClientError, OSError) as exc:  # ssl.SSLError and timeouts are OSErrors
            kind = "IMAP error" if isinstance(exc, IMAPClientError) else type(exc).__name__
            raise MailboxUnavailable(
                f"mailbox {self._mailbox.name}: {step} on {self._profile.host}:"
                f"{self._profile.port} failed: {kind}: {_text(exc)}") from exc


def uid_ranges(uids: list[int]) -> str:
    """An IMAP sequence set of ascending ``uids``, runs written as ranges: ``1:3,7,9:10``."""
    parts: list[str] = []
    start = previous = uids[0]
    for uid in [*uids[1:], None]:
        if uid is not None and uid == previous + 1:
            previous = uid
            continue
        parts.append(str(start) if start == previous else f"{start}:{previous}")
        if uid is not None:
            start = previous = uid
    return ",".join(parts)


def quiet_imaplib(client: IMAPClient) -> None:
    """Stop imaplib formatting a debug trace of every response when nobody will log it.

    imapclient sets imaplib's debug level to 5 on every connection, so imaplib builds
    ``repr`` strings of each message body, and of the whole list of a FETCH's responses, for
    the ``imapclient.imaplib`` logger, even when that logger drops them: about a third of
    the ingest poller's CPU time.  With that logger at DEBUG the trace is kept.
    """
    imap = getattr(client, "_imap", None)
    if imap is not None and not logging.getLogger("imapclient.imaplib").isEnabledFor(
            logging.DEBUG):
        imap.debug = 0


# RFC 5530 codes that say "try later", not "wrong credentials".
_TRANSIENT_LOGIN_CODES = ("[UNAVAILABLE]", "[SERVERBUG]", "[LIMIT]", "[INUSE]")


def refused_by_server(exc: LoginError) -> bool:
    """True when the server answered the login with NO; False for a dropped connection.

    imapclient turns every error during LOGIN/AUTHENTICATE into ``LoginError``, including the
    ``abort`` imaplib raises when the server restarts mid-command ("socket error: EOF"): treating
    that as refused credentials would disable a healthy mailbox.
    """
    cause: BaseException | None = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, (imaplib.IMAP4.abort, OSError)):
            return False
        cause = cause.__cause__ or cause.__context__
    text = str(exc).upper()
    return "SOCKET ERROR" not in text and not any(code in text for code in _TRANSIENT_LOGIN_CODES)


def _text(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith(("b'", 'b"')):  # imapclient passes the server's bytes through str()
        text = text[2:-1]
    return one_line(text)


def _internaldate(value: Any) -> datetime:
    if isinstance(value, bytes):
        try:
            return _aware(parse_to_datetime(value, normalise=False))
        except ValueError:
            pass
    return datetime.now(UTC)


def _aware(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return datetime.now(UTC)
