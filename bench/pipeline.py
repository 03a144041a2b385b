"""The pipeline benchmark: mail through parse, route and persist against a bare chain.

Takes :class:`PipelineSettings`; gives :class:`~bench.common.Figure` objects.  Realistic 4 KB
mail (``bench.mail``) is published as ``raw`` documents (``shared.schemas.Codec``,
``shared.transport`` publisher, pipelined confirms) into ``mail.parse`` of a private vhost;
three ``mailroute worker`` processes (parse, route, persist; quorum queues; a private
PostgreSQL database) carry it to the ``emails`` table.  Two modes:

- saturated: every message published first, then the workers started (persist and route,
  then parse); throughput = messages / (parse ready -> last email row's ``first_seen_at``).
- offered load: the workers already running, the publisher paced at each rate; latency per
  message from its publish time (= ``source.received_at`` = ``fetched_at``) to its row's
  ``first_seen_at`` (the start of the persist transaction that wrote it), cross-checked
  with the persist worker's ``mailroute_end_to_end_latency_seconds`` histogram (observed
  after the commit, coarse buckets).

The ceiling is a bare chain (``bench.chain``) of as many consumer processes on the same
queue names in another private vhost, passing the raw document bytes on with pipelined
confirms and multiple-acks, persisting nothing (``sink="none"``) or one row per message with
plain SQLAlchemy (``sink="sql"``), measured the same way (its last hop's ack time).
CPU time per process group (workers, RabbitMQ, PostgreSQL, the publisher) is recorded for the
saturated runs.  Fails with :class:`~bench.common.BenchError` when a server is missing, a
process dies, messages are lost or dead-lettered, or progress stops for ``STALL_SECONDS``.
"""

from __future__ import annotations

import os
import random
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kombu import Connection
from sqlalchemy import text

from bench.common import (
    BenchError,
    CpuMeter,
    Figure,
    Vhost,
    kernel_writeback,
    median,
    percentile,
    private_database,
    private_vhost,
    progress,
    rabbitmq_wal_max_bytes,
    wal_number,
    writeback_is_bursty,
)
from bench.idle import idle_gap_figure
from bench.mail import RECIPIENT, plain_mail
from bench.processes import ChainHops, StageWorkers
from bench.profile import PySpy
from persist.database import create_engine_for
from shared.journal import JournalReader
from shared.schemas import Codec
from shared.settings import BrokerSettings
from shared.topology import STAGES, Topology
from shared.transport import Broker, Envelope, Publisher

STALL_SECONDS = 60.0
# Above this a WAL roll-over costs tens of mails over 35 ms at 300 msg/s (README "Broker and
# kernel settings"); deploy/rabbitmq/60-mailroute.conf sets 16 MB.
LARGE_WAL_BYTES = 64 * 1024**2
JOURNAL_QUIET_SECONDS = 2.0  # reading the journal ends when nothing more comes for this long
PUBLISH_CHUNK = 500
WARMUP_SECONDS = 1.0
# A timestamp no real run carries: documents are encoded once with it and stamped on publish.
_SENTINEL = datetime(2001, 2, 3, 4, 5, 6, 789012, tzinfo=UTC).isoformat().encode()
_ID_PLACEHOLDER = b"<message-id-placeholder@example.net>"
MAIL_POOL = 64
_STARTUP_ORDER = ("persist", "route")  # started and ready before parse, which opens the gate


@dataclass(frozen=True)
class PipelineSettings:
    messages: int = 5000
    message_size: int = 4096
    rates: tuple[int, ...] = (100, 300)
    duration: float = 20.0
    repeat: int = 1
    prefetch: int = BrokerSettings().prefetch  # the workers' default
    sink: str = "none"
    profile_dir: Path | None = None
    seed: int = 8


@dataclass
class Document:
    trace_id: str
    body: bytes  # the encoded raw document, its timestamps still the sentinel

    def envelope(self, at: float) -> Envelope:
        stamp = datetime.fromtimestamp(at, UTC).isoformat().encode()
        return Envelope(self.body.replace(_SENTINEL, stamp), "mail", "mail.parse",
                        {"x-mailroute-trace": self.trace_id})


def make_documents(tag: str, count: int, settings: PipelineSettings, codec: Codec,
                   seed: int) -> list[Document]:
    """``count`` raw documents: a pool of distinct mails, each copy with its own Message-ID.

    Building mail with EmailMessage costs milliseconds; the pool's Message-IDs are
    placeholders of fixed length that each document replaces with a unique id.
    """
    rng = random.Random(seed)
    pool = [plain_mail(rng, _ID_PLACEHOLDER.decode(), settings.message_size)
            for _ in range(min(count, MAIL_POOL))]
    sentinel = datetime.fromisoformat(_SENTINEL.decode())
    documents = []
    for index in range(count):
        trace_id = f"{tag}-{index:07d}"
        unique = f"<{trace_id}.{secrets.token_hex(4)}@example.net>".encode()
        raw = pool[index % len(pool)].replace(_ID_PLACEHOLDER, unique)
        source = {"mailbox": "bench", "mailbox_kind": "direct", "folder": "INBOX",
                  "uidvalidity": 1, "uid": trace_id, "received_at": sentinel,
                  "fetched_at": sentinel}
        body = codec.encode("raw", {"trace_id": trace_id, "source": source, "raw": raw})
        documents.append(Document(trace_id, body))
    return documents


def publish_all(publisher: Publisher, documents: list[Document]) -> float:
    """Publish every document (chunks, one confirm wait each); gives the first publish time."""
    first = time.time()
    for start in range(0, len(documents), PUBLISH_CHUNK):
        now = time.time()
        publisher.publish_envelopes([d.envelope(now)
                                     for d in documents[start:start + PUBLISH_CHUNK]])
    return first


def publish_paced(publisher: Publisher, documents: list[Document], rate: float,
                  label: str) -> dict[str, float]:
    """Documents on an absolute schedule of ``rate`` per second (an open loop).

    Whatever is due when the previous publish returns goes out together in one publish
    (one confirm wait), as an ingest batch would, so a slow confirm delays messages by
    at most its own duration instead of lowering the offered rate; each message's time is
    the time of the publish that carried it.
    """
    sent: dict[str, float] = {}
    start = time.time() + 0.05
    next_report = start + 5
    index = 0
    while index < len(documents):
        delay = start + index / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        now = time.time()
        due = min(len(documents), max(index + 1, int((now - start) * rate) + 1))
        batch = documents[index:due]
        publisher.publish_envelopes([document.envelope(now) for document in batch])
        sent.update((document.trace_id, now) for document in batch)
        index = due
        if now > next_report:
            progress(f"{label}: published {index}/{len(documents)}")
            next_report = now + 5
    return sent


def wait_until(done: Callable[[], int], total: int, label: str,
               check: Callable[[], None]) -> None:
    """Wait until ``done()`` reaches ``total``; a stall of STALL_SECONDS is an error."""
    last, last_change, next_report = -1, time.monotonic(), time.monotonic() + 2
    while True:
        check()
        count = done()
        now = time.monotonic()
        if count >= total:
            return
        if count != last:
            last, last_change = count, now
        elif now - last_change > STALL_SECONDS:
            raise BenchError(f"{label}: stuck at {count}/{total} for {STALL_SECONDS:g}s")
        if now > next_report:
            progress(f"{label}: {count}/{total}")
            next_report = now + 2
        time.sleep(0.1)


def since(count: Callable[[], int]) -> Callable[[], int]:
    """A counter that starts from zero now."""
    base = count()
    return lambda: count() - base


def dead_letters(vhost: Vhost) -> dict[str, int]:
    """Messages now in each dead-letter queue of ``vhost`` (exact: a passive declare)."""
    found = {}
    with Connection(vhost.url) as connection:
        channel = connection.channel()
        for stage in STAGES:
            name = f"mail.{stage}.dead"
            _, messages, _ = channel.queue_declare(queue=name, passive=True)
            if messages:
                found[name] = messages
    return found


def latency_stats(latencies: list[float], sent: dict[str, float]) -> dict[str, Any]:
    times = sorted(sent.values())
    offered = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {
        "count": len(latencies),
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p90_ms": percentile(latencies, 0.90) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
        "mean_ms": sum(latencies) / len(latencies) * 1000,
        "achieved_rate": offered,
    }


def journal_times(vhost: Vhost, since: datetime, tag: str) -> dict[str, dict[str, float]]:
    """trace id -> {stage queue: publish time} of one run's messages, from the journal (each
    hop's publish is stamped ``x-mailroute-published-ms``, so milliseconds only)."""
    times: dict[str, dict[str, float]] = {}
    with JournalReader(vhost.url, Topology("mail")) as reader:
        for entry in reader.read(since, stall_seconds=JOURNAL_QUIET_SECONDS):
            trace = entry.headers.get("x-mailroute-trace")
            if isinstance(trace, str) and trace.startswith(tag + "-") and entry.published_at:
                times.setdefault(trace, {})[entry.routing_key] = entry.published_at.timestamp()
    return times


def hop_stats(times: dict[str, dict[str, float]], finished: dict[str, float],
              sent: dict[str, float]) -> dict[str, dict[str, float]]:
    """p50/p90/p99 in ms of each stage's share of the latency: from the publish into its
    queue to the publish into the next (persist: to its transaction's start)."""
    queues = [Topology("mail").input_queue(stage) for stage in STAGES]
    shares: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for trace, at in sent.items():
        published = times.get(trace, {})
        if trace not in finished or not all(q in published for q in queues[1:]):
            continue
        points = [at, *(published[q] for q in queues[1:]), finished[trace]]
        for stage, start, end in zip(STAGES, points, points[1:], strict=False):
            shares[stage].append(max(0.0, end - start))
    return {stage: {f"p{int(q * 100)}": percentile(values, q) * 1000 for q in (0.5, 0.9, 0.99)}
            for stage, values in shares.items() if values}


def steady_rate(finish_times: list[float]) -> float:
    """Messages per second between the 10th and the 90th percentile of completion."""
    ordered = sorted(finish_times)
    low, high = int(len(ordered) * 0.1), int(len(ordered) * 0.9) - 1
    if high <= low or ordered[high] <= ordered[low]:
        return 0.0
    return (high - low) / (ordered[high] - ordered[low])


# -- the bare chain ------------------------------------------------------------------------
class RecordReader:
    """Reads the last chain hop's ``<trace> <time>`` lines as they are appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.finished: dict[str, float] = {}
        self._partial = b""

    def read(self) -> dict[str, float]:
        if self.path.exists():
            with open(self.path, "rb") as stream:
                stream.seek(self.offset)
                data = self._partial + stream.read()
                self.offset = stream.tell()
            *lines, self._partial = data.split(b"\n")
            for line in lines:
                trace, at = line.decode().split()
                self.finished.setdefault(trace, float(at))
        return self.finished

    def count(self, prefix: str) -> int:
        return sum(1 for t in self.read() if t.startswith(prefix))


class Chain:
    def __init__(self, vhost: Vhost, work: Path, settings: PipelineSettings,
                 database_url: str) -> None:
        self.vhost = vhost
        self.settings = settings
        self.record = work / "chain-record.txt"
        self.reader = RecordReader(self.record)
        self.hops = ChainHops(work)
        self.database_url = database_url

    def arguments(self, stage: str) -> list[str]:
        arguments = ["--url", self.vhost.url, "--input", f"mail.{stage}",
                     "--prefetch", str(self.settings.prefetch)]
        following = STAGES.index(stage) + 1
        if following < len(STAGES):
            arguments += ["--output", f"mail.{STAGES[following]}"]
        else:
            arguments += ["--record", str(self.record)]
            if self.settings.sink == "sql":
                arguments += ["--sql", self.database_url]
        return arguments

    def start(self, *stages: str) -> float:
        ready = 0.0
        for stage in stages:
            ready = self.hops.start(f"chain-{stage}", self.arguments(stage))
        return ready

    def pids(self) -> dict[str, list[int] | str]:
        return {stage: [self.hops.pid(f"chain-{stage}")] for stage in STAGES
                if f"chain-{stage}" in self.hops.processes}


# -- one benchmark run ----------------------------------------------------------------------
@dataclass
class Measurements:
    saturated: list[dict[str, Any]] = field(default_factory=list)
    offered: dict[int, dict[str, Any]] = field(default_factory=dict)


class PipelineBench:
    def __init__(self, settings: PipelineSettings) -> None:
        self.settings = settings
        self.codec = Codec()
        self.pipeline = Measurements()
        self.chain = Measurements()
        self.profiled: dict[str, Any] | None = None
        self.idle_gap: Figure | None = None
        self.writeback = kernel_writeback()
        self.wal_max_bytes = rabbitmq_wal_max_bytes()
        self._tags = 0

    def tag(self, kind: str) -> str:
        self._tags += 1
        return f"{kind}.{self._tags:02d}"

    def documents(self, tag: str, count: int) -> list[Document]:
        return make_documents(tag, count, self.settings, self.codec,
                              self.settings.seed * 1000 + self._tags)

    def run(self) -> list[Figure]:
        settings = self.settings
        progress("kernel writeback: " + ", ".join(f"{k} {v}" for k, v in self.writeback.items()))
        if writeback_is_bursty(self.writeback):
            progress("kernel writeback is the default (a burst every 30 s that the broker's "
                     "fsyncs wait behind): expect p99 outliers; `make services` sets "
                     "deploy/sysctl/60-mailroute-writeback.conf")
        progress(f"RabbitMQ quorum-queue WAL: {self.wal_max_bytes} bytes")
        if self.wal_max_bytes is not None and self.wal_max_bytes > LARGE_WAL_BYTES:
            progress("a large WAL stalls the broker at each roll-over: expect p99 outliers; "
                     "`make services` sets deploy/rabbitmq/60-mailroute.conf (16 MB)")
        # before the workers start, so that nothing else runs on the machine meanwhile
        self.idle_gap = idle_gap_figure(max(settings.rates))
        with tempfile.TemporaryDirectory(prefix="mailroute-bench-") as folder, \
                private_vhost("chain") as chain_vhost, \
                private_vhost("pipeline") as pipeline_vhost, \
                private_database("pipeline") as database_url:
            work = Path(folder)
            config = self.write_config(work, pipeline_vhost, database_url)
            for vhost in (chain_vhost, pipeline_vhost):
                Broker(BrokerSettings(url=vhost.url, prefix="mail")).declare()
            engine = create_engine_for(database_url)
            try:
                for repetition in range(settings.repeat):
                    progress(f"saturated run {repetition + 1}/{settings.repeat}: "
                             f"{settings.messages} messages")
                    self.chain_saturated(chain_vhost, work, database_url)
                    self.pipeline_saturated(pipeline_vhost, config, work, engine)
                if settings.profile_dir:
                    progress("profiled saturated run (not counted): py-spy on each worker")
                    self.pipeline_saturated(pipeline_vhost, config, work, engine,
                                            profile=settings.profile_dir)
                self.chain_offered(chain_vhost, work, database_url)
                self.pipeline_offered(pipeline_vhost, config, work, engine)
                self.check_totals(engine, chain_vhost, pipeline_vhost)
            finally:
                engine.dispose()
        return self.figures()

    def write_config(self, work: Path, vhost: Vhost, database_url: str) -> Path:
        (work / "maildir").mkdir()
        config = {
            "broker": {"url": vhost.url, "prefix": "mail", "prefetch": self.settings.prefetch},
            "database": {"url": database_url},
            "metrics": {"host": "127.0.0.1", "base_port": 0},
            "log_level": "WARNING",
            "mailboxes": [{"name": "bench", "kind": "maildir", "path": str(work / "maildir")}],
            "users": [{"name": "bench", "address": RECIPIENT, "mailbox": "bench"}],
        }
        path = work / "mailroute.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def publisher(self, vhost: Vhost) -> Publisher:
        return Broker(BrokerSettings(url=vhost.url, prefix="mail")).publisher(self.codec)

    # -- saturated --------------------------------------------------------------------------
    def preload(self, vhost: Vhost, label: str) -> tuple[str, list[Document]]:
        """Publish the saturated run's whole load before any consumer starts."""
        tag = self.tag(label)
        documents = self.documents(tag, self.settings.messages)
        publisher = self.publisher(vhost)
        try:
            publish_all(publisher, documents)
        finally:
            publisher.close()
        return tag, documents

    def chain_saturated(self, vhost: Vhost, work: Path, database_url: str) -> None:
        tag, documents = self.preload(vhost, "csat")
        chain = Chain(vhost, work, self.settings, database_url)
        chain.reader.read()
        with chain.hops:
            chain.start(*reversed(STAGES[1:]))
            opened = chain.start(STAGES[0])
            meter = CpuMeter({**chain.pids(), "rabbitmq": "beam.smp", "postgres": "postgres"})
            meter.start()
            wait_until(lambda: chain.reader.count(tag + "-"), len(documents),
                       "ceiling saturated", chain.hops.check_alive)
            cpu = meter.stop()
        finished = [t for trace, t in chain.reader.read().items() if trace.startswith(tag)]
        result = self.saturated_result(opened, finished, cpu, meter)
        self.chain.saturated.append(result)
        progress(f"ceiling saturated: {result['throughput']:.0f} msg/s")
        progress(cpu_summary(result["cpu_ms_per_message"], meter.machine_busy,
                             meter.machine_stolen))

    def pipeline_saturated(self, vhost: Vhost, config: Path, work: Path, engine: Any,
                           profile: Path | None = None) -> None:
        tag, documents = self.preload(vhost, "psat")
        with StageWorkers(config, work) as workers:
            workers.start(*_STARTUP_ORDER)
            workers.wait_ready(*_STARTUP_ORDER)
            workers.start("parse")
            opened = workers.wait_ready("parse")
            meter = CpuMeter({**{s: [workers.pid(s)] for s in STAGES},
                              "rabbitmq": "beam.smp", "postgres": "postgres"})
            meter.start()
            spy = PySpy(profile, {s: workers.pid(s) for s in STAGES}) if profile else None
            if spy:
                spy.start()
            try:
                wait_until(lambda: int(committed(workers)), len(documents),
                           "pipeline saturated", workers.check_alive)
            finally:
                if spy:
                    spy.stop()
            cpu = meter.stop()
            handler = handler_seconds(workers)
            codes = workers.stop_all()
        if any(codes.values()):
            raise BenchError(f"workers exited with {codes}")
        finished = rows_finished(engine, tag)
        if len(finished) != len(documents):
            raise BenchError(f"pipeline saturated: {len(finished)} rows for "
                             f"{len(documents)} messages")
        result = self.saturated_result(opened, list(finished.values()), cpu, meter)
        result["handler_ms_per_message"] = handler
        if profile:
            self.profiled = result
        else:
            self.pipeline.saturated.append(result)
        progress(f"pipeline saturated: {result['throughput']:.0f} msg/s"
                 f"{' (under py-spy)' if profile else ''}")
        progress(cpu_summary(result["cpu_ms_per_message"], meter.machine_busy,
                             meter.machine_stolen))

    def saturated_result(self, opened: float, finished: list[float],
                         cpu: dict[str, float], meter: CpuMeter) -> dict[str, Any]:
        count = len(finished)
        elapsed = max(finished) - opened
        return {
            "messages": count,
            "seconds": elapsed,
            "throughput": count / elapsed,
            "steady_throughput": steady_rate(finished),
            "cpu_ms_per_message": {k: v * 1000 / count for k, v in cpu.items()},
            "machine_busy_share": meter.machine_busy,
            "machine_steal_share": meter.machine_stolen,
        }

    # -- offered load -----------------------------------------------------------------------
    def offered(self, label: str, vhost: Vhost, results: dict[int, dict[str, Any]],
                done: Callable[[], int], finish_times: Callable[[str], dict[str, float]],
                check: Callable[[], None],
                histogram: Callable[[], dict[float, float]] | None = None,
                hop_times: Callable[[str], dict[str, dict[str, float]]] | None = None,
                cpu_groups: dict[str, list[int] | str] | None = None) -> None:
        """A warm-up second, then ``duration`` seconds at each rate, one after the other;
        with ``cpu_groups``, the CPU each group used per message at each rate."""
        publisher = self.publisher(vhost)
        try:
            rates = self.settings.rates
            warmup = self.documents(self.tag(f"{label}-warmup"),
                                    max(1, int(rates[0] * WARMUP_SECONDS)))
            counted = since(done)
            publish_paced(publisher, warmup, rates[0], f"{label} warm-up")
            wait_until(counted, len(warmup), f"{label} warm-up", check)
            for rate in rates:
                tag = self.tag(f"{label}-{rate}")
                documents = self.documents(tag, max(2, int(rate * self.settings.duration)))
                counted = since(done)
                buckets = histogram() if histogram else {}
                progress(f"{label} at {rate} msg/s for {self.settings.duration:g}s")
                meter = CpuMeter(cpu_groups or {})
                meter.start()
                wal_before = wal_number()
                sent = publish_paced(publisher, documents, rate, f"{label} at {rate}/s")
                wait_until(counted, len(documents), f"{label} at {rate}/s", check)
                cpu = meter.stop()
                wal_after = wal_number()
                finished = finish_times(tag)
                missing = [t for t in sent if t not in finished]
                if missing:
                    raise BenchError(f"{label} at {rate}/s: {len(missing)} messages without "
                                     f"a finish time, e.g. {missing[0]}")
                stats = latency_stats([finished[t] - at for t, at in sent.items()], sent)
                stats["machine_busy_share"] = meter.machine_busy
                stats["machine_steal_share"] = meter.machine_stolen
                stats["rabbitmq_wal_rollovers"] = (
                    wal_after - wal_before
                    if wal_before is not None and wal_after is not None else None)
                if histogram:
                    after = histogram()
                    total = after.get(float("inf"), 0) - buckets.get(float("inf"), 0)
                    stats["after_commit_share_within_s"] = {
                        str(le): (count - buckets.get(le, 0)) / total if total else None
                        for le, count in after.items() if le <= 0.1}
                if hop_times:
                    stats["hops_ms"] = hop_stats(hop_times(tag), finished, sent)
                if cpu:
                    stats["cpu_ms_per_message"] = {
                        name: seconds * 1000 / len(documents) for name, seconds in cpu.items()}
                results[rate] = stats
                rollovers = stats["rabbitmq_wal_rollovers"]
                progress(f"{label} at {rate} msg/s: p50 {stats['p50_ms']:.1f} ms, "
                         f"p99 {stats['p99_ms']:.1f} ms (offered "
                         f"{stats['achieved_rate']:.0f} msg/s; RabbitMQ WAL roll-overs in "
                         f"the phase: {'unknown' if rollovers is None else rollovers})")
                for hop, hop_stat in stats.get("hops_ms", {}).items():
                    progress(f"  {hop:8s} p50 {hop_stat['p50']:6.1f}  p90 {hop_stat['p90']:6.1f}  "
                             f"p99 {hop_stat['p99']:6.1f} ms")
                if cpu:
                    progress(cpu_summary(stats["cpu_ms_per_message"], meter.machine_busy,
                                         meter.machine_stolen))
        finally:
            publisher.close()

    def chain_offered(self, vhost: Vhost, work: Path, database_url: str) -> None:
        chain = Chain(vhost, work, self.settings, database_url)
        with chain.hops:
            chain.start(*reversed(STAGES))
            self.offered("ceiling", vhost, self.chain.offered,
                         lambda: len(chain.reader.read()),
                         lambda tag: {t: at for t, at in chain.reader.read().items()
                                      if t.startswith(tag + "-")},
                         chain.hops.check_alive,
                         cpu_groups={**chain.pids(), "rabbitmq": "beam.smp",
                                     "postgres": "postgres"})

    def pipeline_offered(self, vhost: Vhost, config: Path, work: Path, engine: Any) -> None:
        began = datetime.now(UTC)
        with StageWorkers(config, work) as workers:
            workers.start(*STAGES)
            workers.wait_ready(*STAGES)
            self.offered("pipeline", vhost, self.pipeline.offered,
                         lambda: int(committed(workers)),
                         lambda tag: rows_finished(engine, tag),
                         workers.check_alive,
                         lambda: latency_buckets(workers),
                         lambda tag: journal_times(vhost, began, tag),
                         {**{s: [workers.pid(s)] for s in STAGES},
                          "rabbitmq": "beam.smp", "postgres": "postgres"})
            codes = workers.stop_all()
        if any(codes.values()):
            raise BenchError(f"workers exited with {codes}")

    def check_totals(self, engine: Any, chain_vhost: Vhost, pipeline_vhost: Vhost) -> None:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT count(*) FROM emails")).scalar_one()
        expected = self.settings.messages * self.settings.repeat + sum(
            s["count"] for s in self.pipeline.offered.values())
        if rows < expected:
            raise BenchError(f"the database holds {rows} emails; at least {expected} expected")
        for vhost in (chain_vhost, pipeline_vhost):
            dead = dead_letters(vhost)
            if dead:
                raise BenchError(f"dead-lettered messages in {vhost.name}: {dead}")

    # -- figures ----------------------------------------------------------------------------
    def figures(self) -> list[Figure]:
        pipe, chain = self.pipeline, self.chain
        throughput = median([r["throughput"] for r in pipe.saturated])
        ceiling = median([r["throughput"] for r in chain.saturated])
        figures = [Figure(
            "pipeline saturated throughput", throughput, "msg/s", ceiling,
            target=">= 1200 msg/s", meets_target=throughput >= 1200,
            detail={"runs": pipe.saturated, "ceiling_runs": chain.saturated,
                    "profiled_run": self.profiled})]
        targets = {(100, "p50"): 10.0, (300, "p99"): 35.0}
        for rate in self.settings.rates:
            for quantile in ("p50", "p99"):
                value = pipe.offered[rate][f"{quantile}_ms"]
                limit = targets.get((rate, quantile))
                figures.append(Figure(
                    f"pipeline {quantile} latency at {rate} msg/s", value, "ms",
                    chain.offered[rate][f"{quantile}_ms"], higher_is_better=False,
                    target=f"< {limit:g} ms" if limit else "",
                    meets_target=value < limit if limit else None,
                    detail={"pipeline": pipe.offered[rate], "ceiling": chain.offered[rate],
                            "kernel_writeback": self.writeback,
                            "rabbitmq_wal_max_bytes": self.wal_max_bytes}))
        if self.idle_gap is not None:
            figures.append(self.idle_gap)
        phases = [*pipe.saturated, *pipe.offered.values(), *chain.saturated,
                  *chain.offered.values()]
        stolen = [p["machine_steal_share"] for p in phases
                  if p.get("machine_steal_share") is not None]
        if stolen:
            # Not a ceiling: how much of the machine the host took while these ran.
            figures.append(Figure("machine: host steal, worst phase", max(stolen) * 100, "%",
                                  None, detail={"worst_phase": True,
                                                "phases": [p * 100 for p in stolen]}))
        return figures


def cpu_summary(cpu_ms_per_message: dict[str, float], busy: float | None,
                stolen: float | None = None) -> str:
    """The progress line of a run's CPU: per message for each process, and the machine
    (how busy, and how much the hypervisor took)."""
    return ("  CPU ms per message: " + ", ".join(
        f"{name} {ms:.2f}" for name, ms in cpu_ms_per_message.items())
        + ("" if busy is None else f"; machine busy {busy:.0%}")
        + ("" if stolen is None else f", stolen by the host {stolen:.0%}"))


def committed(workers: StageWorkers) -> float:
    """Documents the persist worker has committed (its end-to-end histogram's count)."""
    count = "mailroute_end_to_end_latency_seconds_count"
    return workers.samples("persist", [count]).get((count, ()), 0.0)


def latency_buckets(workers: StageWorkers) -> dict[float, float]:
    found = {}
    bucket = "mailroute_end_to_end_latency_seconds_bucket"
    for (name, labels), value in workers.samples("persist", [bucket]).items():
        if name == bucket:
            found[float(dict(labels)["le"])] = value
    return found


def handler_seconds(workers: StageWorkers) -> dict[str, float]:
    """Mean time in each stage's handler per message (ms), from its histogram."""
    means = {}
    for stage in STAGES:
        samples = workers.samples(stage)
        labels = (("stage", stage),)
        count = samples.get(("mailroute_stage_processing_seconds_count", labels), 0.0)
        total = samples.get(("mailroute_stage_processing_seconds_sum", labels), 0.0)
        means[stage] = total / count * 1000 if count else 0.0
    return means


def rows_finished(engine: Any, tag: str) -> dict[str, float]:
    """trace id -> first_seen_at (unix time) of the emails rows of one run."""
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT trace_id, first_seen_at FROM emails WHERE trace_id LIKE :prefix"),
            {"prefix": tag + "-%"}).all()
    return {trace: seen.timestamp() for trace, seen in rows}


def run(settings: PipelineSettings) -> list[Figure]:
    if settings.sink not in ("none", "sql"):
        raise BenchError(f"unknown ceiling sink {settings.sink!r}")
    if not os.path.exists("/proc/self/stat"):
        raise BenchError("the pipeline benchmark reads /proc: run it on Linux")
    return PipelineBench(settings).run()
