"""Canary bookkeeping: which test messages were sent to whom, which arrived, which are late.

Takes the forwarding users and queues (:class:`CanaryTarget`), canary ids and a clock; gives
:class:`CanaryStore`.  :meth:`CanaryStore.start_round` claims the principals whose canary is
due and records a ``sending`` row for each in the same transaction (``UPDATE ... WHERE due_at
<= now RETURNING``: of several ingest processes only one gets each principal; on SQLite under
the write lock of ``BEGIN IMMEDIATE``), so a canary is known before it leaves and an early
arrival finds it.  :meth:`mark_seen` is persist's side: it refuses, with a
``PermanentError`` the runtime dead-letters, a canary id it does not know
(``unknown-canary``) or one that arrived through another principal's rule
(``canary-principal-mismatch``).  :meth:`expire` turns canaries past their deadline into
``missing`` (and ones never handed over into ``failed``), each exactly once, for the alert.
Canaries never touch the email tables.  Fails with ``TransientError`` when the database is
unreachable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from persist.database import translate_errors
from persist.tables import build_tables
from shared.errors import PermanentError

PrincipalKey = tuple[str, str]  # (principal_kind, principal)
NOT_HANDED_OVER = "never handed over (the sending process stopped before it could)"


@dataclass(frozen=True)
class CanaryTarget:
    """A user or queue whose mail comes through a forward mailbox: who gets canaries."""

    principal_kind: str
    principal: str
    address: str
    forward_mailbox: str

    @property
    def key(self) -> PrincipalKey:
        return (self.principal_kind, self.principal)


@dataclass(frozen=True)
class Canary:
    id: str
    principal_kind: str
    principal: str
    address: str
    forward_mailbox: str
    sent_at: datetime
    deadline_at: datetime
    seen_at: datetime | None
    outcome: str
    detail: str | None

    @property
    def key(self) -> PrincipalKey:
        return (self.principal_kind, self.principal)

    @property
    def roundtrip(self) -> float | None:
        """Seconds from sending to being seen in the forward mailbox, once seen."""
        if self.seen_at is None:
            return None
        return max(0.0, (self.seen_at - self.sent_at).total_seconds())


@dataclass(frozen=True)
class Seen:
    """What :meth:`CanaryStore.mark_seen` found: the canary, and whether this was news."""

    canary: Canary
    first: bool  # False for a redelivered or duplicated canary already marked
    late: bool   # it had already been given up as missing


@dataclass(frozen=True)
class PrincipalCanaries:
    """One principal's canary state: its newest canary, newest seen one and the verdict."""

    latest: Canary | None       # the newest canary of any outcome
    last_seen: Canary | None    # the newest canary that arrived
    verdict: Canary | None      # the newest canary with an outcome (seen, missing, failed)

    @property
    def state(self) -> str:
        """ok, missing, failed, or waiting (no canary has an outcome yet)."""
        if self.verdict is None:
            return "waiting"
        return {"seen": "ok"}.get(self.verdict.outcome, self.verdict.outcome)


class CanaryStore:
    """Reads and writes ``canaries`` and ``canary_schedule``; each call one transaction."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        tables = build_tables()
        self._canaries = tables.canaries
        self._schedule = tables.canary_schedule
        self._clock = clock or (lambda: datetime.now(UTC))

    def now(self) -> datetime:
        return self._clock()

    # ---- sending (ingest) ---------------------------------------------------------------

    def schedule(self, targets: Sequence[CanaryTarget]) -> None:
        """Give every target a schedule row, due at once; existing rows are left alone."""
        if not targets:
            return
        now = self._clock()
        with translate_errors(), self._engine.begin() as connection:
            self._schedule_rows(connection, targets, now)

    def _schedule_rows(self, connection: Connection, targets: Sequence[CanaryTarget],
                       now: datetime) -> None:
        keys = sorted({t.key for t in targets})
        for start in range(0, len(keys), 500):
            connection.execute(_insert(connection, self._schedule).values([
                {"principal_kind": kind, "principal": name, "due_at": now}
                for kind, name in keys[start:start + 500]]).on_conflict_do_nothing())

    def start_round(self, targets: Sequence[CanaryTarget], interval: float, deadline: float,
                    new_id: Callable[[], str], force: bool = False) -> list[Canary]:
        """Claim the due ``targets`` (all of them with ``force``) and record a canary for each.

        Only targets with a schedule row (:meth:`schedule`; ``force`` makes them) can be
        claimed.  A claimed principal is next due ``interval`` seconds from now (one due more
        than twice that away, from a longer interval before, counts as due); a process
        that loses the race for a principal simply does not get it.  Gives the canaries
        recorded, outcome ``sending``: send each, then :meth:`mark_sent` or
        :meth:`mark_failed`.
        """
        if not targets:
            return []
        by_key = {t.key: t for t in targets}
        s = self._schedule
        now = self._clock()
        next_due = now + timedelta(seconds=interval)
        with translate_errors(), self._engine.begin() as connection:
            if force:
                self._schedule_rows(connection, targets, now)
            claim = update(s).where(tuple_(s.c.principal_kind, s.c.principal).in_(
                sorted(by_key))).values(due_at=next_due)
            if not force:
                # due, or due more than two intervals away (a longer interval before); the
                # margin keeps two processes with slightly different clocks from both sending
                claim = claim.where(or_(s.c.due_at <= now,
                                        s.c.due_at > now + timedelta(seconds=2 * interval)))
            claimed = sorted((kind, name) for kind, name in connection.execute(
                claim.returning(s.c.principal_kind, s.c.principal)).all())
            rows = [{
                "id": new_id(), "principal_kind": kind, "principal": name,
                "address": by_key[(kind, name)].address,
                "forward_mailbox": by_key[(kind, name)].forward_mailbox,
                "sent_at": now, "deadline_at": now + timedelta(seconds=deadline),
                "seen_at": None, "outcome": "sending", "detail": None,
            } for kind, name in claimed]
            if rows:
                connection.execute(self._canaries.insert(), rows)
        return [Canary(**row) for row in rows]

    def mark_sent(self, canary_id: str) -> None:
        """Handed over; keeps ``seen`` when the canary arrived before this was written."""
        self._set_outcome(canary_id, "sent", None, ("sending",))

    def mark_failed(self, canary_id: str, detail: str) -> None:
        self._set_outcome(canary_id, "failed", detail[:500], ("sending", "sent"))

    def _set_outcome(self, canary_id: str, outcome: str, detail: str | None,
                     from_outcomes: tuple[str, ...]) -> None:
        c = self._canaries
        with translate_errors(), self._engine.begin() as connection:
            connection.execute(update(c).where(c.c.id == canary_id,
                                               c.c.outcome.in_(from_outcomes))
                               .values(outcome=outcome, detail=detail))

    # ---- arriving (persist) -------------------------------------------------------------

    def mark_seen(self, canary_id: str, principal_kind: str, principal: str) -> Seen:
        """The canary arrived through ``principal``'s forwarding rule; idempotent."""
        c = self._canaries
        now = self._clock()
        with translate_errors(), self._engine.begin() as connection:
            row = connection.execute(select(c).where(c.c.id == canary_id)).first()
            if row is None:
                raise PermanentError(
                    "unknown-canary", f"a message carries canary id {canary_id!r}, which "
                    "mailroute never sent (forged, or from another installation)")
            canary = Canary(**row._mapping)
            if canary.key != (principal_kind, principal):
                raise PermanentError(
                    "canary-principal-mismatch",
                    f"canary {canary_id} was sent to {canary.principal_kind} "
                    f"{canary.principal} but arrived as forwarded by {principal_kind} "
                    f"{principal}")
            if canary.seen_at is not None:
                return Seen(canary, first=False, late=False)
            connection.execute(update(c).where(c.c.id == canary_id, c.c.seen_at.is_(None))
                               .values(seen_at=now, outcome="seen", detail=None))
        seen = Canary(**{**row._mapping, "seen_at": now, "outcome": "seen", "detail": None})
        return Seen(seen, first=True, late=canary.outcome == "missing")

    # ---- watching (ingest's monitor, the CLI) -------------------------------------------

    def expire(self) -> list[Canary]:
        """Canaries whose deadline passed unseen: ``sent`` ones become ``missing`` and
        ``sending`` ones (never handed over) ``failed``.  Gives each exactly once, to
        whichever process turned it."""
        c = self._canaries
        now = self._clock()
        turned: list[Canary] = []
        with translate_errors(), self._engine.begin() as connection:
            for old, new, detail in (("sent", "missing", None),
                                     ("sending", "failed", NOT_HANDED_OVER)):
                rows = connection.execute(
                    update(c).where(c.c.outcome == old, c.c.deadline_at <= now,
                                    c.c.seen_at.is_(None))
                    .values(outcome=new, detail=detail).returning(*c.c)).all()
                turned += [Canary(**row._mapping) for row in rows]
        return sorted(turned, key=lambda canary: (canary.sent_at, canary.principal))

    def states(self, keys: Sequence[PrincipalKey]) -> dict[PrincipalKey, PrincipalCanaries]:
        """Each principal's newest canary, newest seen canary and newest verdict (three
        statements whatever the number of principals)."""
        with translate_errors(), self._engine.connect() as connection:
            latest = _newest_each(connection, self._canaries, None)
            seen = _newest_each(connection, self._canaries, ("seen",))
            verdicts = _newest_each(connection, self._canaries, ("seen", "missing", "failed"))
        return {key: PrincipalCanaries(latest.get(key), seen.get(key), verdicts.get(key))
                for key in keys}

    def get(self, canary_id: str) -> Canary | None:
        c = self._canaries
        with translate_errors(), self._engine.connect() as connection:
            row = connection.execute(select(c).where(c.c.id == canary_id)).first()
        return Canary(**row._mapping) if row is not None else None

    def prune(self, older_than: timedelta) -> int:
        """Forget the canaries sent before ``now - older_than`` of principals with newer ones."""
        c = self._canaries
        cutoff = self._clock() - older_than
        with translate_errors(), self._engine.begin() as connection:
            newest = select(c.c.principal_kind, c.c.principal).where(
                c.c.sent_at >= cutoff).distinct()
            # a principal with nothing newer keeps its old canaries (its last verdict)
            kept = sorted((kind, name) for kind, name in connection.execute(newest).all())
            if not kept:
                return 0
            result = connection.execute(delete(c).where(
                c.c.sent_at < cutoff, c.c.outcome.in_(("seen", "missing", "failed")),
                tuple_(c.c.principal_kind, c.c.principal).in_(kept)))
        return int(result.rowcount or 0)


def _newest_each(connection: Connection, c: Any, outcomes: tuple[str, ...] | None
                 ) -> dict[PrincipalKey, Canary]:
    """Every principal's newest canary (of these ``outcomes``), by principal."""
    rank = func.row_number().over(partition_by=(c.c.principal_kind, c.c.principal),
                                  order_by=(c.c.sent_at.desc(), c.c.id.desc())).label("rank")
    query = select(*c.c, rank)
    if outcomes is not None:
        query = query.where(c.c.outcome.in_(outcomes))
    ranked = query.subquery()
    rows = connection.execute(select(*(ranked.c[column.name] for column in c.c))
                              .where(ranked.c.rank == 1)).all()
    found = [Canary(**row._mapping) for row in rows]
    return {canary.key: canary for canary in found}


def _insert(connection: Connection, table: Any) -> Any:
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    if connection.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"unsupported database dialect {connection.dialect.name!r}")
