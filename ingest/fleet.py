"""One ingest process's share of the mailbox fleet: claim leases, poll, push, report health.

Takes the :class:`~shared.settings.Settings`, a publisher factory (one publisher per thread),
the mailbox state store, the :class:`~persist.mailbox_leases.LeaseStore` and the process's
:class:`~shared.metrics.Metrics`; gives :class:`FleetPoller`, whose :meth:`run` loops until
``stop``: renew the leases it holds (every third of ``fleet.lease_seconds``), claim due and
free mailboxes up to ``fleet.concurrency`` polls at a time, poll each on a thread and give it
back with its next due time.  A mailbox marked ``push`` gets a long-lived IMAP IDLE session
instead (re-issued within ``idle_refresh``, and polled every interval while idle so a silently
dropped IDLE only delays, never loses); the lease is held for as long as the session lives.

Health: a passing failure (network, timeout, server trouble) backs the mailbox off with
jitter - interval * 2^(failures-1), capped by ``fleet.max_backoff`` - and never disables it;
a refused login (or too many UIDVALIDITY resets) disables it with an alert (an ERROR log line
starting ``ALERT`` and ``mailroute_mailbox_alerts_total``) until ``mailroute mailbox enable``.
A process that dies simply stops renewing: its leases run out and the others take over.
Several mailboxes of one account (folders) share the server profile's ``max_connections``:
a mailbox whose account is at its cap goes back unpolled, due again a second later, never
failed (the server's own cap, NO [LIMIT] at login, is a passing failure with back-off).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta

from ingest.credentials import Credentials
from ingest.errors import MailboxAuthError, MailboxDisabled
from ingest.imap_source import ImapSource
from ingest.worker import IngestWorker, Publisher, StateStore, _describe
from persist.mailbox_leases import LeaseStore
from shared.metrics import Metrics
from shared.settings import MailboxSettings, Settings

log = logging.getLogger(__name__)

STATUSES = ("not-run", "success", "failing", "disabled")
JITTER = 0.2
# A dropped IDLE session that had worked is reconnected at once, at most this often.
RECONNECT_AT_MOST_EVERY_S = 60.0
# A mailbox whose account is at its connection cap is due again this much later.
DEFER_S = 1.0


def new_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class FleetPoller:
    """Polls the mailboxes this process holds leases on; several processes share the fleet."""

    def __init__(self, settings: Settings, publisher_factory: Callable[[], Publisher],
                 state: StateStore, leases: LeaseStore, metrics: Metrics,
                 owner: str | None = None, rng: random.Random | None = None) -> None:
        self._settings = settings
        self._publisher_factory = publisher_factory
        self._state = state
        self._leases = leases
        self._metrics = metrics
        self.owner = owner or new_owner_id()
        self._rng = rng or random.Random()
        self._credentials = Credentials()
        self._local = threading.local()
        self._boxes = {b.name: b for b in settings.mailboxes if b.enabled}
        self._names = sorted(self._boxes)
        self._lock = threading.Lock()
        self._polling: dict[str, Future[None]] = {}
        self._pushing: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._reconnected: dict[str, float] = {}
        self._wake = threading.Event()
        self._connections: dict[tuple[str, str], int] = {}  # per account, under _lock
        self._deferred_since: dict[str, float] = {}
        self.polls_done = 0

    # ---- the loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        fleet = self._settings.fleet
        names = sorted(self._boxes)
        if not names:
            log.warning("no mailboxes configured; ingest has nothing to do")
        self._leases.ensure(names)
        for box in self._settings.mailboxes:
            if not box.enabled:
                self._leases.disable(box.name, "enabled: false in the configuration")
        renew_every = max(fleet.lease_seconds / 3.0, 0.05)
        tick = min(1.0, renew_every / 2)
        next_renew = 0.0
        pool = ThreadPoolExecutor(max_workers=max(1, fleet.concurrency),
                                  thread_name_prefix="ingest-poll")
        clock = time.monotonic
        log.info("ingest poller %s sharing %d mailbox(es), lease %.0f s, %d at a time",
                 self.owner, len(names), fleet.lease_seconds, fleet.concurrency)
        try:
            while not stop.is_set():
                try:
                    if clock() >= next_renew:
                        self._renew()
                        next_renew = clock() + renew_every
                    self._claim_and_start(pool, stop)
                except Exception as exc:  # the database may be away for a while
                    log.error("ingest poller %s: %s; trying again", self.owner, _describe(exc))
                    stop.wait(min(5.0, renew_every))
                    continue
                # A finished poll frees a slot: claim the next mailbox at once, not at the tick.
                self._wake.wait(tick)
                self._wake.clear()
        finally:
            stop.set()
            pool.shutdown(wait=True)
            for thread, _box_stop in list(self._pushing.values()):
                thread.join(timeout=30)
            try:
                self._leases.release_all(self.owner)
            except Exception as exc:
                log.warning("ingest poller %s: leases not released (%s); they expire in %.0f s",
                            self.owner, _describe(exc), fleet.lease_seconds)

    def _renew(self) -> None:
        with self._lock:
            held = set(self._polling) | set(self._pushing)
        kept = self._leases.renew(self.owner, sorted(held), self._settings.fleet.lease_seconds)
        for name in held - kept:
            log.warning("mailbox %s: lease lost (this process was too slow to renew it); "
                        "another poller takes it over", name)
            with self._lock:
                pushing = self._pushing.get(name)
            if pushing is not None:
                pushing[1].set()
        self._metrics.leases_held.set(len(kept))

    def _claim_and_start(self, pool: ThreadPoolExecutor, stop: threading.Event) -> None:
        fleet = self._settings.fleet
        with self._lock:
            for name in [n for n, f in self._polling.items() if f.done()]:
                del self._polling[name]
            for name in [n for n, (t, _) in self._pushing.items() if not t.is_alive()]:
                del self._pushing[name]
            free = fleet.concurrency - len(self._polling)
            push_free = fleet.max_push - len(self._pushing)
        if free <= 0:
            return
        claimed = self._leases.claim(self.owner, self._names, fleet.lease_seconds, free)
        if claimed:
            log.debug("ingest poller %s claimed %d mailbox(es)", self.owner, len(claimed))
        # The forward mailbox (all forwarded users' mail) gets the IDLE slots first.
        # Then the mailboxes put off longest ago, so a busy account's folders take turns.
        claimed.sort(key=lambda n: (not (self._boxes[n].push and self._boxes[n].forward),
                                    self._deferred_since.get(n, float("inf"))))
        for name in claimed:
            box = self._boxes[name]
            if not self._take_connection(box):
                self._defer(box)
                continue
            if box.push and push_free > 0:
                push_free -= 1
                self._start_push(box, stop)
                continue
            with self._lock:
                self._polling[name] = pool.submit(self._poll_job, box, stop)

    # ---- the per-account connection cap -----------------------------------------------

    def _account(self, box: MailboxSettings) -> tuple[str, str] | None:
        if box.kind == "maildir" or not box.server:
            return None
        return box.server, (box.username or box.name).lower()

    def _take_connection(self, box: MailboxSettings) -> bool:
        account = self._account(box)
        if account is None:
            return True
        cap = self._settings.server(account[0]).max_connections
        with self._lock:
            if self._connections.get(account, 0) >= cap:
                self._deferred_since.setdefault(box.name, time.monotonic())
                return False
            self._connections[account] = self._connections.get(account, 0) + 1
            self._deferred_since.pop(box.name, None)
        return True

    def _give_back_connection(self, box: MailboxSettings) -> None:
        account = self._account(box)
        if account is not None:
            with self._lock:
                self._connections[account] -= 1

    def _defer(self, box: MailboxSettings) -> None:
        log.debug("mailbox %s: its account has max_connections open; deferred", box.name)
        self._metrics.mailbox_deferred.labels(mailbox=box.name).inc()
        try:
            self._leases.release(self.owner, box.name,
                                 self._leases.now() + timedelta(seconds=DEFER_S))
        except Exception as exc:
            log.error("mailbox %s: lease not released (%s); it expires by itself",
                      box.name, _describe(exc))

    # ---- one poll -----------------------------------------------------------------------

    def _worker(self) -> IngestWorker:
        worker: IngestWorker | None = getattr(self._local, "worker", None)
        if worker is None:
            worker = IngestWorker(self._settings, self._publisher_factory(), self._state,
                                  self._metrics, credentials=self._credentials,
                                  resets=self._leases)
            self._local.worker = worker
        return worker

    def _poll_job(self, box: MailboxSettings, stop: threading.Event) -> None:
        next_due = None
        try:
            self._worker().poll_once(box, stop, still_mine=lambda: self._still_mine(box))
            next_due = self._after_success(box)
        except Exception as exc:
            next_due = self._after_failure(box, exc)
        finally:
            self._give_back_connection(box)
            self.polls_done += 1
            if next_due is not None:
                try:
                    if not self._leases.release(self.owner, box.name, next_due):
                        log.warning("mailbox %s: lease was taken over during the poll", box.name)
                except Exception as exc:
                    log.error("mailbox %s: lease not released (%s); it expires by itself",
                              box.name, _describe(exc))
            self._wake.set()

    def _still_mine(self, box: MailboxSettings) -> bool:
        return self._leases.holds(self.owner, box.name)

    def _after_success(self, box: MailboxSettings) -> datetime:
        self._set_status(box, "success")
        return self._leases.now() + timedelta(seconds=self._settings.interval_of(box))

    def _after_failure(self, box: MailboxSettings, exc: Exception) -> datetime | None:
        """Disable on a permanent failure (None: no next due); else the backed-off due time."""
        if isinstance(exc, MailboxAuthError | MailboxDisabled):
            self.disable(box, _describe(exc),
                         "auth" if isinstance(exc, MailboxAuthError) else "disabled")
            return None
        failures = self._failures(box)
        self._set_status(box, "failing")
        delay = self.backoff(self._settings.interval_of(box), failures)
        log.warning("mailbox %s: failing (%d in a row), next try in %.0f s", box.name,
                    failures, delay)
        return self._leases.now() + timedelta(seconds=delay)

    def backoff(self, interval: float, failures: int) -> float:
        base = min(interval * 2 ** max(failures - 1, 0), self._settings.fleet.max_backoff)
        return max(base * (1 + self._rng.uniform(-JITTER, JITTER)), 0.0)

    def _failures(self, box: MailboxSettings) -> int:
        state_of = getattr(self._state, "state_of", None)
        state = state_of(box.name, box.folder) if state_of is not None else None
        return int(state.consecutive_failures) if state is not None else 1

    def disable(self, box: MailboxSettings, reason: str, kind: str) -> None:
        log.error("ALERT mailbox %s disabled: %s. Fix it, then `mailroute mailbox enable %s`",
                  box.name, reason, box.name)
        self._metrics.mailbox_alerts.labels(mailbox=box.name, kind=kind).inc()
        self._leases.disable(box.name, reason)
        disable_state = getattr(self._state, "mark_disabled", None)
        if disable_state is not None:
            disable_state(box.name, box.folder, reason)
        self._set_status(box, "disabled")

    def _set_status(self, box: MailboxSettings, status: str) -> None:
        for name in STATUSES:
            self._metrics.mailbox_status.labels(mailbox=box.name, status=name).set(
                1 if name == status else 0)

    # ---- push (IMAP IDLE) -------------------------------------------------------------

    def _start_push(self, box: MailboxSettings, stop: threading.Event) -> None:
        box_stop = threading.Event()
        thread = threading.Thread(target=self._push_job, args=(box, stop, box_stop),
                                  name=f"ingest-idle-{box.name}", daemon=True)
        with self._lock:
            self._pushing[box.name] = (thread, box_stop)
        self._metrics.push_sessions.set(len(self._pushing))
        thread.start()

    def _push_job(self, box: MailboxSettings, stop: threading.Event,
                  box_stop: threading.Event) -> None:
        worker = IngestWorker(self._settings, self._publisher_factory(), self._state,
                              self._metrics, credentials=self._credentials, resets=self._leases)
        profile = self._settings.server(box.server or "")
        wait = min(profile.idle_refresh, self._settings.interval_of(box))

        def ended() -> bool:
            return stop.is_set() or box_stop.is_set()

        next_due = None
        opened_at: float | None = None
        try:
            with ImapSource(box, profile, credentials=self._credentials) as source:
                log.info("mailbox %s: push (IDLE) session open", box.name)
                while not ended():
                    count = worker.poll_source(box, source, stop,
                                               still_mine=lambda: self._still_mine(box))
                    worker.record_success(box, count)
                    self._set_status(box, "success")
                    opened_at = opened_at or time.monotonic()
                    if count:
                        # The FETCH/STORE after the search may have carried the EXISTS of mail
                        # that arrived meanwhile; IDLE would not announce it again.  Search
                        # until a poll finds nothing, then idle.
                        continue
                    # New mail ends the wait at once; else IDLE is re-issued after ``wait``
                    # and the folder is searched anyway (a dropped IDLE delays, never loses).
                    source.idle_wait(wait, ended)
            next_due = self._leases.now()
        except Exception as exc:
            last = self._reconnected.get(box.name, -RECONNECT_AT_MOST_EVERY_S)
            if opened_at is not None and time.monotonic() - last > RECONNECT_AT_MOST_EVERY_S \
                    and not isinstance(exc, MailboxAuthError | MailboxDisabled):
                # A session that worked and was then dropped (server restart, idle timeout,
                # kick) is no mailbox failure: reconnect at once (at most once a minute);
                # a reconnect that fails counts as one and backs off.
                self._reconnected[box.name] = time.monotonic()
                log.warning("mailbox %s: IDLE session ended (%s); reconnecting", box.name,
                            _describe(exc))
                next_due = self._leases.now()
            else:
                worker.record_failure(box, exc)
                next_due = self._after_failure(box, exc)
        finally:
            self._give_back_connection(box)
            self._metrics.push_sessions.set(max(len(self._pushing) - 1, 0))
            if next_due is not None:
                try:
                    self._leases.release(self.owner, box.name, next_due)
                except Exception as exc:
                    log.error("mailbox %s: lease not released (%s)", box.name, _describe(exc))
