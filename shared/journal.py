"""Reading the journal: the RabbitMQ stream that holds every hop's output, by time or offset.

Takes the broker URL and the topology; gives :class:`JournalReader`, whose :meth:`read`
yields :class:`JournalEntry` items (stream offset, routing key = the stage queue it went to,
publish time, headers, body) from a point in time or an offset up to an end offset.  Reads
follow RELIABILITY.md for AMQP 0-9-1 stream consumers: ``basic.qos`` with a bounded prefetch,
manual acks, ``x-stream-offset`` with a timestamp, a number, or ``first``; the reader keeps its
own position (the caller stores it).

Where a read ends is made exact with an end marker: :meth:`mark_end` appends a small marker
message (confirmed) straight to the stream and :meth:`end_offset` finds its offset, so a
replay stops at the journal's end as it was when the replay began, never waiting on a timer.
Fails with :class:`JournalError` (no journal, read stalled) or pika's connection errors.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pika

from shared.rabbit import connect_blocking
from shared.topology import Topology
from shared.transport import PUBLISHED_MS_HEADER

log = logging.getLogger(__name__)

MARKER_HEADER = "x-mailroute-journal-marker"
# Stream timestamps are per chunk and the publishers' clocks differ a little: a time-based
# start attaches this much earlier, and entries are then filtered by their own publish time.
ATTACH_SLACK = timedelta(seconds=2)
MARKER_SEARCH_BACK = timedelta(minutes=10)
FIRST_ATTEMPTS = 4
FIRST_STALL_SECONDS = 3.0


class JournalError(Exception):
    """The journal cannot be read as asked (missing, or a read stalled)."""


@dataclass(frozen=True)
class JournalEntry:
    offset: int
    routing_key: str
    published_at: datetime | None
    headers: dict[str, Any]
    body: bytes

    @property
    def is_marker(self) -> bool:
        return MARKER_HEADER in self.headers


def published_at(headers: dict[str, Any]) -> datetime | None:
    value = headers.get(PUBLISHED_MS_HEADER)
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, UTC)
    return None


class JournalReader:
    """One pika connection reading the journal stream; close it when done."""

    def __init__(self, url: str, topology: Topology, prefetch: int = 200,
                 stall_seconds: float = 60.0) -> None:
        self._topology = topology
        self._prefetch = prefetch
        self._stall = stall_seconds
        self._url = url
        self._connection = connect_blocking(url)
        self.stream = topology.journal_name
        channel = self._channel()
        try:
            channel.queue_declare(self.stream, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise JournalError(f"no journal stream {self.stream!r} on the broker "
                               f"(is broker.journal.enabled off?): {exc}") from exc
        finally:
            if channel.is_open:
                channel.close()

    def _channel(self) -> Any:
        """A new channel, on a new connection if the last read's end closed the old one."""
        if not self._connection.is_open:
            self._connection = connect_blocking(self._url)
        return self._connection.channel()

    def close(self) -> None:
        if self._connection.is_open:
            try:
                self._connection.close()
            except Exception:  # closing after an interrupted read may fail in any way
                log.debug("closing the journal connection failed", exc_info=True)

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, start: datetime | int | str, end_offset: int | None = None,
             stall_seconds: float | None = None) -> Iterator[JournalEntry]:
        """Entries from ``start`` (a time, an offset, or "first") up to ``end_offset``
        (exclusive); without an end, until nothing arrives for the stall time."""
        channel = self._channel()
        channel.basic_qos(prefetch_count=self._prefetch)
        position: Any = start
        if isinstance(start, datetime):
            position = start - ATTACH_SLACK
        arrived: deque[tuple[Any, Any, bytes]] = deque()
        # basic_consume, not pika's consume() generator: cancelling the generator nacks what
        # it holds, which a stream refuses by closing the connection.
        channel.basic_consume(self.stream, lambda _c, m, p, b: arrived.append((m, p, b)),
                              auto_ack=False, arguments={"x-stream-offset": position})
        try:
            stall = self._stall if stall_seconds is None else stall_seconds
            while True:
                deadline = time.monotonic() + stall
                while not arrived:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        if end_offset is None:
                            return
                        raise JournalError(f"journal read stalled for {stall:g}s "
                                           f"before offset {end_offset}")
                    self._connection.process_data_events(time_limit=min(remaining, 1.0))
                method, properties, body = arrived.popleft()
                channel.basic_ack(method.delivery_tag)
                headers = dict(properties.headers or {})
                offset = int(headers.get("x-stream-offset", -1))
                if end_offset is not None and offset >= end_offset:
                    return
                yield JournalEntry(offset, method.routing_key, published_at(headers),
                                   headers, bytes(body))
        finally:
            _end_stream_read(channel)

    def first_retained(self) -> JournalEntry | None:
        """The oldest entry retention has kept, or None for an empty journal.

        RabbitMQ 3.10 sometimes delivers nothing to a reader attached at "first" while
        retention is deleting that segment; attaching again a few seconds later works.
        """
        for _ in range(FIRST_ATTEMPTS):
            for entry in self.read("first", None, stall_seconds=FIRST_STALL_SECONDS):
                return entry
        return None

    def mark_end(self) -> tuple[str, datetime]:
        """Append an end marker to the journal (confirmed); gives its id and time."""
        marker = uuid.uuid4().hex
        now = datetime.now(UTC)
        channel = self._channel()
        try:
            channel.confirm_delivery()
            channel.basic_publish(
                "", self.stream, b"",
                pika.BasicProperties(delivery_mode=2, headers={
                    MARKER_HEADER: marker, PUBLISHED_MS_HEADER: int(now.timestamp() * 1000)}),
                mandatory=True)
        finally:
            if channel.is_open:
                channel.close()
        return marker, now

    def end_offset(self, marker: str, marked_at: datetime) -> int:
        """The offset of the end marker ``marker`` appended at ``marked_at``.

        The search attaches a little before ``marked_at`` (stream timestamps are the broker's
        clock); if that missed the marker (clocks more than a few seconds apart), it looks
        again from well before.
        """
        for slack, stall in ((timedelta(0), 10.0), (MARKER_SEARCH_BACK, self._stall)):
            for entry in self.read(marked_at - slack, None, stall_seconds=stall):
                if entry.headers.get(MARKER_HEADER) == marker:
                    return entry.offset
                if entry.published_at is not None and \
                        entry.published_at > marked_at + MARKER_SEARCH_BACK:
                    break  # attached after the marker: reading live traffic now
        raise JournalError(f"end marker {marker} not found in the journal")


def _end_stream_read(channel: Any) -> None:
    """Close a stream consumer's channel.  pika rejects the deliveries it holds but has not
    handed over yet when it cancels a consumer, and RabbitMQ answers a reject on a stream by
    closing the connection (540 NOT_IMPLEMENTED).  Nothing is lost by that -- a stream
    reader's position is its own -- so the closed connection is replaced on the next read."""
    try:
        if channel.is_open:
            channel.close()
    except pika.exceptions.AMQPError as exc:
        log.debug("journal read ended with the connection closed (%s); reconnecting on the "
                  "next read", exc)
