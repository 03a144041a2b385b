"""Alembic environment for persist: run from code by ``persist.database.upgrade``.

Takes the connection passed in ``config.attributes["connection"]`` (or, from the alembic
command line, ``sqlalchemy.url``); gives the schema migrated to the requested revision.
Fails with the database's own error, which ``upgrade`` translates.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from persist.database import create_engine_for
from persist.tables import build_tables


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=build_tables().metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER much
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url configured")
    engine = create_engine_for(url)
    try:
        with engine.begin() as own_connection:
            _run(own_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
