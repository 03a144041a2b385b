"""Read positions of `mailroute replay` runs, so that an interrupted replay resumes.

Takes a replay's key (a hash of its stage, range and filters), the last journal offset whose
messages the broker confirmed, and the count so far; gives the saved :class:`ReplayPosition`.
Each call is its own transaction.  Fails with ``TransientError`` when the database is
unreachable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine

from persist.database import translate_errors
from persist.tables import build_tables


@dataclass(frozen=True)
class ReplayPosition:
    key: str
    last_offset: int | None
    replayed: int
    done: bool
    updated_at: datetime


class ReplayPositionStore:
    def __init__(self, engine: Engine, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        self._table = build_tables().replay_positions
        self._clock = clock or (lambda: datetime.now(UTC))

    def get(self, key: str) -> ReplayPosition | None:
        t = self._table
        with translate_errors(), self._engine.connect() as connection:
            row = connection.execute(
                select(t.c.key, t.c.last_offset, t.c.replayed, t.c.done, t.c.updated_at)
                .where(t.c.key == key)).first()
        if row is None:
            return None
        return ReplayPosition(row.key, row.last_offset, int(row.replayed), bool(row.done),
                              row.updated_at)

    def save(self, key: str, stage: str, request: dict[str, Any], last_offset: int | None,
             replayed: int, done: bool = False) -> None:
        t = self._table
        values = {"last_offset": last_offset, "replayed": replayed, "done": done,
                  "updated_at": self._clock()}
        with translate_errors(), self._engine.begin() as connection:
            changed = connection.execute(update(t).where(t.c.key == key).values(**values))
            if changed.rowcount == 0:
                connection.execute(t.insert().values(key=key, stage=stage, request=request,
                                                     **values))

    def forget(self, key: str) -> None:
        t = self._table
        with translate_errors(), self._engine.begin() as connection:
            connection.execute(delete(t).where(t.c.key == key))
