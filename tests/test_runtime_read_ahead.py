"""A run of large messages goes through a worker one batch at a time (``broker.read_ahead_bytes``).

Against RabbitMQ and kombu's memory transport: with deliveries queued before the worker starts,
each bigger than the limit, none is read ahead of the one in hand (so every batch holds one),
nothing of a batch is still held when the next is handled (it was confirmed and acked first),
and every message is handled exactly once.  On RabbitMQ the bodies stay bytes (py-amqp would
decode each to a str copy).  A large delivery's body is let go while its document is handled,
and its dead letter is that document.  Before the limit, the broker's prefetch of 100
put several in one batch, and each batch was held until the next one's outputs were sent.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from shared.errors import PermanentError
from shared.metrics import Metrics
from shared.runtime import StageRunner, body_bytes
from shared.schemas import Codec, Edge
from shared.settings import BrokerSettings, RetrySettings, Settings
from shared.stage import Output
from shared.transport import Broker
from tests import documents
from tests.broker_fixtures import Vhost, drain_queue
from tests.processes import wait_for

MESSAGES = 8
RAW_BYTES = 512 * 1024


class CountingStage:
    """Parse-shaped: one routed-ready ``parsed`` output per raw message; a raw message that
    starts with ``bad`` is refused (a permanent error: dead-lettered at once)."""

    name = "parse"
    input_edge: Edge = "raw"

    def __init__(self) -> None:
        self.handled: list[bytes] = []

    def handle(self, document: dict[str, Any]) -> list[Output]:
        self.handled.append(document["raw"][:16])
        if document["raw"].startswith(b"bad"):
            raise PermanentError("test-refused", "refused by the test stage")
        return [Output("parsed", documents.parsed(document["trace_id"],
                                                  message_id=document["raw"][:16].decode()))]


class WatchedRunner(StageRunner):
    """Records each batch's body sizes, and whether an earlier batch's deliveries were still alive
    when it was handled (kombu's messages hold the bodies)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[int]] = []
        self.held_earlier: list[int] = []
        self.body_types: set[type] = set()
        self.bodies_while_handling: list[list[bool]] = []
        self._batch: list[Any] = []
        self._earlier: list[weakref.ref[Any]] = []

    def _handle_one(self, document: dict[str, Any]) -> Any:
        self.bodies_while_handling.append([m.body is not None for m in self._batch])
        return super()._handle_one(document)

    def _handle_batch(self, batch: list[Any]) -> Any:
        self._batch = batch
        gc.collect()
        self.held_earlier.append(sum(ref() is not None for ref in self._earlier))
        self.batches.append([body_bytes([message]) for message in batch])
        self.body_types.update(type(message.body) for message in batch)
        self._earlier += [weakref.ref(message) for message in batch]
        return super()._handle_batch(batch)


@pytest.fixture(params=["memory", "rabbitmq"])
def broker_settings(request: pytest.FixtureRequest) -> Iterator[BrokerSettings]:
    if request.param == "memory":
        yield BrokerSettings(url="memory://", prefix=f"t{id(request)}")
    else:
        vhost: Vhost = request.getfixturevalue("rabbit_vhost")
        yield BrokerSettings(url=vhost.url, prefix="mail", confirm_timeout=10)


def run_worker(broker_settings: BrokerSettings, inputs: list[dict[str, Any]],
               limit: int) -> tuple[Broker, CountingStage, WatchedRunner]:
    broker = Broker(replace(broker_settings, prefetch=100, read_ahead_bytes=limit))
    broker.declare()
    publisher = broker.publisher()
    publisher.publish([Output("raw", document) for document in inputs])
    publisher.close()

    settings = replace(Settings(), broker=broker.settings,
                       retry=RetrySettings(attempts=3, initial_delay=0.01, max_delay=0.05))
    stage = CountingStage()
    stop = threading.Event()
    runner = WatchedRunner(stage, settings, broker, Metrics(), stop)
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_for(lambda: len(stage.handled) >= len(inputs), "every message to be handled",
                 timeout=60)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    return broker, stage, runner


def test_large_messages_are_read_and_settled_one_batch_at_a_time(
        broker_settings: BrokerSettings) -> None:
    bodies = [f"big-{i:04d}@example".encode().ljust(RAW_BYTES, b"x") for i in range(MESSAGES)]
    limit = RAW_BYTES  # each delivery is bigger: the raw message in base64, in JSON
    broker, stage, runner = run_worker(
        broker_settings, [documents.raw(body) for body in bodies], limit)

    assert sorted(stage.handled) == sorted(body[:16] for body in bodies)
    assert all(size > limit for batch in runner.batches for size in batch)
    assert [len(batch) for batch in runner.batches] == [1] * MESSAGES, runner.batches
    assert runner.held_earlier == [0] * len(runner.batches), runner.held_earlier
    if not broker.is_memory:
        assert runner.body_types == {bytes}


def test_a_large_body_is_let_go_while_handled_and_its_dead_letter_is_its_document(
        broker_settings: BrokerSettings) -> None:
    bad = documents.raw(b"bad-large@example".ljust(RAW_BYTES, b"y"))
    good = documents.raw(b"good-small@example")
    broker, stage, runner = run_worker(broker_settings, [bad, good], RAW_BYTES)

    assert sorted(stage.handled) == [b"bad-large@exampl", b"good-small@examp"]
    # While handled, the large delivery's body is gone (the document holds the same); the
    # small one's is kept.
    assert sorted(runner.bodies_while_handling) == [[False], [True]]
    dead = drain_queue(broker.settings.url, broker.topology.dead_queue("parse"))
    assert len(dead) == 1
    body, headers = dead[0]
    assert headers["x-mailroute-reason"] == "test-refused"
    assert Codec().decode("raw", body) == Codec().decode("raw", Codec().encode("raw", bad))
    routed = drain_queue(broker.settings.url, broker.topology.input_queue("route"))
    assert len(routed) == 1
