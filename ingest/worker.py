"""The ingest worker: polls every configured mailbox and hands new mail to the broker.

Takes the :class:`~shared.settings.Settings`, a publisher (``send_outputs(outputs)``, and
``wait(sent)`` that returns only once the broker confirmed every output, else raises
``TransientError``), the mailbox state store (cursors and poll outcomes,
``persist.mailbox_state``) and the process's :class:`~shared.metrics.Metrics`; gives
:class:`IngestWorker`.  For each batch of new messages the order of effects is fixed: publish
``raw`` documents and wait for the confirms, then save the cursor, then apply the mailbox's
after-processing action; the next batch is published while the broker confirms the last one.
A crash in between can only make a message be fetched again (persistence removes the
duplicate); nothing is flagged, moved or deleted before it is confirmed.

Fails per mailbox: :meth:`IngestWorker.poll_once` records the failed poll and re-raises
(``MailboxAuthError``, ``MailboxUnavailable``, ``TransientError`` ...); :meth:`run` logs it
and carries on with the other mailboxes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from ingest.credentials import Credentials
from ingest.errors import MailboxDisabled, MailboxError, MailboxUnavailable
from ingest.imap_source import ImapSource
from ingest.maildir_source import MaildirSource
from ingest.pop3_source import Pop3Source
from ingest.source import Batch, MailSource
from shared.logs import one_line
from shared.metrics import Metrics
from shared.settings import MailboxSettings, Settings
from shared.stage import Output

log = logging.getLogger(__name__)


class Publisher(Protocol):
    def send_outputs(self, outputs: Sequence[Output]) -> Any: ...

    def wait(self, sent: Any) -> None: ...


class CursorLike(Protocol):
    @property
    def uidvalidity(self) -> int | None: ...

    @property
    def last_uid(self) -> int: ...


class StateStore(Protocol):
    def cursor(self, mailbox: str, folder: str) -> CursorLike | None: ...

    def save_cursor(self, mailbox: str, folder: str, uidvalidity: int | None,
                    last_uid: int) -> Any: ...

    def record_poll(self, mailbox: str, folder: str, ok: bool, error: str | None = None,
                    fetched: int = 0, at: datetime | None = None) -> Any: ...

    def seen_uidls(self, mailbox: str) -> set[str]: ...

    def remember_uidls(self, mailbox: str, uidls: list[str]) -> None: ...

    def forget_uidls(self, mailbox: str, gone: list[str]) -> None: ...


class ResetCounter(Protocol):
    def count_validity_reset(self, mailbox: str) -> int: ...


SourceFactory = Callable[[MailboxSettings], MailSource]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class IngestWorker:
    """Polls mailboxes; one instance per ingest process (or thread)."""

    name = "ingest"

    def __init__(self, settings: Settings, publisher: Publisher, state_store: StateStore,
                 metrics: Metrics, clock: Callable[[], datetime] = _utc_now,
                 source_factory: SourceFactory | None = None,
                 credentials: Credentials | None = None,
                 resets: ResetCounter | None = None) -> None:
        self._settings = settings
        self._publisher = publisher
        self._state = state_store
        self._metrics = metrics
        self._clock = clock
        self._source_factory = source_factory or self.default_source
        self._credentials = credentials or Credentials()
        self._resets = resets

    def default_source(self, box: MailboxSettings) -> MailSource:
        if box.kind == "maildir":
            return MaildirSource(box)
        profile = self._settings.server(box.server or "")
        if box.kind == "pop3":
            return Pop3Source(box, profile, self._state.seen_uidls(box.name), self._credentials)
        return ImapSource(box, profile, credentials=self._credentials)

    # ---- one poll ---------------------------------------------------------------------

    def poll_once(self, box: MailboxSettings, stop: threading.Event | None = None,
                  still_mine: Callable[[], bool] | None = None) -> int:
        """Fetch, publish and confirm every new message of ``box``; returns how many.

        With ``stop`` set, it ends after the batch in hand is finished (confirmed, cursor
        saved, acted on); the rest waits for the next poll.  ``still_mine`` is asked before
        each batch is published: a poller whose lease was taken over stops there.
        """
        confirmed = [0]
        try:
            with self._source_factory(box) as source:
                self.poll_source(box, source, stop, still_mine, confirmed)
        except Exception as exc:
            self._record_failure(box, exc, confirmed[0])
            raise
        self.record_success(box, confirmed[0])
        return confirmed[0]

    def poll_source(self, box: MailboxSettings, source: MailSource,
                    stop: threading.Event | None = None,
                    still_mine: Callable[[], bool] | None = None,
                    confirmed: list[int] | None = None) -> int:
        """One poll over an open source (also an IDLE session's); records nothing.

        Each batch is sent before the previous one is finished (confirmed, cursor saved,
        acted on), so the broker stores one batch while the next is read and encoded; a batch
        of ``batch_bytes`` or more is finished before the next is fetched."""
        counter = confirmed if confirmed is not None else [0]
        cursor = self._state.cursor(box.name, box.folder)
        if cursor is not None and not source.has_news(cursor.uidvalidity, cursor.last_uid):
            return 0
        after_uid = self._resume_point(box, source.uidvalidity, cursor)
        in_flight: tuple[Batch, Any] | None = None
        try:
            for batch in source.batches(after_uid):
                if still_mine is not None and not still_mine():
                    raise MailboxUnavailable(f"mailbox {box.name}: lease taken over by another "
                                             "poller; stopping before publishing")
                sent = self._publisher.send_outputs(self._outputs(box, batch))
                if in_flight is not None:
                    self._finish(box, source, *in_flight, counter)
                in_flight = (batch, sent)
                if sum(len(m.raw) for m in batch.messages) >= box.batch_bytes:
                    # Finished before the next is fetched, and let go: a backlog of large
                    # messages is in memory one batch at a time.  (If finishing fails, that
                    # failure is raised, not retried by the handler below.)
                    in_flight = None
                    self._finish(box, source, batch, sent, counter)
                    del batch, sent
                if stop is not None and stop.is_set():
                    break
        except BaseException:
            # What was sent before the failure is finished if its confirms come, so that the
            # next poll does not fetch it again; the failure itself is what is raised.
            if in_flight is not None:
                with contextlib.suppress(Exception):
                    self._finish(box, source, *in_flight, counter)
            raise
        if in_flight is not None:
            self._finish(box, source, *in_flight, counter)
        if isinstance(source, Pop3Source):
            listed = set(source.listed)
            self._state.forget_uidls(box.name, sorted(self._state.seen_uidls(box.name)
                                                      - listed))
        return counter[0]

    def _finish(self, box: MailboxSettings, source: MailSource, batch: Batch, sent: Any,
                counter: list[int]) -> None:
        """Wait for the batch's confirms, then save the cursor, then act on the messages."""
        self._publisher.wait(sent)
        if batch.uidvalidity is not None and batch.last_uid is not None:
            self._state.save_cursor(box.name, box.folder, batch.uidvalidity, batch.last_uid)
        if isinstance(source, Pop3Source):
            self._state.remember_uidls(box.name, [m.uid for m in batch.messages])
        counter[0] += len(batch.messages)
        self._metrics.mailbox_fetched.labels(mailbox=box.name).inc(len(batch.messages))
        source.after_confirm(batch)

    def record_success(self, box: MailboxSettings, confirmed: int) -> None:
        now = self._clock()
        self._state.record_poll(box.name, box.folder, ok=True, fetched=confirmed, at=now)
        self._metrics.mailbox_polls.labels(mailbox=box.name, outcome="success").inc()
        self._metrics.mailbox_last_success.labels(mailbox=box.name).set(now.timestamp())
        if confirmed:
            log.info("mailbox %s: %d new message(s) published", box.name, confirmed)

    def _resume_point(self, box: MailboxSettings, uidvalidity: int | None,
                      cursor: CursorLike | None) -> int:
        if uidvalidity is None:
            return 0  # a Maildir or POP3: no UID cursor
        if cursor is None:
            return 0
        if cursor.uidvalidity != uidvalidity:
            # Every UID the cursor knew is meaningless now; start over.  Persisting the reset
            # at once keeps the next poll from resetting again if this one fails.
            resets = self._resets.count_validity_reset(box.name) if self._resets else 1
            self._metrics.mailbox_alerts.labels(mailbox=box.name, kind="uidvalidity").inc()
            cap = self._settings.fleet.max_uidvalidity_resets
            if resets > cap:
                raise MailboxDisabled(
                    f"mailbox {box.name}: UIDVALIDITY changed {resets} times within a day "
                    f"(cap {cap}); not read again until `mailroute mailbox enable {box.name}`")
            log.error("ALERT mailbox %s folder %s: UIDVALIDITY changed from %s to %s; "
                      "cursor reset, the folder is read again from %s (reset %d of at most "
                      "%d a day; records are deduplicated downstream)",
                      box.name, box.folder, cursor.uidvalidity, uidvalidity,
                      box.since or "the start", resets, cap)
            self._state.save_cursor(box.name, box.folder, uidvalidity, 0)
            return 0
        return cursor.last_uid

    def _outputs(self, box: MailboxSettings, batch: Batch) -> list[Output]:
        fetched_at = self._clock()
        kind = "forward" if box.forward else "direct"
        return [
            Output("raw", {
                "trace_id": uuid.uuid4().hex,
                "source": {
                    "mailbox": box.name,
                    "mailbox_kind": kind,
                    "folder": box.folder,
                    "uidvalidity": batch.uidvalidity,
                    "uid": message.uid,
                    "received_at": message.received_at,
                    "fetched_at": fetched_at,
                },
                "raw": message.raw,
            })
            for message in batch.messages
        ]

    def record_failure(self, box: MailboxSettings, exc: Exception, confirmed: int = 0) -> None:
        self._record_failure(box, exc, confirmed)

    def _record_failure(self, box: MailboxSettings, exc: Exception, confirmed: int) -> None:
        error = _describe(exc)
        log.error("mailbox %s folder %s: poll failed: %s", box.name, box.folder, error)
        self._metrics.mailbox_polls.labels(mailbox=box.name, outcome="failure").inc()
        try:
            self._state.record_poll(box.name, box.folder, ok=False, error=error,
                                    fetched=confirmed, at=self._clock())
        except Exception as state_exc:  # the original failure matters more
            log.error("mailbox %s: could not record the failed poll: %s", box.name,
                      _describe(state_exc))

    # ---- the loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll every mailbox on its interval until ``stop`` is set."""
        boxes = list(self._settings.mailboxes)
        if not boxes:
            log.warning("no mailboxes configured; ingest has nothing to do")
        due = {box.name: time.monotonic() for box in boxes}
        while not stop.is_set():
            for box in boxes:
                if stop.is_set():
                    return
                if time.monotonic() < due[box.name]:
                    continue
                # A failure is logged and recorded by poll_once; the other mailboxes go on.
                with contextlib.suppress(Exception):
                    self.poll_once(box, stop)
                due[box.name] = time.monotonic() + self._settings.interval_of(box)
            pause = min(due.values(), default=time.monotonic() + 60.0) - time.monotonic()
            stop.wait(max(pause, 0.0) if boxes else 60.0)


def _describe(exc: BaseException) -> str:
    """One line for logs and the state table: the type and message, CR/LF escaped."""
    text = str(exc) if isinstance(exc, MailboxError) else f"{type(exc).__name__}: {exc}"
    return one_line(text)[:500]
