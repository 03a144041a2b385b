"""PostgreSQL stopped mid-transaction under load, on a private server (fault 12).

The server is this module's own (tests/faults/private_postgres.py); ``pg_ctl stop -m
immediate`` aborts every open transaction as a crash would, while persist and ingest write.
Nothing may be acked before its commit: after the restart every message is there exactly
once, each with all of its rows (no email without its delivery and parties).
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from persist.store import EmailStore
from tests.broker_fixtures import Vhost
from tests.dovecot import DovecotServer
from tests.faults.harness import Pipeline, postgres_engine
from tests.faults.private_postgres import PrivatePostgres
from tests.processes import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(private_postgres: PrivatePostgres) -> Iterator[Engine]:
    url = private_postgres.create_database(f"fault_{secrets.token_hex(4)}")
    with postgres_engine(url) as engine:
        yield engine


def test_postgres_down_mid_transaction_acks_nothing_early(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine,
        private_postgres: PrivatePostgres) -> None:
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine,
                        mailbox={"batch_size": 20})
    pipeline.send("alice", "pgdown", range(400))
    try:
        pipeline.start()
        pipeline.wait_persisted(50)
        # Mail in flight when the database goes, however fast each stage is (when route and
        # persist kept up with ingest, they had nothing left to meet the stopped server
        # with): parse, which needs no database, stops cleanly; mail that arrives meanwhile
        # (ingest may have read all of the first 400 already) waits in its queue, and parse
        # starts again once the database is down.
        assert pipeline.workers.kill("parse", signal.SIGTERM) == 0
        pipeline.send("alice", "pgdown-backlog", range(40))
        wait_for(lambda: (pipeline.queue_depth("mail.parse") or 0) >= 20,
                 "a backlog of 20 in mail.parse", on_timeout=pipeline.workers.logs)
        private_postgres.stop("immediate")
        pipeline.start("parse")
        try:
            # route reads earlier mail (threading) from the database too, so whichever of
            # the two meets the stopped server first retries; neither may ack early
            wait_for(lambda: sum(pipeline.workers.counter(
                stage, "mailroute_stage_messages_retried_total")
                for stage in ("route", "persist")) >= 1,
                "route or persist to retry against the stopped database",
                on_timeout=pipeline.workers.logs)
        finally:
            private_postgres.start()
        pipeline.send("dave", "pgdown", range(400, 500))
        pipeline.wait_persisted()
        pipeline.assert_exactly_once()
        tables = EmailStore(engine).tables
        with engine.connect() as connection:
            with_parties = connection.execute(
                select(func.count(func.distinct(tables.parties.c.email_id)))).scalar_one()
        assert with_parties == len(pipeline.sent)
    finally:
        codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    pipeline.assert_no_dead_letters()
