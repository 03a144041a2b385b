"""Queue depth and dead-letter depth per queue, read from RabbitMQ when Prometheus scrapes.

Takes the broker settings; gives :class:`QueueDepthCollector`, a prometheus-client collector
exporting ``mailroute_queue_depth{queue,stage,kind}`` (messages ready in each stage queue,
``kind="input"``, and in its dead-letter queue, ``kind="dead"``), the matching
``mailroute_queue_consumers`` and ``mailroute_queue_depth_up`` (0 when the broker could not be
asked).  The numbers come from passive ``queue.declare`` on one pika connection kept open
between scrapes (re-made after a failure) and are cached for a few seconds, so a burst of
scrapes costs the broker one round per queue.  Never fails a scrape: a broker that cannot be
reached gives ``mailroute_queue_depth_up 0`` and no depth samples.  Every worker exports the
same depths; dashboards and alerts take ``max by (queue)``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.topology import STAGES, Topology

log = logging.getLogger(__name__)

CACHE_SECONDS = 5.0
# queue name -> (messages ready, consumers)
Depths = dict[str, tuple[int, int]]


class QueueDepthCollector(Collector):
    def __init__(self, topology: Topology, fetch: Callable[[list[str]], Depths],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._topology = topology
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, Depths | None] | None = None

    def queues(self) -> list[tuple[str, str, str]]:
        """(queue, stage, kind) of every queue this collector reports."""
        return [(name, stage, kind) for stage in STAGES
                for name, kind in ((self._topology.input_queue(stage), "input"),
                                   (self._topology.dead_queue(stage), "dead"))]

    def _depths(self) -> Depths | None:
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < CACHE_SECONDS:
                return self._cached[1]
            try:
                depths: Depths | None = self._fetch([q for q, _, _ in self.queues()])
            except Exception as exc:
                log.warning("queue depths: broker not reachable (%s)", exc)
                depths = None
            self._cached = (now, depths)
            return depths

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families(None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families(self._depths(), describe_only=False)

    def _families(self, depths: Depths | None,
                  describe_only: bool = True) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("mailroute_queue_depth",
                                  "Messages ready in a stage queue (input) or its dead letters",
                                  labels=["queue", "stage", "kind"])
        consumers = GaugeMetricFamily("mailroute_queue_consumers",
                                      "Consumers attached to a stage or dead-letter queue",
                                      labels=["queue", "stage", "kind"])
        up = GaugeMetricFamily("mailroute_queue_depth_up",
                               "1 if the last queue depth reading reached the broker")
        if not describe_only:
            up.add_metric([], 0 if depths is None else 1)
            for queue, stage, kind in self.queues():
                if depths is not None and queue in depths:
                    messages, attached = depths[queue]
                    depth.add_metric([queue, stage, kind], messages)
                    consumers.add_metric([queue, stage, kind], attached)
        yield depth
        yield consumers
        yield up


class PassiveDeclareReader:
    """Reads (messages, consumers) of queues with passive ``queue.declare`` over pika."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self._url = url
        self._timeout = timeout
        self._connection: Any = None

    def __call__(self, queues: list[str]) -> Depths:
        reused = self._connection is not None and self._connection.is_open
        try:
            return self._read(queues)
        except Exception:
            if not reused:
                raise
            # The kept connection may have been closed by the broker while no one scraped
            # (missed heartbeats); one fresh attempt before reporting the broker down.
            return self._read(queues)

    def _read(self, queues: list[str]) -> Depths:
        from shared.rabbit import connect_blocking

        if self._connection is None or not self._connection.is_open:
            self._connection = connect_blocking(self._url, timeout=self._timeout)
        depths: Depths = {}
        try:
            for queue in queues:
                channel = self._connection.channel()
                try:
                    ok = channel.queue_declare(queue, passive=True)
                    depths[queue] = (ok.method.message_count, ok.method.consumer_count)
                except Exception as exc:
                    if "NOT_FOUND" not in str(exc):
                        raise
                finally:
                    if channel.is_open:
                        channel.close()
        except Exception:
            self.close()
            raise
        return depths

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:
                log.debug("closing the queue-depth connection failed", exc_info=True)


def watch_queue_depths(metrics: Any, broker_url: str, prefix: str) -> QueueDepthCollector | None:
    """Export the queue depths from ``metrics``'s registry (RabbitMQ only; None otherwise)."""
    if broker_url.startswith("memory://"):
        return None
    collector = QueueDepthCollector(Topology(prefix), PassiveDeclareReader(broker_url))
    metrics.watch(collector)
    return collector
