"""Engines and migrations: the one place that knows how to reach and shape the database.

Takes a database URL (``sqlite:///path``, ``postgresql://...`` or ``postgresql+psycopg://...``);
gives a configured :class:`~sqlalchemy.engine.Engine` (:func:`create_engine_for`), brings the
schema to the newest Alembic revision from code (:func:`upgrade`, no ``alembic.ini``) and tells
which revision a database is at (:func:`current_revision`).  :class:`KeptConnection` keeps one
connection across calls on PostgreSQL (dropped and made anew after it fails).
:func:`translate_errors` turns
database failures into the stage's two kinds: a connection problem is a
:class:`~shared.errors.TransientError`, data the database refuses is a
:class:`~shared.errors.PermanentError` with reason ``unstorable``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, event, exc, make_url, text
from sqlalchemy.engine import URL, Connection, Engine

from shared.errors import PermanentError, TransientError

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
# Any constant works; it only has to be the same for every process migrating one database.
MIGRATION_LOCK_KEY = 0x6D61696C726F7574  # "mailrout"


def normalise_url(url: str | URL) -> URL:
    """Pin PostgreSQL URLs to psycopg 3 (``postgresql://`` and ``postgres://`` included)."""
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_engine_for(url: str | URL) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys, a busy timeout and its folder."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    if parsed.get_backend_name() == "postgresql":
        engine = create_engine(
            parsed,
            pool_pre_ping=True,
            connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
        )
        event.listen(engine, "connect", _prefer_lz4)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def _prefer_lz4(dbapi_connection: Any, connection_record: Any) -> None:
    """Compress large values (email bodies) with lz4 rather than pglz where the server has
    it: pglz cost PostgreSQL about a quarter of its time storing a batch of 4 KB mails."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SELECT set_config('default_toast_compression', 'lz4', false) "
                       "FROM pg_settings WHERE name = 'default_toast_compression' "
                       "AND 'lz4' = ANY(enumvals)")
    dbapi_connection.commit()


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    # pysqlite's own transaction handling starts transactions late (only before DML) and
    # never for SELECT; take control so a transaction covers every statement in it, and
    # take the write lock at BEGIN so two writers wait on the busy timeout instead of
    # failing to upgrade a read lock.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrations_folder() -> Path:
    return Path(__file__).resolve().parent / "migrations"


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_folder()))
    config.attributes["connection"] = connection
    return config


def upgrade(engine_or_url: Engine | str | URL, revision: str = "head") -> None:
    """Run ``alembic upgrade <revision>`` against the database, safely from many processes."""
    engine = engine_or_url if isinstance(engine_or_url, Engine) else \
        create_engine_for(engine_or_url)
    try:
        with translate_errors(), engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Workers starting together must not both create the tables.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": MIGRATION_LOCK_KEY})
            command.upgrade(_alembic_config(connection), revision)
    finally:
        if engine is not engine_or_url:
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or None before the first migration."""
    with translate_errors(), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def is_connection_error(error: exc.DBAPIError) -> bool:
    return isinstance(error, exc.OperationalError | exc.InterfaceError) or bool(
        error.connection_invalidated
    )


@contextmanager
def pipelined(connection: Connection) -> Iterator[Any]:
    """The psycopg connection under ``connection`` in pipeline mode: the statements sent in
    the block (and the transaction's BEGIN) travel together, one round trip for all, and
    their cursors are read after the block.  psycopg errors come out as SQLAlchemy's
    ``DBAPIError``s, as through ``connection.execute``, so :func:`translate_errors` and
    :class:`KeptConnection` treat them alike."""
    raw = connection.connection.driver_connection
    if not isinstance(raw, psycopg.Connection):
        raise RuntimeError(f"pipeline mode needs psycopg, not {type(raw).__name__}")
    try:
        with raw.pipeline():
            yield raw
    except psycopg.Error as error:
        raise exc.DBAPIError.instance(None, None, error, psycopg.Error) from error


class KeptConnection:
    """One connection kept across calls on PostgreSQL, used by one caller at a time.

    A pooled checkout pays a pre-ping round trip on each call (and BEGIN/ROLLBACK around a
    read); with small batches that made route and persist slow.  A connection that failed is
    dropped and made anew on the next call; the failure itself reaches the caller.  Other
    databases (SQLite: no network) get a new connection per call.
    """

    def __init__(self, engine: Engine, autocommit: bool = False) -> None:
        self._engine = engine
        self._autocommit = autocommit
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    @contextmanager
    def use(self) -> Iterator[Connection]:
        if self._engine.dialect.name != "postgresql":
            with self._engine.connect() as connection:
                yield connection
            return
        with self._lock:
            if self._connection is None:
                self._connection = self._engine.connect()
                if self._autocommit:
                    self._connection = self._connection.execution_options(
                        isolation_level="AUTOCOMMIT")
            connection = self._connection
            try:
                yield connection
            except exc.DBAPIError as error:
                if connection.invalidated or is_connection_error(error):
                    self._connection = None
                    connection.invalidate()
                    connection.close()
                raise

    def close(self) -> None:
        """Give the kept connection back (the next call makes a new one)."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map database exceptions onto TransientError (connection) or PermanentError (data)."""
    try:
        yield
    except (exc.IntegrityError, exc.DataError) as error:
        raise PermanentError("unstorable", _describe(error)) from error
    except exc.DBAPIError as error:
        if is_connection_error(error):
            raise TransientError(f"database unavailable: {_describe(error)}") from error
        raise


def _describe(error: exc.DBAPIError, limit: int = 500) -> str:
    message = str(error.orig) if error.orig is not None else str(error)
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."
