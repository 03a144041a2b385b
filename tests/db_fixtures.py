"""Database fixtures: a migrated engine on SQLite (per test) and on PostgreSQL (per module).

PostgreSQL tests get a database of their own, ``mailroute_test_<random>``, created on the
server at ``MAILROUTE_TEST_POSTGRES_URL`` (default: postgres on 127.0.0.1:5432, trust auth)
and dropped WITH (FORCE) afterwards.  Register with ``pytest_plugins = ["tests.db_fixtures"]``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import delete, text
from sqlalchemy.engine import URL, Engine

from persist.database import create_engine_for, normalise_url, upgrade
from persist.tables import build_tables

DEFAULT_POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def postgres_admin_url() -> URL:
    return normalise_url(os.environ.get("MAILROUTE_TEST_POSTGRES_URL",
                                        DEFAULT_POSTGRES_ADMIN_URL))


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for the duration of the block; gives its URL."""
    admin_url = postgres_admin_url()
    name = f"mailroute_test_{secrets.token_hex(6)}"
    admin = create_engine_for(admin_url)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = admin_url.set(database=name).render_as_string(hide_password=False)
        try:
            yield url
        finally:
            _scan_for_secrets(url, name)
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _scan_for_secrets(url: str, name: str) -> None:
    from tests.secret_scan import scan_database

    engine = create_engine_for(url)
    try:
        scan_database(engine, name)
    except Exception as exc:  # a fault test may leave the server down: say so, don't mask
        print(f"secret scan of {name} skipped: {exc}")
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def postgres_database_url() -> Iterator[str]:
    """One PostgreSQL database per test module."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def empty_postgres_database_url() -> Iterator[str]:
    """A PostgreSQL database of the test's own, not migrated."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def postgres_engine(postgres_database_url: str) -> Iterator[Engine]:
    """A migrated engine on the module's PostgreSQL database."""
    engine = create_engine_for(postgres_database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def database() -> Iterator[Engine]:
    """A migrated engine on a PostgreSQL database of the test's own (integration tests)."""
    with fresh_postgres_database() as url:
        engine = create_engine_for(url)
        upgrade(engine)
        yield engine
        engine.dispose()


@pytest.fixture
def sqlite_database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'mailroute.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A migrated, empty engine; the test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        engine = create_engine_for(request.getfixturevalue("sqlite_database_url"))
        upgrade(engine)
        yield engine
        engine.dispose()
        return
    engine = request.getfixturevalue("postgres_engine")
    yield engine
    empty_all_tables(engine)


def empty_all_tables(engine: Engine) -> None:
    """Delete every row (children first), so the next test on a shared database starts clean."""
    with engine.begin() as connection:
        for table in reversed(build_tables().metadata.sorted_tables):
            connection.execute(delete(table))
