"""The persist benchmark: records per second into PostgreSQL against plain SQLAlchemy, with
one writer process and with two.

Takes :class:`PersistSettings`; gives one figure per number of writers (``writers``, default
1 and 2): "persist records/s (PostgreSQL)" for one writer and "persist records/s, 2 writers
(PostgreSQL)" for two, which carries the target (>= 8,000): persist scales by starting more
worker processes, and one process is bound by its own CPU plus its round trips.

A record is one routed document (a 4 KB mail parsed by the parse stage, one delivery): its
email, parties and delivery rows.  Each round builds ``records`` of them and, for each number
of writers, splits them into that many disjoint contiguous shares.  **ours**: each writer is a
process of its own (``spawn``) with its own engine and :class:`~persist.store.EmailStore`,
saving its share in batches of ``batch_size``, one transaction per batch, as the persist
worker does.  **plain** (the ceiling): each writer inserts the same rows with SQLAlchemy Core
(the store's own row building, done before the clock starts; each email's id taken from its
sequence so that its thread can be itself, as the store writes it) in the same batches, with
plain executemany INSERTs: no ``ON CONFLICT``, no look-ups, no sorting.  Every writer first
connects and stores its share's first batch (the warm-up: stored and checked, not timed),
then all start together on one event; the rate is the timed records of all writers over
(the last writer's end - the first writer's start).  Each side of each setting writes into a
fresh database; the rounds alternate which side goes first so that a busy machine hurts both
alike.

Fails with :class:`~bench.common.BenchError` when a server is missing, a writer process fails
or stops answering, the settings leave a writer nothing to time, ours did not store every
email afterwards, or the two databases do not hold the same number of rows in each table.
"""

from __future__ import annotations

import multiprocessing
import queue
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from itertools import pairwise
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine

from bench.common import BenchError, Figure, median, private_database, progress
from bench.mail import plain_mail
from parse.extract import parse_raw
from persist.database import create_engine_for
from persist.store import EmailStore, _prepare, _Prepared
from persist.tables import Tables, build_tables
from shared.settings import LimitSettings

TARGET = 8000.0
OURS, PLAIN = "ours", "plain"
# How long a writer may take to start and warm up, and then to write its share.
WRITER_TIMEOUT_S = 600.0

BatchWriter = Callable[[Sequence[Any]], object]


@dataclass(frozen=True)
class PersistSettings:
    records: int = 20_000
    batch_size: int = 50
    rounds: int = 3
    seed: int = 8
    writers: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class WriterJob:
    """What one writer process writes: its share of the round's documents, by index."""

    side: str  # OURS or PLAIN
    url: str
    share: range
    seed: int
    batch_size: int


@dataclass(frozen=True)
class WriterTiming:
    """The records one writer wrote between its start and end (``time.monotonic``: one
    clock for all processes on Linux)."""

    records: int
    started: float
    ended: float


def routed_documents(indices: range, seed: int) -> list[dict[str, Any]]:
    """The routed documents numbered ``indices`` of the round ``seed`` (the same numbers give
    the same documents in any process; their times are when they were built)."""
    rng = random.Random(seed)
    pool = [parse_raw(plain_mail(rng, "<placeholder@example.net>"), "direct",
                      LimitSettings()).emails[0] for _ in range(32)]
    now = datetime.now(UTC)
    documents = []
    for index in indices:
        email = dict(pool[index % len(pool)])
        message_id = f"persist-{seed}-{index}@example.net"
        email.update(message_id=message_id, dedup_key=f"mid:{message_id}")
        documents.append({
            "trace_id": f"t{index}",
            "source": {"mailbox": "bench", "mailbox_kind": "direct", "folder": "INBOX",
                       "uidvalidity": 1, "uid": str(index), "received_at": now,
                       "fetched_at": now},
            "email": email,
            "deliveries": [{"principal_kind": "user", "principal": "bench",
                            "address": "bench@corp.example.com", "mailbox": "bench",
                            "method": "direct", "evidence": {"decided_by": "bench"}}],
        })
    return documents


def split_among(count: int, writers: int) -> list[range]:
    """``range(count)`` in ``writers`` contiguous shares whose sizes differ by one at most."""
    size, extra = divmod(count, writers)  # the first ``extra`` shares get one more
    bounds = [number * size + min(number, extra) for number in range(writers + 1)]
    return [range(start, end) for start, end in pairwise(bounds)]


def in_batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def combined_rate(timings: Sequence[WriterTiming]) -> float:
    """All writers' timed records over the time from the first start to the last end."""
    elapsed = max(t.ended for t in timings) - min(t.started for t in timings)
    return sum(t.records for t in timings) / elapsed


# -- one writer (runs in its own process) ----------------------------------------------------
def write_plain_batch(engine: Engine, tables: Tables, chunk: Sequence[_Prepared]) -> None:
    """The rows the store writes for these (new) documents, through plain SQLAlchemy Core:
    ids for the batch's emails from their sequence (one statement), then one executemany
    INSERT per table, in one transaction."""
    sequence = func.nextval(func.pg_get_serial_sequence("emails", "id"))
    with engine.begin() as connection:
        ids = connection.execute(select(sequence).select_from(
            func.generate_series(1, len(chunk)))).scalars().all()
        # a new email with no parent is its own thread; its parties resolve to nothing
        # here (no directory), as the store finds
        connection.execute(insert(tables.emails), [
            {**p.email, "id": i, "thread_id": i, "parent_email_id": None}
            for p, i in zip(chunk, ids, strict=True)])
        parties = [{**row, "email_id": i, "resolution": "unresolved", "contact_id": None,
                    "account_id": None}
                   for p, i in zip(chunk, ids, strict=True) for row in p.parties]
        if parties:
            connection.execute(insert(tables.parties), parties)
        connection.execute(insert(tables.deliveries), [
            {**row, "email_id": i} for p, i in zip(chunk, ids, strict=True)
            for row in p.deliveries])


@contextmanager
def opened_writer(job: WriterJob) -> Iterator[tuple[list[Sequence[Any]], BatchWriter]]:
    """The job's batches and what writes one: ``EmailStore.save`` for ours; for plain, the
    rows built beforehand (not timed) and :func:`write_plain_batch`."""
    engine = create_engine_for(job.url)
    documents = routed_documents(job.share, job.seed)
    try:
        if job.side == OURS:
            store = EmailStore(engine)
            try:
                yield in_batches(documents, job.batch_size), store.save
            finally:
                store.close()
        else:
            now = datetime.now(UTC)
            prepared = [_prepare(document, now) for document in documents]
            yield (in_batches(prepared, job.batch_size),
                   partial(write_plain_batch, engine, build_tables()))
    finally:
        engine.dispose()


def timed_writes(job: WriterJob, go: Event, reports: Any) -> WriterTiming:
    """Warm up on the first batch, say so, wait for ``go``, then write the rest, timed."""
    with opened_writer(job) as (batches, write):
        write(batches[0])
        reports.put(("ready", None))
        if not go.wait(WRITER_TIMEOUT_S):
            raise BenchError("no start signal")
        started = time.monotonic()
        for batch in batches[1:]:
            write(batch)
        ended = time.monotonic()
    return WriterTiming(sum(len(batch) for batch in batches[1:]), started, ended)


def writer_process(job: WriterJob, go: Event, reports: Any) -> None:
    """A writer process's body: reports ``ready``, then ``done`` with its timing, or
    ``failed`` with what went wrong."""
    try:
        reports.put(("done", timed_writes(job, go, reports)))
    except Exception as exc:
        reports.put(("failed", f"{type(exc).__name__}: {exc}"))


# -- the writers of one side, together -------------------------------------------------------
def await_reports(reports: Any, processes: Sequence[BaseProcess], kind: str,
                  side: str) -> list[Any]:
    """One ``kind`` report from each writer; a failure, a writer that died or the timeout
    is a BenchError."""
    received: list[Any] = []
    deadline = time.monotonic() + WRITER_TIMEOUT_S
    while len(received) < len(processes):
        try:
            report_kind, payload = reports.get(timeout=1.0)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in processes):
                raise BenchError(f"persist: one of the {side} writer processes died") from None
            if time.monotonic() > deadline:
                raise BenchError(f"persist: {side} writers not {kind} after "
                                 f"{WRITER_TIMEOUT_S:.0f} s") from None
            continue
        if report_kind == "failed":
            raise BenchError(f"persist: one of the {side} writers failed: {payload}")
        received.append(payload)
    return received


def stop_processes(processes: Sequence[BaseProcess]) -> None:
    """Wait for each writer to exit; one that does not within 10 s is terminated."""
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
            process.join()


def run_writers(side: str, url: str, shares: Sequence[range], seed: int,
                batch_size: int) -> list[WriterTiming]:
    """One process per share, started together once all have warmed up; their timings."""
    context = multiprocessing.get_context("spawn")
    go, reports = context.Event(), context.Queue()
    processes = [context.Process(target=writer_process, daemon=True,
                                 args=(WriterJob(side, url, share, seed, batch_size), go,
                                       reports))
                 for share in shares]
    try:
        for process in processes:
            process.start()
        await_reports(reports, processes, "ready", side)
        go.set()
        return await_reports(reports, processes, "done", side)
    except BaseException:
        for process in processes:
            if process.is_alive():
                process.terminate()
        raise
    finally:
        stop_processes(processes)


# -- checks ----------------------------------------------------------------------------------
def row_counts(engine: Engine) -> dict[str, int]:
    """Rows per table, and of those the ones the two sides must both have filled in."""
    tables = build_tables()
    emails, parties = tables.emails, tables.parties
    with engine.connect() as connection:
        counts = {table.name: int(connection.execute(
            select(func.count()).select_from(table)).scalar_one())
            for table in (emails, parties, tables.deliveries, tables.links,
                          tables.queue_items, tables.attachments, tables.cases)}
        counts["emails in their own thread"] = int(connection.execute(
            select(func.count()).where(emails.c.thread_id == emails.c.id)).scalar_one())
        counts["parties unresolved"] = int(connection.execute(
            select(func.count()).where(parties.c.resolution == "unresolved")).scalar_one())
    return counts


def check_rows(ours_url: str, plain_url: str, records: int, writers: int) -> None:
    """Ours stored every email, and both databases hold the same rows per table."""
    engines = create_engine_for(ours_url), create_engine_for(plain_url)
    try:
        ours_rows, plain_rows = (row_counts(engine) for engine in engines)
    finally:
        for engine in engines:
            engine.dispose()
    if ours_rows["emails"] != records:
        raise BenchError(f"persist, {writers} writer(s): ours stored {ours_rows['emails']} "
                         f"of {records} emails")
    if ours_rows != plain_rows:
        raise BenchError(f"persist, {writers} writer(s): the reference wrote other rows "
                         f"than ours: {plain_rows} against {ours_rows}")


# -- the benchmark ---------------------------------------------------------------------------
def check_settings(settings: PersistSettings) -> None:
    """Every writer needs a warm-up batch and at least one timed batch."""
    fewest = min(len(share) for writers in settings.writers
                 for share in split_among(settings.records, writers))
    if fewest <= settings.batch_size:
        raise BenchError(f"persist: {settings.records} records leave a writer "
                         f"{fewest}, not more than one batch of {settings.batch_size}")


def measure_round(settings: PersistSettings, round_number: int,
                  writers: int) -> dict[str, float]:
    """Ours and plain with ``writers`` writers, each into a fresh database; their rates."""
    seed = settings.seed * 1000 + round_number
    shares = split_among(settings.records, writers)
    order = [OURS, PLAIN] if round_number % 2 == 0 else [PLAIN, OURS]
    with private_database("persist") as ours_url, private_database("sqla") as plain_url:
        urls = {OURS: ours_url, PLAIN: plain_url}
        rates = {}
        for side in order:
            progress(f"persist round {round_number + 1}: {side}, {writers} writer(s), "
                     f"{settings.records} records")
            rates[side] = combined_rate(run_writers(side, urls[side], shares, seed,
                                                    settings.batch_size))
        check_rows(ours_url, plain_url, settings.records, writers)
    return rates


def writers_figure(writers: int, ours: list[float], plain: list[float]) -> Figure:
    """The median rate of ``writers`` writers against plain SQLAlchemy's with as many; the
    target is on the figures of more than one writer (persist scales by processes)."""
    value = median(ours)
    if writers == 1:
        return Figure("persist records/s (PostgreSQL)", value, "rec/s", median(plain),
                      reference="plain SQLAlchemy",
                      detail={"writers": 1, "rounds": ours, "ceiling_rounds": plain})
    return Figure(f"persist records/s, {writers} writers (PostgreSQL)", value, "rec/s",
                  median(plain), target=f">= {TARGET:,.0f}", meets_target=value >= TARGET,
                  reference="plain SQLAlchemy",
                  detail={"writers": writers, "rounds": ours, "ceiling_rounds": plain})


def run(settings: PersistSettings) -> list[Figure]:
    check_settings(settings)
    rates: dict[tuple[int, str], list[float]] = {
        (writers, side): [] for writers in settings.writers for side in (OURS, PLAIN)}
    for round_number in range(settings.rounds):
        for writers in settings.writers:
            for side, rate in measure_round(settings, round_number, writers).items():
                rates[writers, side].append(rate)
    return [writers_figure(writers, rates[writers, OURS], rates[writers, PLAIN])
            for writers in settings.writers]
