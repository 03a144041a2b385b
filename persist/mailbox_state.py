"""Per-mailbox bookkeeping for ingest and ``mailroute status``: cursors and poll outcomes.

Takes (mailbox, folder) pairs with a UIDVALIDITY and the highest UID handed to the broker, and
each poll's outcome; gives back the :class:`Cursor` to resume from and a :class:`MailboxState`
per folder.  A cursor never moves backwards while UIDVALIDITY stays the same (two ingest
processes racing, or a replay, cannot rewind it); a new UIDVALIDITY replaces it outright.
Fails with ``TransientError`` when the database is unreachable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from persist.database import translate_errors
from persist.tables import build_tables


@dataclass(frozen=True)
class Cursor:
    uidvalidity: int | None
    last_uid: int


@dataclass(frozen=True)
class MailboxState:
    mailbox: str
    folder: str
    uidvalidity: int | None
    last_uid: int | None
    status: str  # 'not-run' | 'success' | 'failing' | 'disabled'
    last_poll_at: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    consecutive_failures: int
    messages_fetched: int


class MailboxStateStore:
    """Reads and upserts rows of ``mailbox_state``; each call is its own transaction."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        self._table = build_tables().mailbox_state
        self._clock = clock or (lambda: datetime.now(UTC))

    def cursor(self, mailbox: str, folder: str) -> Cursor | None:
        """Where to resume in this folder, or None if nothing was fetched from it yet."""
        t = self._table
        with translate_errors(), self._engine.connect() as connection:
            row = connection.execute(
                select(t.c.uidvalidity, t.c.last_uid)
                .where(t.c.mailbox == mailbox, t.c.folder == folder)
            ).first()
        if row is None or row.last_uid is None:
            return None
        return Cursor(uidvalidity=row.uidvalidity, last_uid=int(row.last_uid))

    def save_cursor(
        self, mailbox: str, folder: str, uidvalidity: int | None, last_uid: int
    ) -> Cursor:
        """Record progress; gives the cursor now stored (which may be ahead of ``last_uid``)."""
        t = self._table
        with translate_errors(), self._engine.begin() as connection:
            insert = self._insert(connection)
            values = insert.values(
                mailbox=mailbox, folder=folder, uidvalidity=uidvalidity, last_uid=last_uid,
                **_fresh_counters(),
            )
            same_validity = t.c.uidvalidity.is_not_distinct_from(values.excluded.uidvalidity)
            statement = values.on_conflict_do_update(
                index_elements=[t.c.mailbox, t.c.folder],
                set_={
                    "uidvalidity": values.excluded.uidvalidity,
                    "last_uid": case(
                        (same_validity & (t.c.last_uid > values.excluded.last_uid), t.c.last_uid),
                        else_=values.excluded.last_uid,
                    ),
                },
            ).returning(t.c.uidvalidity, t.c.last_uid)
            row = connection.execute(statement).one()
        return Cursor(uidvalidity=row.uidvalidity, last_uid=int(row.last_uid))

    def record_poll(
        self,
        mailbox: str,
        folder: str,
        ok: bool,
        error: str | None = None,
        fetched: int = 0,
        at: datetime | None = None,
    ) -> MailboxState:
        """Count one poll: success resets the failure streak, failure extends it."""
        t = self._table
        at = at or self._clock()
        with translate_errors(), self._engine.begin() as connection:
            self._ensure_row(connection, mailbox, folder)
            changes: dict[str, Any] = {
                "last_poll_at": at,
                "messages_fetched": t.c.messages_fetched + fetched,
            }
            if ok:
                changes.update(status="success", last_success_at=at, last_error=None,
                               consecutive_failures=0)
            else:
                changes.update(status="failing", last_error=error or "unknown error",
                               consecutive_failures=t.c.consecutive_failures + 1)
            row = connection.execute(
                update(t).where(t.c.mailbox == mailbox, t.c.folder == folder)
                .values(**changes).returning(*t.c)
            ).one()
        return MailboxState(**row._mapping)

    def mark_disabled(self, mailbox: str, folder: str, reason: str | None = None) -> None:
        """Show a folder as deliberately not polled (removed from the config, or refused)."""
        t = self._table
        changes: dict[str, Any] = {"status": "disabled"}
        if reason is not None:
            changes["last_error"] = reason[:500]
        with translate_errors(), self._engine.begin() as connection:
            self._ensure_row(connection, mailbox, folder)
            connection.execute(
                update(t).where(t.c.mailbox == mailbox, t.c.folder == folder).values(**changes)
            )

    def mark_enabled(self, mailbox: str) -> None:
        """After ``mailroute mailbox enable``: not run since, no failure streak."""
        t = self._table
        with translate_errors(), self._engine.begin() as connection:
            connection.execute(
                update(t).where(t.c.mailbox == mailbox, t.c.status == "disabled")
                .values(status="not-run", consecutive_failures=0)
            )

    # ---- POP3: the UIDLs already handed to the broker ----------------------------------

    def seen_uidls(self, mailbox: str) -> set[str]:
        s = build_tables().pop3_seen
        with translate_errors(), self._engine.connect() as connection:
            return set(connection.execute(
                select(s.c.uidl).where(s.c.mailbox == mailbox)).scalars())

    def remember_uidls(self, mailbox: str, uidls: list[str]) -> None:
        """Record UIDLs as handed on (call after the confirm, before DELE)."""
        if not uidls:
            return
        s = build_tables().pop3_seen
        now = self._clock()
        with translate_errors(), self._engine.begin() as connection:
            insert = (postgresql.insert(s) if connection.dialect.name == "postgresql"
                      else sqlite.insert(s))
            connection.execute(insert.values(
                [{"mailbox": mailbox, "uidl": u, "seen_at": now} for u in uidls]
            ).on_conflict_do_nothing())

    def forget_uidls(self, mailbox: str, gone: list[str]) -> None:
        """Drop UIDLs no longer on the server (they cannot come back)."""
        if not gone:
            return
        s = build_tables().pop3_seen
        with translate_errors(), self._engine.begin() as connection:
            for start in range(0, len(gone), 500):
                connection.execute(delete(s).where(s.c.mailbox == mailbox,
                                                   s.c.uidl.in_(gone[start:start + 500])))

    def state_of(self, mailbox: str, folder: str) -> MailboxState | None:
        t = self._table
        with translate_errors(), self._engine.connect() as connection:
            row = connection.execute(
                select(t).where(t.c.mailbox == mailbox, t.c.folder == folder)).first()
        return MailboxState(**row._mapping) if row is not None else None

    def all_states(self) -> list[MailboxState]:
        t = self._table
        with translate_errors(), self._engine.connect() as connection:
            rows = connection.execute(select(t).order_by(t.c.mailbox, t.c.folder)).all()
        return [MailboxState(**row._mapping) for row in rows]

    def _insert(self, connection: Connection) -> Any:
        if connection.dialect.name == "postgresql":
            return postgresql.insert(self._table)
        if connection.dialect.name == "sqlite":
            return sqlite.insert(self._table)
        raise RuntimeError(f"unsupported database dialect {connection.dialect.name!r}")

    def _ensure_row(self, connection: Connection, mailbox: str, folder: str) -> None:
        connection.execute(
            self._insert(connection)
            .values(mailbox=mailbox, folder=folder, **_fresh_counters())
            .on_conflict_do_nothing()
        )


def _fresh_counters() -> dict[str, Any]:
    return {"status": "not-run", "consecutive_failures": 0, "messages_fetched": 0}
