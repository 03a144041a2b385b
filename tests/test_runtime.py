"""The worker runtime's contract, run against both kombu's memory transport and RabbitMQ."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
from kombu import Connection, Queue

from shared.errors import PermanentError, TransientError
from shared.metrics import Metrics
from shared.runtime import StageRunner
from shared.schemas import Codec, Edge
from shared.settings import BrokerSettings, RetrySettings, Settings
from shared.stage import Output
from shared.transport import Broker, Envelope, Publisher, Sent
from tests import documents
from tests.broker_fixtures import Vhost, drain_queue
from tests.processes import wait_for
from tests.tcp_proxy import StallableProxy


class ScriptedStage:
    """A parse-like stage whose behaviour per message is chosen by the raw body."""

    name = "parse"
    input_edge: Edge = "raw"

    def __init__(self) -> None:
        self.calls: dict[bytes, int] = {}
        self.handled = 0
        self.slow_seconds = 0.0

    def handle(self, document: dict[str, Any]) -> list[Output]:
        body = document["raw"]
        self.calls[body] = self.calls.get(body, 0) + 1
        try:
            if body.startswith(b"permanent"):
                raise PermanentError("test-permanent", "always bad")
            if body.startswith(b"buggy"):
                raise ValueError("a bug")
            if body.startswith(b"flaky") and self.calls[body] < 3:
                raise TransientError("not yet")
            if body.startswith(b"slow"):
                time.sleep(self.slow_seconds)  # the fault under test: a long handler
            return [Output("parsed", documents.parsed(document["trace_id"],
                                                      message_id=body.decode()))]
        finally:
            self.handled += 1


@pytest.fixture(params=["memory", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    if request.param == "memory":
        prefix = f"t{id(request)}"
        yield Broker(BrokerSettings(url="memory://", prefix=prefix))
    else:
        vhost: Vhost = request.getfixturevalue("rabbit_vhost")
        yield Broker(BrokerSettings(url=vhost.url, prefix="mail", confirm_timeout=10))


def run_until(broker: Broker, bodies: list[bytes], done: Any,
              slow_seconds: float = 0.0) -> tuple[ScriptedStage, Metrics]:
    settings = replace(Settings(), broker=broker.settings,
                       retry=RetrySettings(attempts=3, initial_delay=0.01, max_delay=0.05))
    broker.declare()
    publisher = broker.publisher()
    publisher.publish([Output("raw", documents.raw(body)) for body in bodies])
    publisher.close()
    stop = threading.Event()
    stage = ScriptedStage()
    stage.slow_seconds = slow_seconds
    metrics = Metrics()
    runner = StageRunner(stage, settings, broker, metrics, stop)
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_for(lambda: done(stage, metrics), "the runner to handle the batch", timeout=60)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive(), "runner did not stop after the stop event"
    return stage, metrics


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def outputs_done(n: int) -> Any:
    return lambda stage, metrics: counter(metrics, "mailroute_stage_messages_in_total",
                                          stage="parse") >= n and stage.handled >= n


def test_every_message_is_handled_once_and_published(broker: Broker) -> None:
    bodies = [f"ok-{i}@example.com".encode() for i in range(120)]
    stage, _metrics = run_until(broker, bodies, lambda s, m: counter(
        m, "mailroute_stage_messages_out_total", stage="parse") >= 120)
    out = drain_queue(broker.settings.url, broker.topology.input_queue("route"))
    ids = sorted(json.loads(body)["email"]["message_id"] for body, _ in out)
    assert ids == sorted(b.decode() for b in bodies)
    assert drain_queue(broker.settings.url, broker.topology.input_queue("parse")) == []
    assert all(count == 1 for count in stage.calls.values())


def test_bad_messages_are_dead_lettered_with_reason_while_others_flow(broker: Broker) -> None:
    bodies = [b"permanent-1", b"good-1@x", b"buggy-1", b"flaky-1@x", b"good-2@x"]
    _, metrics = run_until(broker, bodies, lambda s, m: counter(
        m, "mailroute_stage_messages_out_total", stage="parse") >= 3 and sum(
        counter(m, "mailroute_stage_messages_dead_lettered_total", stage="parse", reason=r)
        for r in ("test-permanent", "handler-error")) >= 2)
    routed = drain_queue(broker.settings.url, broker.topology.input_queue("route"))
    assert sorted(json.loads(b)["email"]["message_id"] for b, _ in routed) == [
        "flaky-1@x", "good-1@x", "good-2@x"]
    dead = drain_queue(broker.settings.url, broker.topology.dead_queue("parse"))
    reasons = {Codec().decode("raw", body)["raw"]: headers["x-mailroute-reason"]
               for body, headers in dead}
    assert reasons == {b"permanent-1": "test-permanent", b"buggy-1": "handler-error"}
    assert counter(metrics, "mailroute_stage_messages_retried_total", stage="parse") >= 4


def test_undecodable_document_is_dead_lettered(broker: Broker) -> None:
    broker.declare()
    publisher = broker.publisher()
    publisher.publish_envelopes([Envelope(b"{not json", broker.topology.exchange_name,
                                          broker.topology.input_queue("parse"))])
    publisher.close()
    run_until(broker, [b"good@x"], lambda s, m: counter(
        m, "mailroute_stage_messages_dead_lettered_total", stage="parse",
        reason="bad-document") >= 1 and s.handled >= 1)
    dead = drain_queue(broker.settings.url, broker.topology.dead_queue("parse"))
    assert [(body, h["x-mailroute-reason"]) for body, h in dead] == [
        (b"{not json", "bad-document")]


def test_unroutable_publish_fails_instead_of_vanishing(rabbit_vhost: Vhost) -> None:
    broker = Broker(BrokerSettings(url=rabbit_vhost.url, confirm_timeout=5))
    broker.declare()
    publisher = broker.publisher()
    with pytest.raises(TransientError, match="unroutable"):
        publisher.publish_envelopes([Envelope(b"{}", broker.topology.exchange_name,
                                              "no.such.queue")])
    publisher.publish([Output("raw", documents.raw(b"after"))])  # reconnects and works
    publisher.close()
    assert len(drain_queue(broker.settings.url, broker.topology.input_queue("parse"))) == 1


def test_declare_sets_quorum_queues_dead_letter_targets_and_delivery_limit_policy(
        rabbit_vhost: Vhost) -> None:
    broker = Broker(BrokerSettings(url=rabbit_vhost.url, delivery_limit=4))
    broker.declare()
    info = rabbit_vhost.queue_info("mail.parse")
    assert info["arguments"]["x-queue-type"] == "quorum"
    assert info["arguments"]["x-dead-letter-exchange"] == "mail"
    assert info["arguments"]["x-dead-letter-routing-key"] == "mail.parse.dead"
    assert rabbit_vhost.queue_info("mail.parse.dead")["arguments"]["x-queue-type"] == "quorum"
    assert info["arguments"]["x-dead-letter-strategy"] == "at-least-once"
    [policy] = rabbit_vhost.policies()
    assert policy["definition"] == {"delivery-limit": 4}
    assert policy["pattern"] == r"^mail\.(parse|route|persist)$"


def test_handler_slower_than_three_heartbeats_keeps_the_connection_and_runs_once(
        rabbit_vhost: Vhost) -> None:
    broker = Broker(BrokerSettings(url=rabbit_vhost.url, heartbeat=1, confirm_timeout=10))
    stage, _metrics = run_until(broker, [b"slow-1@x", b"ok-after@x"], lambda s, m: counter(
        m, "mailroute_stage_messages_out_total", stage="parse") >= 2, slow_seconds=4.0)
    assert stage.calls == {b"slow-1@x": 1, b"ok-after@x": 1}
    routed = drain_queue(rabbit_vhost.url, broker.topology.input_queue("route"))
    assert sorted(json.loads(b)["email"]["message_id"] for b, _ in routed) == [
        "ok-after@x", "slow-1@x"]


def test_publisher_reconnects_after_the_broker_dropped_it_for_idleness(
        rabbit_vhost: Vhost) -> None:
    broker = Broker(BrokerSettings(url=rabbit_vhost.url, heartbeat=1, confirm_timeout=10))
    broker.declare()
    publisher = broker.publisher()
    publisher.publish([Output("raw", documents.raw(b"first"))])
    time.sleep(4)  # the fault under test: idle for several heartbeat intervals
    publisher.publish([Output("raw", documents.raw(b"second"))])
    publisher.close()
    bodies = [Codec().decode("raw", b)["raw"] for b, _ in drain_queue(
        rabbit_vhost.url, broker.topology.input_queue("parse"))]
    assert bodies == [b"first", b"second"]


def test_a_confirm_that_never_comes_times_out_and_the_next_publish_reconnects(
        rabbit_vhost: Vhost) -> None:
    direct = Broker(BrokerSettings(url=rabbit_vhost.url))
    direct.declare()
    with StallableProxy("127.0.0.1", 5672) as proxy:
        url = rabbit_vhost.url.replace(":5672/", f":{proxy.port}/")
        broker = Broker(BrokerSettings(url=url, confirm_timeout=2, heartbeat=0))
        publisher = broker.publisher()
        publisher.publish([Output("raw", documents.raw(b"before"))])
        proxy.stall()  # the link goes silent between a publish and its confirm
        with pytest.raises(TransientError, match="not confirmed within 2s"):
            publisher.publish([Output("raw", documents.raw(b"lost-confirm"))])
        proxy.resume()
        publisher.publish([Output("raw", documents.raw(b"after"))])
        publisher.close()
    bodies = [Codec().decode("raw", b)["raw"] for b, _ in drain_queue(
        rabbit_vhost.url, direct.topology.input_queue("parse"))]
    # The unconfirmed message may or may not have reached the queue (at least once); the
    # confirmed ones certainly did, and nothing hung.
    assert bodies[0] == b"before" and bodies[-1] == b"after"
    assert set(bodies) <= {b"before", b"lost-confirm", b"after"}


def test_the_broker_dead_letters_a_message_past_the_delivery_limit_policy(
        rabbit_vhost: Vhost) -> None:
    """A message that keeps coming back (a crash loop) ends in .dead, by policy alone."""
    broker = Broker(BrokerSettings(url=rabbit_vhost.url, delivery_limit=2))
    broker.declare()
    publisher = broker.publisher()
    publisher.publish([Output("raw", documents.raw(b"crash-loop"))])
    publisher.close()
    returned = 0
    with Connection(rabbit_vhost.url) as connection:
        queue = Queue(broker.topology.input_queue("parse"), no_declare=True)(
            connection.channel())
        while (message := queue.get(no_ack=False)) is not None:
            message.reject(requeue=True)  # what a worker dying mid-message amounts to
            returned += 1
    assert returned == 3  # the first delivery and two redeliveries, then the limit
    [(body, headers)] = drain_queue(rabbit_vhost.url, broker.topology.dead_queue("parse"))
    assert Codec().decode("raw", body)["raw"] == b"crash-loop"
    assert headers["x-first-death-reason"] == "delivery_limit"


class RecordingPublisher(Publisher):
    """Notes each send and each confirm wait (``events``), then does the real thing."""

    def __init__(self, broker: Broker, codec: Codec, events: list[tuple[str, int]],
                 before_first_wait: threading.Event | None = None) -> None:
        super().__init__(broker, codec)
        self.events = events
        self.sends = 0
        self.before_first_wait = before_first_wait

    def send(self, envelopes: Sequence[Envelope]) -> Sent:
        sent = super().send(envelopes)
        self.sends += 1
        self.events.append(("send", len(envelopes)))
        return sent

    def wait(self, sent: Sent) -> None:
        if self.before_first_wait is not None and sent.tags:
            # Hold the first batch's confirms until the next batch is being handled: a
            # runner that handled the next batch only after this wait would never get there.
            assert self.before_first_wait.wait(timeout=30), "next batch not handled meanwhile"
            self.before_first_wait = None
        super().wait(sent)
        self.events.append(("confirmed", len(sent.tags)))


class RecordingRunner(StageRunner):
    events: list[tuple[str, int]]

    def _ack(self, batch: list[Any]) -> None:
        self.events.append(("ack", len(batch)))
        super()._ack(batch)


def test_the_next_batch_is_handled_while_the_last_batchs_confirms_come_in(
        broker: Broker) -> None:
    """Outputs of one batch are acked only after their confirms, and meanwhile the next
    batch is already being handled (the prefetch is split between the two)."""
    events: list[tuple[str, int]] = []
    second_batch = threading.Event()
    settings = replace(Settings(), broker=replace(broker.settings, prefetch=20))
    recording = Broker(settings.broker)
    recording.publisher = lambda codec=None: RecordingPublisher(  # type: ignore[method-assign]
        recording, codec or Codec(), events, second_batch if broker.is_memory else None)
    recording.declare()
    publisher = Publisher(recording, Codec())
    bodies = [f"ok-{i}@example.com".encode() for i in range(40)]
    publisher.publish([Output("raw", documents.raw(body)) for body in bodies])
    publisher.close()
    events.clear()
    stage = ScriptedStage()
    original = stage.handle
    stop = threading.Event()
    metrics = Metrics()
    runner = RecordingRunner(stage, settings, recording, metrics, stop)
    runner.events = events

    def handle(document: dict[str, Any]) -> list[Output]:
        if stage.handled == 10:
            second_batch.set()
        events.append(("handle", 1))
        return original(document)

    stage.handle = handle  # type: ignore[method-assign]
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_for(lambda: counter(metrics, "mailroute_stage_messages_out_total",
                                 stage="parse") >= 40, "the runner to handle everything")
    finally:
        stop.set()
        thread.join(timeout=30)
    sends = [n for kind, n in events if kind == "send"]
    assert sum(sends) == 40 and max(sends) <= 10
    confirmed = acked = 0
    for kind, n in events:  # nothing is acked before its outputs are confirmed
        if kind == "confirmed":
            confirmed += n
        elif kind == "ack":
            acked += n
            assert acked <= confirmed, events
    assert acked == 40
    if broker.is_memory:  # all 40 are queued before the first read: batches overlap
        assert events.index(("handle", 1), events.index(("send", 10))) < events.index(
            ("ack", 10)), events
