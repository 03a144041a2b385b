"""The journal, replay and dead letters against the real RabbitMQ (a private vhost) and SQLite.

Every stage publish also lands in the journal stream; replay re-feeds only the chosen stage's
input within the range and filters, resumes after an interruption, and reports a range that
retention dropped as a gap; dead letters can be listed, shown, retried to the stage they
failed in, and purged.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy.engine import Engine

from persist.database import create_engine_for, upgrade
from persist.replay_state import ReplayPositionStore
from shared.dead_letters import DeadLetterQueue
from shared.journal import JournalReader
from shared.metrics import Metrics
from shared.queue_metrics import PassiveDeclareReader
from shared.replay import Replayer, ReplayRequest, Simulator
from shared.runtime import StageRunner
from shared.schemas import Codec
from shared.settings import BrokerSettings, JournalSettings, Settings
from shared.stage import Output
from shared.transport import Broker, Envelope
from tests import documents
from tests.broker_fixtures import Vhost, drain_queue, management
from tests.processes import wait_for


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'mailroute.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def make_settings(vhost: Vhost, journal: JournalSettings | None = None) -> Settings:
    broker = BrokerSettings(url=vhost.url, prefix="mail", confirm_timeout=10,
                            journal=journal or JournalSettings())
    return replace(Settings(), broker=broker)


def publish(broker: Broker, outputs: list[Output]) -> None:
    publisher = broker.publisher()
    try:
        publisher.publish(outputs)
    finally:
        publisher.close()


def replayer(settings: Settings, reader: JournalReader, broker: Broker,
             engine: Engine) -> tuple[Replayer, Any]:
    publisher = broker.publisher()
    return Replayer(settings, reader, publisher, ReplayPositionStore(engine),
                    Simulator(settings, None)), publisher


def test_a_stage_publish_lands_in_its_queue_and_in_the_journal(rabbit_vhost: Vhost) -> None:
    settings = make_settings(rabbit_vhost)
    broker = Broker(settings.broker)
    broker.declare()
    before = datetime.now(UTC)
    raw = documents.raw(b"Subject: one\r\n\r\nbody\r\n")
    publish(broker, [Output("raw", raw), Output("parsed", documents.parsed())])
    assert len(drain_queue(rabbit_vhost.url, "mail.parse")) == 1
    assert len(drain_queue(rabbit_vhost.url, "mail.route")) == 1
    info = rabbit_vhost.queue_info("mail.journal")
    assert info["arguments"]["x-queue-type"] == "stream"
    assert info["arguments"]["x-max-age"] == "7D"
    with JournalReader(rabbit_vhost.url, broker.topology, stall_seconds=2) as reader:
        entries = list(reader.read("first"))
    assert [e.routing_key for e in entries] == ["mail.parse", "mail.route"]
    assert json.loads(entries[0].body)["trace_id"] == raw["trace_id"]
    assert entries[0].published_at is not None and entries[0].published_at >= before - \
        timedelta(seconds=1)


def test_declaring_again_with_other_retention_keeps_the_journal(rabbit_vhost: Vhost) -> None:
    Broker(make_settings(rabbit_vhost).broker).declare()
    other = make_settings(rabbit_vhost, JournalSettings(max_age="1h"))
    Broker(other.broker).declare()  # logs the difference, does not fail
    assert rabbit_vhost.queue_info("mail.journal")["arguments"]["x-max-age"] == "7D"


def test_replay_refeeds_one_stage_in_range_and_filters_and_resumes(
        rabbit_vhost: Vhost, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(rabbit_vhost)
    broker = Broker(settings.broker)
    broker.declare()
    since = datetime.now(UTC) - timedelta(seconds=5)
    parsed = [documents.parsed(message_id=f"m{i}@example.com", mailbox=box)
              for i, box in enumerate(["alice", "bob", "alice", "alice"])]
    publish(broker, [Output("raw", documents.raw()), *[Output("parsed", p) for p in parsed]])
    drain_queue(rabbit_vhost.url, "mail.parse")
    drain_queue(rabbit_vhost.url, "mail.route")
    request = ReplayRequest("route", since, datetime.now(UTC) + timedelta(seconds=5),
                            mailbox="alice")
    monkeypatch.setattr("shared.replay.BATCH", 1)  # a position is saved after every message
    seen = []

    def interrupt_at_the_third(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with JournalReader(rabbit_vhost.url, broker.topology, stall_seconds=3) as reader:
        first, publisher = replayer(settings, reader, broker, engine)
        with pytest.raises(KeyboardInterrupt):
            first.run(request, progress=interrupt_at_the_third)
        publisher.close()
        # entries: raw, parsed alice, parsed bob, ...: interrupted before the third was read
        refed = drain_queue(rabbit_vhost.url, "mail.route")
        assert [json.loads(b)["email"]["message_id"] for b, _ in refed] == ["m0@example.com"]
        assert refed[0][1]["x-mailroute-replay"] == request.key()
        second, publisher = replayer(settings, reader, broker, engine)
        report = second.run(request)
        publisher.close()
        assert report.resumed_from is not None and report.gap is None
        assert report.published == 3  # counted across both runs
        refed = drain_queue(rabbit_vhost.url, "mail.route")
        assert sorted(json.loads(b)["email"]["message_id"] for b, _ in refed) == [
            "m2@example.com", "m3@example.com"]
        assert drain_queue(rabbit_vhost.url, "mail.parse") == []  # other stages untouched
        third, publisher = replayer(settings, reader, broker, engine)
        assert third.run(request).already_done
        publisher.close()
        # the replayed messages went straight to the queue, not into the journal again
        assert sum(1 for e in reader.read("first", None) if not e.is_marker) == 5


def test_a_range_that_retention_dropped_is_reported_as_a_gap(rabbit_vhost: Vhost,
                                                             engine: Engine) -> None:
    # (whole segments go; a limit below one batch's chunk would empty the stream entirely)
    tiny = JournalSettings(max_length_bytes=12000, segment_size_bytes=3000)
    settings = make_settings(rabbit_vhost, tiny)
    broker = Broker(settings.broker)
    broker.declare()
    since = datetime.now(UTC) - timedelta(minutes=10)
    for _ in range(12):
        publish(broker, [Output("raw", documents.raw(b"x" * 400)) for _ in range(5)])
    drain_queue(rabbit_vhost.url, "mail.parse")
    with JournalReader(rabbit_vhost.url, broker.topology) as reader:
        first = reader.first_retained()
        assert first is not None and first.offset > 0, "retention dropped nothing"
        replay, publisher = replayer(settings, reader, broker, engine)
        report = replay.run(ReplayRequest("parse", since, datetime.now(UTC)), dry_run=True)
        publisher.close()
    # (the replay's own end marker may have pushed retention further still)
    assert report.gap is not None and report.gap.first_offset >= first.offset
    assert "gap: the journal's retention has dropped entries" in report.gap.describe()
    assert report.matched < 60


def dead_envelope(stage: str, body: bytes, reason: str, attempts: int) -> Envelope:
    return Envelope(body, "mail", f"mail.{stage}.dead", {
        "x-mailroute-stage": stage, "x-mailroute-reason": reason,
        "x-mailroute-detail": "why", "x-mailroute-attempts": attempts,
        "x-mailroute-failed-at": datetime.now(UTC).isoformat(), "x-mailroute-trace": "t1"})


def test_dead_letters_list_show_retry_and_purge(rabbit_vhost: Vhost) -> None:
    settings = make_settings(rabbit_vhost)
    broker = Broker(settings.broker)
    broker.declare()
    codec = Codec()
    bodies = [codec.encode("parsed", documents.parsed(message_id=f"d{i}@x")) for i in range(3)]
    publisher = broker.publisher()
    publisher.publish_envelopes([dead_envelope("route", b, "untrusted-forwarder", 1)
                                 for b in bodies])
    publisher.close()
    queue = DeadLetterQueue(rabbit_vhost.url, broker.topology, "route")
    letters = queue.browse()
    assert [d.reason for d in letters] == ["untrusted-forwarder"] * 3
    assert letters[0].attempts == 1 and letters[0].trace_id == "t1"
    assert "alice/1" in letters[0].summary()
    assert [d.id for d in queue.browse()] == [d.id for d in letters]  # browsing keeps them
    retried = queue.retry([letters[1].id])
    assert [d.id for d in retried] == [letters[1].id]
    back = drain_queue(rabbit_vhost.url, "mail.route")
    assert [b for b, _ in back] == [bodies[1]]
    assert "x-mailroute-reason" not in back[0][1] and back[0][1]["x-mailroute-retries"] == 1
    assert back[0][1]["x-mailroute-trace"] == "t1"
    assert len(queue.purge([letters[0].id])) == 1
    assert [d.id for d in queue.browse()] == [letters[2].id]
    assert len(queue.retry(None)) == 1
    assert queue.browse() == []


def test_queue_depths_are_read_from_rabbitmq_and_survive_a_dropped_connection(
        rabbit_vhost: Vhost) -> None:
    settings = make_settings(rabbit_vhost)
    broker = Broker(settings.broker)
    broker.declare()
    publish(broker, [Output("raw", documents.raw()) for _ in range(3)])
    reader = PassiveDeclareReader(rabbit_vhost.url)
    try:
        depths = reader(["mail.parse", "mail.parse.dead", "no.such.queue"])
        assert depths == {"mail.parse": (3, 0), "mail.parse.dead": (0, 0)}
        # The broker drops the kept connection (as after missed heartbeats): the next read
        # finds out and reconnects once instead of reporting the broker down.
        vhost = urllib.parse.quote(rabbit_vhost.name, safe="")
        wait_for(lambda: bool(management("GET", f"/api/vhosts/{vhost}/connections")),
                 "the management API to list the connection")
        for connection in management("GET", f"/api/vhosts/{vhost}/connections"):
            management("DELETE", "/api/connections/" + urllib.parse.quote(connection["name"],
                                                                           safe=""))
        assert reader(["mail.parse"]) == {"mail.parse": (3, 0)}
    finally:
        reader.close()


def test_reads_that_stop_early_leave_the_reader_usable(rabbit_vhost: Vhost) -> None:
    """Stopping a stream read with deliveries in flight makes pika reject them, which the
    broker answers by closing the connection; the reader must carry on regardless."""
    broker = Broker(make_settings(rabbit_vhost).broker)
    broker.declare()
    for _ in range(2):
        publish(broker, [Output("raw", documents.raw(b"y" * 2000)) for _ in range(100)])
    with JournalReader(rabbit_vhost.url, broker.topology) as reader:
        for _ in range(3):
            first = reader.first_retained()
            assert first is not None and first.offset == 0
            marker, at = reader.mark_end()
            assert reader.end_offset(marker, at) > 0


class PassOn:
    """A parse-like stage that hands each raw message on as a parsed one."""

    name = "parse"
    input_edge = "raw"

    def handle(self, document: dict[str, Any]) -> list[Output]:
        return [Output("parsed", documents.parsed(document["trace_id"],
                                                  message_id=document["raw"].decode()))]


def test_a_deleted_stage_queue_is_declared_again_and_the_alert_names_the_replay(
        rabbit_vhost: Vhost, engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(rabbit_vhost)
    broker = Broker(settings.broker)
    broker.declare()
    metrics = Metrics()
    stop = threading.Event()
    runner = StageRunner(PassOn(), settings, broker, metrics, stop)  # type: ignore[arg-type]
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_for(lambda: runner.is_ready, "parse consuming")
        publish(broker, [Output("raw", documents.raw(b"before@example.com"))])
        with Connection(rabbit_vhost.url) as connection:
            connection.channel().queue_delete("mail.parse")
        # Routed to the journal alone (so confirmed): not lost, but not handled either.
        publish(broker, [Output("raw", documents.raw(f"gap{i}@example.com".encode()))
                         for i in range(3)])
        wait_for(lambda: (metrics.registry.get_sample_value(
            "mailroute_stage_queue_redeclared_total", {"stage": "parse"}) or 0) == 1,
            "the queue declared again")
        wait_for(lambda: runner.is_ready, "parse consuming again")
    finally:
        stop.set()
        thread.join(timeout=30)
    alert = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT"))
    since = datetime.fromisoformat(alert.split("--since ")[1].split(" ")[0])
    # The replay the alert names hands the gap on.
    with JournalReader(rabbit_vhost.url, broker.topology, stall_seconds=3) as reader:
        replay, publisher = replayer(settings, reader, broker, engine)
        replay.run(ReplayRequest("parse", since, datetime.now(UTC) + timedelta(seconds=5)))
        publisher.close()
    refed = {Codec().decode("raw", b)["raw"]
             for b, _ in drain_queue(rabbit_vhost.url, "mail.parse")}
    assert refed >= {f"gap{i}@example.com".encode() for i in range(3)}
