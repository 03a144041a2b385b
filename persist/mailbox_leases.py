"""Which ingest process polls which mailbox, and when: leases and schedule in the database.

Takes mailbox names, an owner id per ingest process and a clock; gives :class:`LeaseStore`.
:meth:`LeaseStore.claim` hands a process the mailboxes that are due, enabled, and free (never
leased, released, or whose lease ran out because its holder died): on PostgreSQL with
``SELECT ... FOR UPDATE SKIP LOCKED`` so pollers never wait on each other, on SQLite under the
write lock that ``BEGIN IMMEDIATE`` takes.  A holder renews its leases (:meth:`renew`) well
within ``lease_seconds`` and gives a mailbox back with its next due time (:meth:`release`).
Also the per-mailbox disable switch and the UIDVALIDITY reset counter.
Fails with ``TransientError`` when the database is unreachable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from persist.database import translate_errors
from persist.tables import build_tables

RESET_WINDOW = timedelta(days=1)


@dataclass(frozen=True)
class Lease:
    mailbox: str
    owner: str | None
    lease_until: datetime | None
    due_at: datetime
    disabled_reason: str | None
    validity_resets: int
    validity_reset_at: datetime | None


class LeaseStore:
    """Reads and updates ``mailbox_leases``; each call is its own short transaction."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        self._table = build_tables().mailbox_leases
        self._clock = clock or (lambda: datetime.now(UTC))

    def now(self) -> datetime:
        return self._clock()

    def ensure(self, mailboxes: Sequence[str]) -> None:
        """Give every named mailbox a row (due at once); existing rows are left alone."""
        if not mailboxes:
            return
        now = self._clock()
        with translate_errors(), self._engine.begin() as connection:
            insert = (postgresql.insert(self._table) if connection.dialect.name == "postgresql"
                      else sqlite.insert(self._table))
            for start in range(0, len(mailboxes), 500):
                connection.execute(insert.values([
                    {"mailbox": name, "due_at": now, "validity_resets": 0}
                    for name in mailboxes[start:start + 500]
                ]).on_conflict_do_nothing())

    def claim(self, owner: str, mailboxes: Sequence[str], lease_seconds: float,
              limit: int) -> list[str]:
        """Lease up to ``limit`` due, enabled, free mailboxes among ``mailboxes`` to ``owner``."""
        if limit <= 0 or not mailboxes:
            return []
        t = self._table
        now = self._clock()
        wanted = set(mailboxes)
        with translate_errors(), self._engine.begin() as connection:
            free = (t.c.disabled_reason.is_(None), t.c.due_at <= now,
                    or_(t.c.owner.is_(None), t.c.lease_until < now))
            # Usually every poller knows every row: claim without a list of thousands of
            # names.  Rows it does not know (another configuration during a rollout) are
            # only locked until this transaction ends; if any turn up, ask again by name so
            # they cannot crowd out the ones it does know.
            names = self._due(connection, select(t.c.mailbox).where(*free), limit)
            if any(name not in wanted for name in names):
                names = self._due(connection, select(t.c.mailbox).where(
                    t.c.mailbox.in_(list(mailboxes)), *free), limit)
            if names:
                self._set_lease(connection, names, owner, now + timedelta(seconds=lease_seconds))
        return names

    def _due(self, connection: Connection, query: Any, limit: int) -> list[str]:
        query = query.order_by(self._table.c.due_at).limit(limit)
        if connection.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        return list(connection.execute(query).scalars())

    def claim_named(self, owner: str, mailbox: str, lease_seconds: float) -> bool:
        """Lease one mailbox now if it is free (due or not); for the CLI's test command."""
        t = self._table
        now = self._clock()
        with translate_errors(), self._engine.begin() as connection:
            result = connection.execute(
                update(t).where(t.c.mailbox == mailbox,
                                or_(t.c.owner.is_(None), t.c.lease_until < now,
                                    t.c.owner == owner))
                .values(owner=owner, lease_until=now + timedelta(seconds=lease_seconds)))
        return bool(result.rowcount)

    def _set_lease(self, connection: Connection, names: list[str], owner: str,
                   until: datetime) -> None:
        t = self._table
        connection.execute(update(t).where(t.c.mailbox.in_(names))
                           .values(owner=owner, lease_until=until))

    def renew(self, owner: str, mailboxes: Sequence[str], lease_seconds: float) -> set[str]:
        """Extend ``owner``'s leases; gives the mailboxes it still holds (others took the rest)."""
        if not mailboxes:
            return set()
        t = self._table
        now = self._clock()
        held: set[str] = set()
        with translate_errors(), self._engine.begin() as connection:
            names = list(mailboxes)
            for start in range(0, len(names), 500):
                chunk = names[start:start + 500]
                connection.execute(
                    update(t).where(t.c.mailbox.in_(chunk), t.c.owner == owner)
                    .values(lease_until=now + timedelta(seconds=lease_seconds)))
                held.update(connection.execute(
                    select(t.c.mailbox).where(t.c.mailbox.in_(chunk), t.c.owner == owner)
                ).scalars())
        return held

    def holds(self, owner: str, mailbox: str) -> bool:
        t = self._table
        now = self._clock()
        with translate_errors(), self._engine.connect() as connection:
            row = connection.execute(select(t.c.owner, t.c.lease_until)
                                     .where(t.c.mailbox == mailbox)).first()
        return row is not None and row.owner == owner and row.lease_until is not None \
            and row.lease_until >= now

    def release(self, owner: str, mailbox: str, due_at: datetime) -> bool:
        """Give the mailbox back, next due at ``due_at``; False if ``owner`` had lost it."""
        t = self._table
        with translate_errors(), self._engine.begin() as connection:
            result = connection.execute(
                update(t).where(t.c.mailbox == mailbox, t.c.owner == owner)
                .values(owner=None, lease_until=None, due_at=due_at))
        return bool(result.rowcount)

    def release_all(self, owner: str) -> None:
        """On a clean stop: give every lease back, due at once, so others take over now."""
        t = self._table
        with translate_errors(), self._engine.begin() as connection:
            connection.execute(update(t).where(t.c.owner == owner)
                               .values(owner=None, lease_until=None))

    def disable(self, mailbox: str, reason: str) -> None:
        t = self._table
        self.ensure([mailbox])
        with translate_errors(), self._engine.begin() as connection:
            connection.execute(update(t).where(t.c.mailbox == mailbox)
                               .values(disabled_reason=reason[:500], owner=None,
                                       lease_until=None))

    def enable(self, mailbox: str) -> bool:
        """Clear the disable switch and the reset counter; due at once.  False if unknown."""
        t = self._table
        with translate_errors(), self._engine.begin() as connection:
            result = connection.execute(
                update(t).where(t.c.mailbox == mailbox)
                .values(disabled_reason=None, validity_resets=0, validity_reset_at=None,
                        due_at=self._clock()))
        return bool(result.rowcount)

    def count_validity_reset(self, mailbox: str) -> int:
        """Record one UIDVALIDITY reset; gives how many happened within the last day."""
        t = self._table
        now = self._clock()
        self.ensure([mailbox])
        with translate_errors(), self._engine.begin() as connection:
            row = connection.execute(select(t.c.validity_resets, t.c.validity_reset_at)
                                     .where(t.c.mailbox == mailbox)).one()
            recent = row.validity_reset_at is not None and \
                now - row.validity_reset_at < RESET_WINDOW
            count = (row.validity_resets if recent else 0) + 1
            connection.execute(update(t).where(t.c.mailbox == mailbox)
                               .values(validity_resets=count, validity_reset_at=now))
        return int(count)

    def get(self, mailbox: str) -> Lease | None:
        t = self._table
        with translate_errors(), self._engine.connect() as connection:
            row = connection.execute(select(t).where(t.c.mailbox == mailbox)).first()
        return Lease(**row._mapping) if row is not None else None

    def all(self) -> list[Lease]:
        t = self._table
        with translate_errors(), self._engine.connect() as connection:
            rows = connection.execute(select(t).order_by(t.c.mailbox)).all()
        return [Lease(**row._mapping) for row in rows]

    def owned_by(self, owner: str) -> list[str]:
        t = self._table
        now = self._clock()
        with translate_errors(), self._engine.connect() as connection:
            return list(connection.execute(
                select(t.c.mailbox).where(and_(t.c.owner == owner, t.c.lease_until >= now))
            ).scalars())
