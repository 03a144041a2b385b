"""Fixtures of the fault tests: a private Dovecot per test, private RabbitMQ and PostgreSQL
servers per module (only the modules that restart them ask for them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dovecot import DovecotServer
from tests.faults.private_postgres import PrivatePostgres
from tests.faults.private_rabbit import PrivateRabbit


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer(tls=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def private_rabbit() -> Iterator[PrivateRabbit]:
    node = PrivateRabbit()
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
