"""Links cut or stalled, unroutable publishes, slow and poisoned handlers (faults 4, 6, 9, 11).

On the shared RabbitMQ (a private vhost per test; nothing is restarted here).  The workers
reach the broker through a proxy of the test's own (tests/tcp_proxy.py) that stalls every
connection silently, so a publish waits for a confirm that never comes, and then cuts them.
A handler sleeps longer than three heartbeat intervals; a poison message fails every attempt
while a hundred others, prefetched with it, flow on.  Each ends with the database checked.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from ingest.worker import IngestWorker
from persist.mailbox_state import MailboxStateStore
from shared.errors import TransientError
from shared.metrics import Metrics
from shared.settings import load_settings
from shared.transport import Broker, Envelope
from tests.broker_fixtures import Vhost, management
from tests.dovecot import DovecotServer
from tests.faults.harness import Pipeline, make_message, postgres_engine, queue_depth
from tests.processes import wait_for
from tests.tcp_proxy import StallableProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def engine() -> Iterator[Engine]:
    with postgres_engine() as engine:
        yield engine


def via_proxy(url: str, proxy: StallableProxy) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}").geturl()


def test_links_stalled_silently_then_cut_lose_nothing(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    with StallableProxy("127.0.0.1", 5672) as proxy:
        pipeline = Pipeline(tmp_path, dovecot, via_proxy(rabbit_vhost.url, proxy), engine,
                            broker={"confirm_timeout": 2, "heartbeat": 4},
                            mailbox={"batch_size": 20})
        pipeline.send("alice", "stall", range(400))
        try:
            pipeline.start()
            pipeline.wait_persisted(50)
            proxy.stall()  # publishes now wait for confirms that never come
            pipeline.send("dave", "stall", range(400, 500))
            wait_for(lambda: "not confirmed within" in pipeline.workers.logs(),
                     "a confirm to time out on the stalled link", timeout=120,
                     on_timeout=pipeline.workers.logs)
            stalled_at = pipeline.persisted()
            proxy.cut()  # and now every connection is gone; new ones go through
            pipeline.wait_persisted()
            pipeline.assert_exactly_once()
        finally:
            codes = pipeline.stop()
        assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
        assert stalled_at < len(pipeline.sent)
        pipeline.broker_url = rabbit_vhost.url
        pipeline.assert_no_dead_letters()


def test_publish_through_a_stalled_link_times_out_instead_of_hanging(
        rabbit_vhost: Vhost) -> None:
    with StallableProxy("127.0.0.1", 5672) as proxy:
        settings = load_settings(None, {"MAILROUTE_BROKER__URL": via_proxy(rabbit_vhost.url,
                                                                           proxy),
                                        "MAILROUTE_BROKER__CONFIRM_TIMEOUT": "2"})
        broker = Broker(settings.broker)
        broker.declare()
        publisher = broker.publisher()
        queue = broker.topology.input_queue("parse")
        envelope = Envelope(b"{}", broker.topology.exchange_name, queue)
        publisher.publish_envelopes([envelope])
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(TransientError, match=r"not confirmed|publish failed"):
            publisher.publish_envelopes([envelope] * 5)
        assert time.monotonic() - started < 30
        proxy.cut()
        publisher.publish_envelopes([envelope])  # a new connection, confirmed
        publisher.close()
    # the stalled five never reached the broker, or did (then they count as published twice
    # once the caller retries: at-least-once, the database removes the duplicate)
    assert queue_depth(rabbit_vhost.url, queue) in (2, 7)


def test_unroutable_publish_fails_and_leaves_the_cursor_alone(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine)
    pipeline.send("alice", "unroutable", range(5))
    settings = load_settings(pipeline.config)
    broker = Broker(settings.broker)
    broker.declare()
    vhost = urllib.parse.quote(rabbit_vhost.name, safe="")
    # raw now routes nowhere: neither to the parse queue nor to the journal bound beside it
    management("DELETE", f"/api/queues/{vhost}/mail.parse")
    management("DELETE", f"/api/queues/{vhost}/{settings.broker.prefix}.journal")
    state = MailboxStateStore(engine)
    worker = IngestWorker(settings, broker.publisher(), state, Metrics())
    with pytest.raises(TransientError, match="unroutable"):
        worker.poll_once(settings.mailbox("alice"))
    assert state.cursor("alice", "INBOX") is None
    assert all(b"\\Seen" not in flags for flags in dovecot.flags("alice").values())
    broker.declare()
    assert worker.poll_once(settings.mailbox("alice")) == 5
    assert state.cursor("alice", "INBOX") is not None


def test_handler_slower_than_three_heartbeats_keeps_its_connection(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine,
                        broker={"heartbeat": 1})
    pipeline.send("alice", "heartbeat", range(100))
    try:
        pipeline.start("ingest", "parse", "persist")
        pipeline.start("route", fault="slow-once:5")
        pipeline.wait_persisted()
        pipeline.assert_exactly_once()
        log = pipeline.workers.log_path("route").read_text()
        assert "handler woke up" in log
        assert "reconnecting" not in log, log[-3000:]
        # no redelivery: route took each message exactly once
        assert pipeline.workers.counter("route", "mailroute_stage_messages_in_total") == 100
    finally:
        codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    pipeline.assert_no_dead_letters()


def test_poison_message_is_dead_lettered_alone_while_the_rest_flows(
        tmp_path: Path, dovecot: DovecotServer, rabbit_vhost: Vhost, engine: Engine) -> None:
    pipeline = Pipeline(tmp_path, dovecot, rabbit_vhost.url, engine,
                        broker={"prefetch": 50})
    pipeline.send("alice", "poison", range(50))
    dovecot.deliver("alice", make_message("alice", "poisoned", 0, body="POISON-PILL"))
    pipeline.send("alice", "poison", range(50, 100))
    try:
        pipeline.start("ingest", "route", "persist")
        pipeline.start("parse", fault="poison:POISON-PILL")
        pipeline.wait_persisted()
        wait_for(lambda: pipeline.workers.counter(
            "parse", "mailroute_stage_messages_dead_lettered_total") >= 1,
            "the poison message to be dead-lettered", on_timeout=pipeline.workers.logs)
        pipeline.assert_exactly_once()
        retried = pipeline.workers.counter("parse", "mailroute_stage_messages_retried_total")
    finally:
        codes = pipeline.stop()
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{pipeline.workers.logs()}"
    assert retried == 2  # retry.attempts is 3: two retries, then the dead letter
    dead = pipeline.dead_letters()
    assert list(dead) == ["mail.parse.dead"]
    [(body, headers)] = dead["mail.parse.dead"]
    assert headers["x-mailroute-reason"] == "handler-error"
    assert "poisoned handler" in headers["x-mailroute-detail"]
    assert b"POISON-PILL" in base64.b64decode(json.loads(body)["raw"])
    assert headers["x-mailroute-attempts"] == 1  # one delivery, retried in the handler
