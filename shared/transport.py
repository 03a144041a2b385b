"""Connections to the broker, and a publisher whose confirms are pipelined.

Takes the broker settings; gives :class:`Broker` (connections, topology declaration) and
:class:`Publisher`, whose :meth:`Publisher.publish` sends a whole batch, then waits once for
every confirm (PERFORMANCE.md: waiting for each confirm in turn halves a pipeline);
:meth:`Publisher.send` (or :meth:`Publisher.send_outputs` for stage outputs) and
:meth:`Publisher.wait` are the two halves, so that a worker can handle its next batch while the
confirms of the last one come in; stage outputs are logged as published once confirmed.  Each
message is published ``mandatory``, so an unroutable one comes back instead of vanishing.
Fails with :class:`~shared.errors.TransientError` when any message is nacked, returned, or not
confirmed within ``confirm_timeout``; the caller has then acked nothing and advanced nothing,
so a retry can only duplicate, never lose.  The connection is dropped on such a failure and
made again on the next publish.  Every message gets its publish time in the header
``x-mailroute-published-ms`` (the journal's time axis for ``mailroute replay``).
A batch is written with the socket corked (Linux ``TCP_CORK``): its frames leave in full
segments, not one small segment per message, which cut RabbitMQ's CPU per message by a
third in the pipeline benchmark (bench/README.md).

kombu's ``memory://`` transport (the embedded default) has no confirms; a publish there is
done when the call returns.  Publishing and consuming use separate connections (kombu
delivers re-entrantly on a connection that waits for a confirm).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from amqp.transport import TCPTransport
from kombu import Connection

from shared.amqp_frames import publish_batch
from shared.errors import TransientError
from shared.logs import traced
from shared.schemas import Codec
from shared.settings import BrokerSettings
from shared.stage import Output
from shared.topology import Topology, apply_delivery_limit_policy

log = logging.getLogger(__name__)

# Wall-clock publish time in ms: the journal's time axis for `mailroute replay --since/--until`.
PUBLISHED_MS_HEADER = "x-mailroute-published-ms"
# Exceptions that mean "the connection or channel is gone"; the runtime reconnects on them.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, socket.timeout, EOFError)


def _connection_errors(connection: Connection) -> tuple[type[BaseException], ...]:
    return (*CONNECTION_ERRORS, *connection.connection_errors, *connection.channel_errors)


def discard(connection: Connection, graceful: bool) -> None:
    """Close a connection; a broken one without the close handshake, which could hang."""
    try:
        if graceful:
            connection.release()
        else:
            connection.collect()
    except Exception:  # closing a broken connection may fail in any way
        log.debug("error while closing a broker connection", exc_info=True)


def send_heartbeat(connection: Connection | None) -> None:
    """Send a heartbeat frame if ``connection`` is an open AMQP connection with heartbeats on.

    For a thread other than the connection's user, while that one is not using it
    (:mod:`shared.keepalive`); a broken connection is left for its user to find."""
    try:
        if connection is None or not connection.connected:
            return
        client = connection.connection  # py-amqp's; the memory transport has no heartbeats
        if getattr(client, "heartbeat", 0):
            client.send_heartbeat()
    except Exception:  # the socket is broken: its own user's next read or write says so
        log.debug("heartbeat not sent", exc_info=True)


def nothing_to_read(connection: Connection | None) -> bool:
    """True when a plain-TCP AMQP connection has no frame waiting: py-amqp holds no bytes of
    one and the socket is not readable (a closed socket is: its reader finds out).  Asking
    costs one poll(2) (not select(2), which refuses descriptors above 1023); a drain that
    finds nothing raises a timeout through py-amqp and kombu, about 10 us of CPU, several
    times per batch at low rates.  False (so: go and read) wherever that cannot be told:
    TLS, whose library may hold decrypted bytes, the memory transport, or no connection
    made yet (kombu's ``connection`` attribute would make one)."""
    transport: Any = getattr(getattr(connection, "_connection", None), "transport", None)
    if type(transport) is not TCPTransport:
        return False
    # py-amqp internals, read defensively: without them, drain as before
    buffered: bytes = getattr(transport, "_read_buffer", b"?")
    sock = getattr(transport, "sock", None)
    if buffered or sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):  # closed or broken: let the read say so
        return False


@dataclass
class Envelope:
    """A message ready to publish: body bytes, where to, and headers."""

    body: bytes
    exchange: str
    routing_key: str
    headers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sent:
    """Messages published on ``channel`` whose confirms :meth:`Publisher.wait` waits for."""

    channel: Any
    tags: list[int]
    outputs: Sequence[Output] = ()  # stage outputs, logged as published once confirmed


class Broker:
    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.topology = Topology(settings.prefix)
        self.is_memory = settings.url.startswith("memory://")

    def connect(self) -> Connection:
        options: dict[str, Any] = {}
        if self.is_memory:
            options["polling_interval"] = 0.005
        connection = Connection(self.settings.url, heartbeat=self.settings.heartbeat,
                                transport_options=options, connect_timeout=10)
        connection.connect()
        return connection

    def declare(self) -> None:
        """Declare exchanges and queues and set the delivery-limit policy (idempotent)."""
        with self.connect() as connection:
            # The in-process transport has no streams: the embedded default has no journal.
            self.topology.declare(connection,
                                  None if self.is_memory else self.settings.journal)
        if not self.is_memory:
            apply_delivery_limit_policy(self.topology, self.settings.url,
                                        self.settings.management_url,
                                        self.settings.delivery_limit, log)

    def publisher(self, codec: Codec | None = None) -> Publisher:
        return Publisher(self, codec or Codec())


class Publisher:
    """Publishes batches with pipelined confirms; one instance per thread."""

    def __init__(self, broker: Broker, codec: Codec) -> None:
        self._broker = broker
        self._codec = codec
        self._connection: Connection | None = None
        self._channel: Any = None
        self._next_tag = 1
        self._acked: set[int] = set()
        self._acked_upto = 0
        self._failed: dict[int, str] = {}

    # -- connection handling -------------------------------------------------------------
    def _ensure(self) -> None:
        if self._channel is not None:
            return
        connection = self._broker.connect()
        channel = connection.channel()
        if not self._broker.is_memory:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
        self._connection, self._channel = connection, channel
        self._next_tag = 1
        self._acked.clear()
        self._acked_upto = 0
        self._failed.clear()

    def close(self, graceful: bool = True) -> None:
        connection, self._connection = self._connection, None
        self._channel = None
        if connection is not None:
            discard(connection, graceful)

    def keepalive(self) -> None:
        """Read pending frames and send a heartbeat if one is due (call while busy)."""
        if self._connection is None or self._broker.is_memory:
            return
        try:
            if not nothing_to_read(self._connection):
                with contextlib.suppress(TimeoutError):
                    self._connection.drain_events(timeout=0)
            self._connection.heartbeat_check()
        except _connection_errors(self._connection) as exc:
            log.info("publisher connection lost while idle (%s); reconnecting when needed",
                     exc)
            self.close(graceful=False)

    def send_heartbeat(self) -> None:
        """A heartbeat frame on the connection, if there is one (:func:`send_heartbeat`)."""
        send_heartbeat(self._connection)

    # -- confirm bookkeeping ---------------------------------------------------------------
    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._acked_upto = max(self._acked_upto, delivery_tag)
        else:
            self._acked.add(delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        first = self._acked_upto + 1 if multiple else delivery_tag
        for tag in range(first, delivery_tag + 1):
            self._failed[tag] = "nacked by the broker"
        self._on_ack(delivery_tag, multiple)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        tag = (message.headers or {}).get("x-mailroute-publish-tag") if message else None
        if isinstance(tag, int):
            self._failed[tag] = f"unroutable: {exchange}/{routing_key} ({exc})"

    def _confirmed(self, tag: int) -> bool:
        return tag <= self._acked_upto or tag in self._acked

    # -- publishing ----------------------------------------------------------------------
    def publish(self, outputs: Sequence[Output],
                headers: Mapping[str, Any] | None = None) -> None:
        """Encode stage outputs and publish them all to their stage queues, confirmed."""
        self.wait(self.send_outputs(outputs, headers))

    def send_outputs(self, outputs: Sequence[Output],
                     headers: Mapping[str, Any] | None = None) -> Sent:
        """Encode stage outputs and publish them without waiting (:meth:`wait` for them)."""
        topology = self._broker.topology
        envelopes = [
            Envelope(self._codec.encode(out.edge, out.document), topology.exchange_name,
                     topology.queue_for_edge(out.edge),
                     {**(headers or {}), "x-mailroute-trace": out.document.get("trace_id", "")})
            for out in outputs
        ]
        return replace(self.send(envelopes), outputs=outputs)

    def publish_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Publish and wait for every confirm (``send`` then ``wait``)."""
        self.wait(self.send(envelopes))

    def send(self, envelopes: Sequence[Envelope]) -> Sent:
        """Publish without waiting for the confirms; :meth:`wait` for them before acting on
        them.  Several batches may be in flight; each ``wait`` covers its own."""
        if not envelopes:
            return Sent(None, [])
        # An idle connection may have been closed by the broker (missed heartbeats): find
        # out now, before publishing into it, and reconnect instead of failing the batch.
        self.keepalive()
        with self._failing_publish():
            self._ensure()
            channel = self._channel
            first = self._next_tag
            self._next_tag += len(envelopes)
            tags = list(range(first, self._next_tag))
            published_ms = int(time.time() * 1000)
            messages = [(envelope.body, envelope.exchange, envelope.routing_key,
                         {**envelope.headers, "x-mailroute-publish-tag": tag,
                          PUBLISHED_MS_HEADER: published_ms})
                        for tag, envelope in zip(tags, envelopes, strict=True)]
            if self._broker.is_memory:
                for body, exchange, routing_key, headers in messages:
                    channel.basic_publish(channel.prepare_message(
                        body, 0, "application/json", "utf-8", headers, {"delivery_mode": 2}),
                        exchange=exchange, routing_key=routing_key, mandatory=True)
            else:
                with corked(self._connection):
                    publish_batch(channel, messages, self._broker.settings.confirm_timeout)
            return Sent(channel, tags)

    def wait(self, sent: Sent) -> None:
        """Wait until everything ``sent`` is confirmed; TransientError if any is not."""
        if sent.tags and not self._broker.is_memory:
            with self._failing_publish():
                if sent.channel is not self._channel:
                    raise TransientError("the publisher's connection was lost before the "
                                         f"confirms of {len(sent.tags)} messages came")
                self._wait_for_confirms(sent.tags)
        topology = self._broker.topology
        for out in sent.outputs:  # ingest's outputs: the first line of each email's trace
            source = out.document.get("source") or {}
            log.info("published %s to %s", out.edge, topology.queue_for_edge(out.edge),
                     extra=traced(out.document.get("trace_id"), edge=out.edge,
                                  mailbox=source.get("mailbox"), uid=source.get("uid")))

    @contextlib.contextmanager
    def _failing_publish(self) -> Iterator[None]:
        """On any failure drop the connection; connection errors become TransientError,
        bugs stay bugs."""
        try:
            yield
        except Exception as exc:
            connection = self._connection
            self.close(graceful=False)
            if isinstance(exc, TransientError):
                raise
            if connection is None or isinstance(exc, _connection_errors(connection)):
                raise TransientError(f"publish failed: {exc}") from exc
            raise

    def _wait_for_confirms(self, tags: list[int]) -> None:
        assert self._connection is not None
        deadline = time.monotonic() + self._broker.settings.confirm_timeout
        while not all(self._confirmed(t) for t in tags):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransientError(
                    f"{sum(not self._confirmed(t) for t in tags)} of {len(tags)} messages not "
                    f"confirmed within {self._broker.settings.confirm_timeout:g}s")
            try:
                self._connection.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
        failures = [self._failed.pop(t) for t in tags if t in self._failed]
        for tag in tags:
            self._acked.discard(tag)
        if failures:
            raise TransientError(f"{len(failures)} of {len(tags)} not accepted: {failures[0]}")


@contextlib.contextmanager
def corked(connection: Any) -> Iterator[None]:
    """Hold back partial TCP segments of ``connection`` (a kombu or py-amqp connection) while
    the block writes; uncorking sends what is held.  py-amqp writes every message with its
    own ``sendall`` on a ``TCP_NODELAY`` socket, so without this each one leaves as its own
    segment and the broker wakes up and reads once per message.  A no-op where there is no
    ``TCP_CORK`` (not Linux) or no TCP socket (the memory transport)."""
    sock = _tcp_socket(connection)
    cork = getattr(socket, "TCP_CORK", None)
    if sock is None or cork is None:
        yield
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    except OSError:
        yield  # a socket that is already broken fails the publish itself
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)


def _tcp_socket(connection: Any) -> socket.socket | None:
    amqp_connection = getattr(connection, "connection", connection)  # kombu wraps py-amqp
    sock = getattr(getattr(amqp_connection, "transport", None), "sock", None)
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        return sock
    return None
