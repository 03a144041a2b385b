"""The worker runtime: consume, decode, handle, publish confirmed, then ack.

Takes a :class:`~shared.stage.Stage`, the settings, a :class:`~shared.transport.Broker`, the
process's :class:`~shared.metrics.Metrics` and a stop event; :meth:`StageRunner.run` consumes
the stage's input queue until the event is set.  Deliveries that have already arrived form a
batch (no timer: PERFORMANCE.md shows a timer doubles the median latency; at most half the
prefetch, so that the broker can send the next batch meanwhile); the batch is handled on
this thread, while a helper thread sends both connections' heartbeats should the handler
outlast a heartbeat interval (:mod:`shared.keepalive`); its outputs and dead letters are
then published at once, and only then does this thread wait for the confirms of the
previous batch's outputs (which came in meanwhile) and owe that batch's ack; this one is
finished the same way after the next.  Deliveries are read ahead only while they hold fewer
than ``broker.read_ahead_bytes`` of bodies, and a batch that big is settled (confirmed and
acked) before the next is read: a run of large messages goes through one at a time, with
nothing of the one before still held, instead of a prefetch's worth in memory at once (the
rest waits in the broker).  Owed acks go out together (:class:`OwedAcks`): a
quorum queue logs each ack, so at a few messages per batch one ack per batch cost the
broker a quarter of its CPU (bench/README.md).  So no input is acked before its outputs are
confirmed (or, for persist, committed), and a crash anywhere before the ack redelivers,
never loses.

Failure handling, per message: a document that does not decode, or a ``PermanentError``,
goes to the stage's dead-letter queue at once with the reason in its headers;
a ``TransientError`` (the database or a server is down, not the message's fault) is retried
with capped, jittered backoff for as long as it lasts; any other exception is retried
``retry.attempts`` times and then dead-lettered as ``handler-error``.  A message redelivered
more than ``delivery_limit`` times (a crash loop) is dead-lettered as ``delivery-limit``, as the
broker's own policy would.  A dead letter is the delivery's body as it came, except for a body
of ``read_ahead_bytes`` or more, which is let go once decoded: its dead letter is the decoded
document encoded again (the same content).  A lost connection is re-made with backoff;
unacked deliveries return to the queue by themselves.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from amqp.exceptions import NotFound
from kombu import Connection, Consumer, Queue
from kombu.message import Message

from shared.errors import PermanentError, TransientError
from shared.keepalive import HeartbeatsWhileBusy
from shared.logs import one_line, traced
from shared.metrics import Metrics
from shared.schemas import Codec
from shared.settings import RetrySettings, Settings
from shared.stage import BatchStage, Output, Stage
from shared.transport import (
    Broker,
    Envelope,
    Publisher,
    Sent,
    discard,
    nothing_to_read,
    send_heartbeat,
)

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 0.5
# A finished batch's ack waits up to this long for later batches to share its frame (fewer
# settle commands in each quorum queue's log); a full batch's worth is acked at once.
ACK_DELAY_SECONDS = 0.05
Delivery = TypeVar("Delivery")  # kombu's Message in the runtime; py-amqp's in bench/chain.py


class Stopping(Exception):
    """The stop event was set while a message waited for a retry; it is left unacked."""


@dataclass
class Handled:
    outputs: list[Output]


@dataclass
class Dead:
    reason: str
    detail: str
    # The decoded input, when its delivery's body was let go (see _let_go_of_large_body)
    document: dict[str, Any] | None = None


Result = Handled | Dead


class OwedAcks(Generic[Delivery]):
    """Deliveries whose outputs are confirmed, acked together: once a full batch's worth is
    owed, or ``ACK_DELAY_SECONDS`` after the first; on AMQP in one frame (``multiple``: every
    earlier delivery is finished too, since batches finish in order).  An ack that waits
    delays no mail, only the broker's bookkeeping; a crash before it redelivers, as it would
    before any ack."""

    def __init__(self, ack: Callable[[list[Delivery]], None], every: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ack = ack
        self._every = every
        self._clock = clock
        self._owed: list[Delivery] = []
        self._due = 0.0

    def owe(self, batch: list[Delivery]) -> None:
        if not self._owed:
            self._due = self._clock() + ACK_DELAY_SECONDS
        self._owed.extend(batch)
        if len(self._owed) >= self._every:
            self.pay()

    def seconds_left(self, longest: float) -> float:
        """How long the caller may wait before :meth:`pay_if_due` must be called."""
        if not self._owed:
            return longest
        return min(longest, max(0.0, self._due - self._clock()))

    def pay_if_due(self) -> None:
        if self._owed and self._clock() >= self._due:
            self.pay()

    def pay(self) -> None:
        if self._owed:
            owed, self._owed = self._owed, []
            self._ack(owed)


@dataclass
class _Published:
    """A handled batch whose outputs are published; acked once they are confirmed."""

    batch: list[Message]
    results: list[Result]
    sent: Sent


def backoff_delay(retry: RetrySettings, attempt: int, rng: Callable[[], float]) -> float:
    """Capped exponential backoff with jitter: between half and all of the capped delay."""
    capped = min(retry.max_delay, retry.initial_delay * (2 ** max(0, attempt - 1)))
    return capped * (0.5 + rng() / 2)


class StageRunner:
    def __init__(self, stage: Stage, settings: Settings, broker: Broker, metrics: Metrics,
                 stop: threading.Event, codec: Codec | None = None) -> None:
        self.stage = stage
        self.settings = settings
        self.broker = broker
        self.metrics = metrics
        self.stop = stop
        self.codec = codec or Codec()
        self.queue_name = broker.topology.input_queue(stage.name)
        self._rng = random.random
        self._ready_gauge = metrics.ready.labels(stage=stage.name)
        self._messages_in = metrics.messages_in.labels(stage=stage.name)
        self._messages_out = metrics.messages_out.labels(stage=stage.name)
        self._processing_seconds = metrics.processing_seconds.labels(stage=stage.name)
        # Two batches share the prefetch window: one waiting for its confirms, one being
        # handled; so the broker always has room to send the next deliveries.
        self._batch_limit = max(1, settings.broker.prefetch // 2)
        # Series exist from the start at 0, so "nothing processed for hours" can be alerted on.
        for counter in (metrics.messages_in, metrics.messages_out, metrics.messages_retried):
            counter.labels(stage=stage.name)
        self._ready = False
        self._consumed_since_connect = False
        self._lost_at: datetime | None = None  # when consuming last failed

    @property
    def is_ready(self) -> bool:
        """Connected and consuming (what /readyz reports)."""
        return self._ready

    def _set_ready(self, ready: bool) -> None:
        self._ready = ready
        self._ready_gauge.set(1 if ready else 0)

    # -- connection loop -----------------------------------------------------------------
    def run(self) -> None:
        attempt = 0
        while not self.stop.is_set():
            try:
                self._consume_until_stopped()
                attempt = 0
            except (Stopping, KeyboardInterrupt):
                break
            except Exception as exc:
                self._lost_at = self._lost_at or datetime.now(UTC)
                # A connection that worked for a while starts the backoff afresh.
                attempt = 1 if self._consumed_since_connect else attempt + 1
                delay = backoff_delay(self.settings.retry, attempt, self._rng)
                log.warning("%s: broker connection failed (%s); reconnecting in %.1fs",
                            self.stage.name, exc, delay)
                self.stop.wait(delay)

    def _consume_until_stopped(self) -> None:
        connection = self.broker.connect()
        publisher = self.broker.publisher(self.codec)
        pending: list[Message] = []
        graceful = False
        try:
            if not self.broker.is_memory:
                self._declare_if_missing(connection)
            channel = connection.channel()
            if not self.broker.is_memory:
                # py-amqp decodes every body to str by default: a copy of each message, which
                # the codec does not need (orjson reads bytes); 45 MB more for a 25 MB file
                channel.auto_decode = False
            consumer = Consumer(channel, queues=[Queue(self.queue_name, no_declare=True)],
                                on_message=pending.append, no_ack=False,
                                prefetch_count=self.settings.broker.prefetch)
            consumer.consume()
            self._lost_at = None
            self._set_ready(True)
            self._consumed_since_connect = False
            log.info("%s: consuming %s", self.stage.name, self.queue_name)
            owed = OwedAcks(self._ack, 1 if self.broker.is_memory else self._batch_limit)
            with HeartbeatsWhileBusy(lambda: self._beat(connection, publisher),
                                     KEEPALIVE_SECONDS, f"{self.stage.name}-keepalive") as beats:
                inflight: _Published | None = None
                while not self.stop.is_set():
                    self._take_arrived(connection, pending)
                    if pending:
                        inflight = self._process_next(pending, beats, publisher, inflight,
                                                      owed)
                        self._consumed_since_connect = True
                    elif inflight is not None:
                        self._finish(inflight, publisher, owed)
                        inflight = None
                    else:
                        self._poll(connection, owed.seconds_left(0.5))
                        self._heartbeat(connection, publisher)
                    owed.pay_if_due()
                if inflight is not None:
                    self._finish(inflight, publisher, owed)
                owed.pay()
            graceful = True
        finally:
            self._set_ready(False)
            publisher.close(graceful)
            discard(connection, graceful)

    def _declare_if_missing(self, connection: Connection) -> None:
        """Declare the topology again if the input queue is gone, and say what to replay.

        Deleting a stage queue cancels its consumers; the stage before keeps publishing, and its
        messages, still routed to the journal, are confirmed and acked there: not lost, but not
        handled.  The journal has them, so the alert names the replay that hands them on.
        """
        channel = connection.channel()
        try:
            channel.queue_declare(queue=self.queue_name, passive=True)
            return
        except NotFound:
            pass  # the broker closed this channel
        self.broker.declare()
        since = (self._lost_at or datetime.now(UTC)) - timedelta(minutes=1)
        self.metrics.queue_redeclared.labels(stage=self.stage.name).inc()
        log.error("ALERT %s: queue %s was missing (deleted?) and is declared again; what was "
                  "published to it meanwhile is only in the journal: mailroute replay "
                  "--stage %s --since %s (earlier still for a backlog it held)",
                  self.stage.name, self.queue_name, self.stage.name,
                  since.isoformat(timespec="seconds"))

    def _poll(self, connection: Connection, timeout: float) -> None:
        # kombu's virtual (memory) transport treats timeout=0 as "wait forever"
        if self.broker.is_memory:
            timeout = max(timeout, 0.001)
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=timeout)

    def _take_arrived(self, connection: Connection, pending: list[Message]) -> None:
        """Read deliveries that are already here, without waiting: up to the prefetch, and
        while they hold fewer than ``read_ahead_bytes`` of bodies (what is not read waits in
        the socket and the broker, which TCP's flow control holds back)."""
        held = body_bytes(pending)
        while (len(pending) < self.settings.broker.prefetch
               and held < self.settings.broker.read_ahead_bytes):
            if nothing_to_read(connection):
                return
            before = len(pending)
            self._poll(connection, 0)
            if len(pending) == before:
                return
            held += body_bytes(pending[before:])

    def _heartbeat(self, connection: Connection, publisher: Publisher) -> None:
        if not self.broker.is_memory:
            connection.heartbeat_check()
        publisher.keepalive()

    def _beat(self, connection: Connection, publisher: Publisher) -> None:
        """Heartbeats only, from the keepalive thread while a handler runs: no reads, so no
        check for the broker's heartbeats, which the consuming thread reads afterwards."""
        if not self.broker.is_memory:
            send_heartbeat(connection)
            publisher.send_heartbeat()

    # -- one batch -----------------------------------------------------------------------
    def _process_next(self, pending: list[Message], beats: HeartbeatsWhileBusy,
                      publisher: Publisher, inflight: _Published | None,
                      owed: OwedAcks[Message]) -> _Published | None:
        """Handle and publish the next batch of ``pending``; gives it, to be finished after
        the next, unless it holds ``read_ahead_bytes`` or more: then it is settled now, so
        that nothing of it is in memory while the next is read and handled."""
        batch = pending[:self._batch_limit]
        del pending[:len(batch)]
        size = body_bytes(batch)  # before handling, which lets go of large bodies
        published = self._process(batch, beats, publisher, inflight, owed)
        if size < self.settings.broker.read_ahead_bytes:
            return published
        self._finish(published, publisher, owed)
        owed.pay()
        return None

    def _process(self, batch: list[Message], beats: HeartbeatsWhileBusy, publisher: Publisher,
                 inflight: _Published | None, owed: OwedAcks[Message]) -> _Published:
        """Handle ``batch`` and publish its outputs; then finish the previous batch (its
        confirms came in meanwhile) and owe its ack.  This batch's confirms are waited for
        by the next call.  Publishing before waiting for the previous confirms keeps a slow
        confirm from holding this batch's mail back from the next stage; the previous batch
        is still acked only after its own outputs are confirmed (if they never are, both
        batches are redelivered, and this one's outputs are published again: at least once,
        never lost)."""
        self._messages_in.inc(len(batch))
        started = time.perf_counter()
        with beats.busy():
            results = self._handle_batch(batch)
        elapsed = time.perf_counter() - started
        for _ in batch:
            self._processing_seconds.observe(elapsed / len(batch))
        envelopes: list[Envelope] = []
        topology = self.broker.topology
        for message, result in zip(batch, results, strict=True):
            if isinstance(result, Handled):
                for out in result.outputs:
                    envelopes.append(Envelope(
                        self.codec.encode(out.edge, out.document), topology.exchange_name,
                        topology.queue_for_edge(out.edge),
                        {"x-mailroute-trace": out.document.get("trace_id", "")}))
            else:
                envelopes.append(self._dead_letter(message, result))
        sent = publisher.send(envelopes)
        if inflight is not None:
            self._finish(inflight, publisher, owed)
        return _Published(batch, results, sent)

    def _finish(self, published: _Published, publisher: Publisher,
                owed: OwedAcks[Message]) -> None:
        """Wait for a batch's confirms, then owe its ack and count what became of it."""
        publisher.wait(published.sent)
        batch, results = published.batch, published.results
        owed.owe(batch)
        logging_info = log.isEnabledFor(logging.INFO)
        for message, result in zip(batch, results, strict=True):
            if isinstance(result, Handled):
                self._messages_out.inc(len(result.outputs))
                if logging_info:
                    log.info("%s: handled, %d output(s)", self.stage.name, len(result.outputs),
                             extra=traced(_header(message, "x-mailroute-trace"),
                                          stage=self.stage.name, outcome="handled"))
            else:
                trace = _header(message, "x-mailroute-trace")
                self.metrics.messages_dead.labels(stage=self.stage.name,
                                                  reason=result.reason).inc()
                log.warning("%s: dead-lettered %s: %s: %s", self.stage.name,
                            trace or "?", result.reason, one_line(result.detail),
                            extra=traced(trace, stage=self.stage.name, outcome="dead-lettered",
                                         reason=result.reason))

    def _ack(self, batch: list[Message]) -> None:
        """Ack these deliveries; on AMQP with one frame (every earlier delivery is acked)."""
        if self.broker.is_memory:
            for message in batch:
                message.ack()
            return
        last = max(message.delivery_tag for message in batch)
        batch[0].channel.basic_ack(last, multiple=True)

    def _dead_letter(self, message: Message, dead: Dead) -> Envelope:
        stage = self.stage.name
        headers = dict(message.headers or {})
        headers.update({
            "x-mailroute-stage": stage,
            "x-mailroute-reason": dead.reason,
            "x-mailroute-detail": one_line(dead.detail)[:2000],
            "x-mailroute-attempts": _delivery_count(message) + 1,
            "x-mailroute-failed-at": datetime.now(UTC).isoformat(),
        })
        if message.body is None and dead.document is not None:
            body = self.codec.encode(self.stage.input_edge, dead.document)
        elif isinstance(message.body, bytes):
            body = message.body
        else:
            body = str(message.body).encode()
        return Envelope(body, self.broker.topology.exchange_name,
                        self.broker.topology.dead_queue(stage), headers)

    # -- handling (no connection is used here) -------------------------------------------
    def _handle_batch(self, batch: list[Message]) -> list[Result]:
        results: list[Result | None] = [None] * len(batch)
        documents: list[tuple[int, dict[str, Any]]] = []
        for i, message in enumerate(batch):
            if _delivery_count(message) >= self.settings.broker.delivery_limit:
                results[i] = Dead("delivery-limit", f"delivered {_delivery_count(message)} "
                                  f"times without being handled (worker crash loop?)")
                continue
            try:
                documents.append((i, self.codec.decode(self.stage.input_edge, message.body)))
            except PermanentError as exc:
                results[i] = Dead(exc.reason, exc.detail)
                continue
            self._let_go_of_large_body(message)
        if len(documents) > 1 and isinstance(self.stage, BatchStage):
            batched = self._try_whole_batch([doc for _, doc in documents])
            if batched is not None:
                for (i, document), outputs in zip(documents, batched, strict=True):
                    results[i] = Handled(outputs)
                    if not outputs:
                        self._observe_end_to_end(document)
                documents = []
        for i, document in documents:
            result = self._handle_one(document)
            if batch[i].body is None and isinstance(result, Dead):
                result.document = document  # its body was let go: the dead letter is this
            results[i] = result
        return [r if r is not None else Dead("internal", "no result") for r in results]

    def _let_go_of_large_body(self, message: Message) -> None:
        """Drop a large delivery's body once it is decoded: the document holds the same, and
        a dead letter is then encoded from the document (the same content, not the same
        bytes).  The body would otherwise stay in memory beside the document through the
        whole handling: 45 MB for a mail with a 25 MB attachment, a third of parse's peak."""
        if body_bytes([message]) >= self.settings.broker.read_ahead_bytes:
            message.body = None

    def _try_whole_batch(self, documents: list[dict[str, Any]]) -> list[list[Output]] | None:
        """One call for the batch; None means: fall back to one message at a time."""
        assert isinstance(self.stage, BatchStage)
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.stage.handle_batch(documents)
            except TransientError as exc:
                self._wait_before_retry(attempt, exc)
            except Exception as exc:
                log.info("%s: batch of %d failed (%s); handling one by one",
                         self.stage.name, len(documents), exc)
                return None

    def _handle_one(self, document: dict[str, Any]) -> Result:
        attempt = 0
        while True:
            attempt += 1
            try:
                outputs = self.stage.handle(document)
                if not outputs:
                    self._observe_end_to_end(document)
                return Handled(outputs)
            except PermanentError as exc:
                return Dead(exc.reason, exc.detail)
            except TransientError as exc:
                self._wait_before_retry(attempt, exc, document.get("trace_id"))
            except Exception as exc:
                if attempt >= self.settings.retry.attempts:
                    log.exception("%s: handler failed %d times", self.stage.name, attempt,
                                  extra=traced(document.get("trace_id"), stage=self.stage.name))
                    return Dead("handler-error", f"{type(exc).__name__}: {exc}")
                self._wait_before_retry(attempt, exc, document.get("trace_id"))

    def _wait_before_retry(self, attempt: int, exc: BaseException,
                           trace: str | None = None) -> None:
        self.metrics.messages_retried.labels(stage=self.stage.name).inc()
        delay = backoff_delay(self.settings.retry, attempt, self._rng)
        log.warning("%s: attempt %d failed (%s); retrying in %.2fs", self.stage.name, attempt,
                    one_line(str(exc)), delay, extra=traced(trace, stage=self.stage.name))
        if self.stop.wait(delay):
            raise Stopping()

    def _observe_end_to_end(self, document: dict[str, Any]) -> None:
        received = document.get("source", {}).get("received_at")
        if isinstance(received, datetime):
            seconds = (datetime.now(UTC) - received).total_seconds()
            self.metrics.end_to_end_seconds.observe(max(0.0, seconds))


def body_bytes(messages: list[Message]) -> int:
    return sum(len(message.body or b"") for message in messages)


def _delivery_count(message: Message) -> int:
    value = (message.headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


def _header(message: Message, name: str) -> str:
    value = (message.headers or {}).get(name, "")
    return value if isinstance(value, str) else str(value)

