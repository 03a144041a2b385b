"""The workers' stage counters and latency histogram, read from their Prometheus metrics.

Takes metric sources (callables giving Prometheus text: a worker's ``/metrics`` URL read with
a short timeout, or an in-process registry under ``mailroute run``); gives
:class:`MetricsWindow`, whose :meth:`~MetricsWindow.read` scrapes every source, keeps the
reading in a window of the last hour (in memory only: a restart of the page server starts it
empty) and gives per stage the cumulative total and messages per minute, and the end-to-end
latency p50/p99.

How the numbers are made, honestly:

- *total*: what the workers counted since they started, summed over the sources that answered
  (parse, route, persist: ``mailroute_stage_messages_in_total``, messages taken from the
  stage's queue; ingest: ``mailroute_mailbox_messages_fetched_total``, messages fetched and
  confirmed).
- *per minute*: the increase since the oldest reading at most 90 s old (at least 1 s old),
  scaled to a minute; per source, so a source that stops answering does not count as a drop,
  and a counter that went down (a restarted worker) counts from zero.  None until there are
  two readings.
- *latency*: p50/p99 estimated from ``mailroute_end_to_end_latency_seconds`` (mailbox arrival
  to committed record) as Prometheus' ``histogram_quantile`` does (linear within a bucket):
  over the last hour when a reading from an hour ago is held, else over everything the workers
  observed since they started (the window's label says which).

Never fails: a source that cannot be read counts as down (``sources_up`` tells how many
answered).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

Source = Callable[[], str]
STAGE_COUNTERS = {"parse": "mailroute_stage_messages_in_total",
                  "route": "mailroute_stage_messages_in_total",
                  "persist": "mailroute_stage_messages_in_total"}
INGEST_COUNTER = "mailroute_mailbox_messages_fetched_total"
LATENCY_BUCKET = "mailroute_end_to_end_latency_seconds_bucket"
OVERVIEW_STAGES = ("ingest", "parse", "route", "persist")
RATE_MAX_AGE = 90.0
RATE_MIN_AGE = 1.0
HOUR = 3600.0
MIN_SPACING = 1.0  # readings closer together than this are not kept in the window


def url_source(url: str, timeout: float = 2.0) -> Source:
    """A source reading a worker's /metrics over HTTP."""

    # workers are on this network: never through an http_proxy from the environment
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def read() -> str:
        with opener.open(url, timeout=timeout) as response:
            return str(response.read().decode("utf-8", "replace"))

    return read


def registry_source(registry: Any) -> Source:
    """A source reading an in-process prometheus registry (``mailroute run``)."""
    from prometheus_client.exposition import generate_latest

    return lambda: generate_latest(registry).decode("utf-8")


@dataclass(frozen=True)
class SourceReading:
    totals: dict[str, float]  # by stage
    buckets: dict[float, float]  # cumulative count by upper bound (math.inf included)


@dataclass(frozen=True)
class Reading:
    at: float  # monotonic seconds
    sources: dict[int, SourceReading]  # by source index; missing: did not answer


@dataclass
class StageFlow:
    total: float
    per_minute: float | None


@dataclass
class Overview:
    stages: dict[str, StageFlow]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_window: str
    latency_count: float
    sources_up: int
    sources: int
    notes: list[str] = field(default_factory=list)


def parse_reading(text: str) -> SourceReading:
    """Stage totals and latency buckets from one source's Prometheus text."""
    totals = dict.fromkeys(OVERVIEW_STAGES, 0.0)
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == INGEST_COUNTER:
                totals["ingest"] += sample.value
            elif sample.name == STAGE_COUNTERS["parse"]:
                stage = sample.labels.get("stage", "")
                if stage in STAGE_COUNTERS:
                    totals[stage] += sample.value
            elif sample.name == LATENCY_BUCKET:
                bound = float(sample.labels.get("le", "+Inf"))
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return SourceReading(totals, buckets)


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile over cumulative buckets (seconds); None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                finite = [b for b in bounds if not math.isinf(b)]
                return finite[-1] if finite else None
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (
                (rank - previous_count) / (count - previous_count))
        previous_bound, previous_count = bound, count
    return None


def _increase(now: float, then: float) -> float:
    """A counter's increase; one that went down was reset (a restarted worker)."""
    return now - then if now >= then else now


class MetricsWindow:
    """Readings of the workers' metrics over the last hour; thread-safe."""

    def __init__(self, sources: Sequence[Source], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._sources = list(sources)
        self._clock = clock
        self._lock = threading.Lock()
        self._readings: deque[Reading] = deque()

    @property
    def source_count(self) -> int:
        return len(self._sources)

    def _scrape(self) -> Reading:
        found: dict[int, SourceReading] = {}
        for index, source in enumerate(self._sources):
            try:
                found[index] = parse_reading(source())
            except Exception as exc:  # a worker that is down or not started
                log.debug("metrics source %d not read: %s", index, exc)
        return Reading(self._clock(), found)

    def read(self) -> Overview:
        now = self._scrape()
        with self._lock:
            history = list(self._readings)
            if not history or now.at - history[-1].at >= MIN_SPACING:
                self._readings.append(now)
            # keep the newest reading that is at least an hour old, and everything after it
            while len(self._readings) > 1 and now.at - self._readings[1].at >= HOUR:
                self._readings.popleft()
        return self._overview(now, history)

    def _overview(self, now: Reading, history: list[Reading]) -> Overview:
        rate_base = next((r for r in history
                          if RATE_MIN_AGE <= now.at - r.at <= RATE_MAX_AGE), None)
        stages = {}
        for stage in OVERVIEW_STAGES:
            total = sum(s.totals[stage] for s in now.sources.values())
            per_minute = None
            if rate_base is not None:
                common = set(now.sources) & set(rate_base.sources)
                increase = sum(_increase(now.sources[i].totals[stage],
                                         rate_base.sources[i].totals[stage]) for i in common)
                per_minute = increase * 60.0 / (now.at - rate_base.at)
            stages[stage] = StageFlow(total=total, per_minute=per_minute)
        hour_base = next((r for r in reversed(history) if now.at - r.at >= HOUR), None)
        buckets: dict[float, float] = {}
        for index, reading in now.sources.items():
            before = hour_base.sources.get(index) if hour_base is not None else None
            for bound, count in reading.buckets.items():
                then = before.buckets.get(bound, 0.0) if before is not None else 0.0
                buckets[bound] = buckets.get(bound, 0.0) + _increase(count, then)
        if hour_base is not None:
            window = "last hour"
        else:
            window = "since the workers started (no reading from an hour ago yet)"
        p50, p99 = quantile(0.5, buckets), quantile(0.99, buckets)
        count = max(buckets.values()) if buckets else 0.0
        return Overview(
            stages=stages,
            latency_p50_ms=None if p50 is None else round(p50 * 1000, 1),
            latency_p99_ms=None if p99 is None else round(p99 * 1000, 1),
            latency_window=window, latency_count=count,
            sources_up=len(now.sources), sources=len(self._sources))
