"""Broker faults on a private RabbitMQ node (RELIABILITY.md faults 5, 7, 8 and 10).

The node is this module's own (tests/faults/private_rabbit.py): it is restarted under load,
put into a memory alarm, given a queue length limit, and its consumer timeout (8 s, checked
every second) is outlived by a slow handler.  Each test runs mail from Dovecot through the
four worker processes into PostgreSQL and ends with every message recorded exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from tests.dovecot import DovecotServer
from tests.faults.harness import Pipeline, postgres_engine
from tests.faults.private_rabbit import CONSUMER_TIMEOUT_MS, PrivateRabbit
from tests.processes import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def engine() -> Iterator[Engine]:
    with postgres_engine() as engine:
        yield engine


@pytest.fixture
def vhost_url(private_rabbit: PrivateRabbit) -> Iterator[str]:
    url = private_rabbit.add_vhost()
    yield url
    private_rabbit.delete_vhost(url)


@pytest.fixture
def pipeline(tmp_path: Path, dovecot: DovecotServer, private_rabbit: PrivateRabbit,
             vhost_url: str, engine: Engine) -> Iterator[Pipeline]:
    pipeline = Pipeline(tmp_path, dovecot, vhost_url, engine,
                        management_url=private_rabbit.management_url,
                        mailbox={"batch_size": 20})
    try:
        yield pipeline
    finally:
        pipeline.stop()


def failed_polls(pipeline: Pipeline) -> float:
    return pipeline.workers.counter("ingest", "mailroute_mailbox_polls_total",
                                    outcome="failure")


def test_broker_restart_under_load_loses_nothing(pipeline: Pipeline,
                                                 private_rabbit: PrivateRabbit) -> None:
    pipeline.send("alice", "restart", range(400))
    pipeline.start()
    pipeline.wait_persisted(50)
    private_rabbit.stop_app()
    pipeline.send("dave", "restart", range(400, 500))  # mail keeps arriving meanwhile
    private_rabbit.start_app()
    pipeline.wait_persisted()
    pipeline.assert_exactly_once()
    codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    assert "reconnecting" in pipeline.workers.log_path("persist").read_text()
    pipeline.assert_no_dead_letters()


def test_memory_alarm_pauses_ingest_without_advancing_its_cursor(
        pipeline: Pipeline, private_rabbit: PrivateRabbit) -> None:
    pipeline.send("alice", "alarm", range(100))
    private_rabbit.set_memory_alarm(True)
    try:
        pipeline.start()
        wait_for(lambda: failed_polls(pipeline) >= 1, "a poll to fail on the blocked broker",
                 on_timeout=pipeline.workers.logs)
        assert pipeline.persisted() == 0
        assert "not confirmed" in pipeline.workers.log_path("ingest").read_text() or \
            "publish failed" in pipeline.workers.log_path("ingest").read_text()
    finally:
        private_rabbit.set_memory_alarm(False)
    pipeline.wait_persisted()
    pipeline.assert_exactly_once()
    codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    pipeline.assert_no_dead_letters()


def test_queue_at_its_limit_rejects_publish_and_ingest_retries(
        pipeline: Pipeline, private_rabbit: PrivateRabbit, vhost_url: str) -> None:
    vhost = vhost_url.rsplit("/", 1)[1]
    pipeline.send("alice", "limit", range(150))
    # set before the queue exists; outranks the workers' delivery-limit policy, so it keeps
    # that setting too
    private_rabbit.management("PUT", f"/api/policies/{vhost}/fault-max-length", {
        "pattern": r"^mail\.parse$", "apply-to": "queues", "priority": 10,
        "definition": {"max-length": 40, "overflow": "reject-publish", "delivery-limit": 5}})
    pipeline.start("ingest")
    wait_for(lambda: failed_polls(pipeline) >= 1, "a publish to be rejected at the limit",
             on_timeout=pipeline.workers.logs)
    # A quorum queue checks its limit after the fact: a batch in flight may overshoot it.
    assert (pipeline.queue_depth("mail.parse") or 0) <= 40 + 2 * 20
    assert "nacked" in pipeline.workers.log_path("ingest").read_text()
    pipeline.start("parse", "route", "persist")  # the queue drains; ingest's retries get in
    pipeline.wait_persisted()
    pipeline.assert_exactly_once()
    codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    pipeline.assert_no_dead_letters()


def test_handler_slower_than_the_consumer_timeout_records_once(
        pipeline: Pipeline) -> None:
    pipeline.send("alice", "timeout", range(60))
    pipeline.start("ingest", "parse", "route")
    seconds = CONSUMER_TIMEOUT_MS / 1000 + 6
    pipeline.start("persist", fault=f"slow-once:{seconds:g}")
    pipeline.wait_persisted()
    log = pipeline.workers.log_path("persist").read_text()
    assert "handler woke up" in log
    # the broker closed the channel under the slow handler: detected, reconnected, and the
    # batch redelivered and stored again without a second row
    assert "reconnecting" in log, log[-3000:]
    pipeline.assert_exactly_once()
    codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    pipeline.assert_no_dead_letters()
