"""The persist benchmark: records per second into PostgreSQL against plain SQLAlchemy.

Takes :class:`PersistSettings`; gives figures.  Builds ``records`` routed documents (4 KB
mail parsed by the parse stage, one delivery each) and stores them with
:class:`~persist.store.EmailStore` in batches of ``batch_size`` (one transaction per batch,
as the persist worker does) into a fresh database.  The ceiling: SQLAlchemy Core inserting the
same rows (the store's own row building, not timed; each email's id taken from its sequence
so that its thread can be itself, as the store writes it) in the same batches into another
fresh database, with plain executemany INSERTs: no ``ON CONFLICT``, no look-ups, no sorting.
A record is one routed document: its email, parties and delivery rows.  The rounds alternate
between the two so that a busy machine hurts both alike.  Fails with
:class:`~bench.common.BenchError` when a server is missing, rows are missing afterwards, or
the two databases do not hold the same number of rows in each table.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine

from bench.common import BenchError, Figure, median, private_database, progress
from bench.mail import plain_mail
from parse.extract import parse_raw
from persist.database import create_engine_for
from persist.store import EmailStore, _prepare
from persist.tables import build_tables
from shared.settings import LimitSettings

TARGET = 8000.0


@dataclass(frozen=True)
class PersistSettings:
    records: int = 20_000
    batch_size: int = 50
    rounds: int = 3
    seed: int = 8


def routed_documents(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    pool = [parse_raw(plain_mail(rng, "<placeholder@example.net>"), "direct",
                      LimitSettings()).emails[0] for _ in range(32)]
    now = datetime.now(UTC)
    documents = []
    for index in range(count):
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


def store_rate(engine: Engine, documents: list[dict[str, Any]], batch: int) -> float:
    store = EmailStore(engine)
    started = time.perf_counter()
    for start in range(0, len(documents), batch):
        store.save(documents[start:start + batch])
    return len(documents) / (time.perf_counter() - started)


def plain_rate(engine: Engine, documents: list[dict[str, Any]], batch: int) -> float:
    """The rows the store writes for these (new) documents, through plain SQLAlchemy Core:
    ids for the batch's emails from their sequence (one statement), then one executemany
    INSERT per table, one transaction per batch."""
    tables = build_tables()
    now = datetime.now(UTC)
    prepared = [_prepare(d, now) for d in documents]  # row building is not timed
    sequence = func.nextval(func.pg_get_serial_sequence("emails", "id"))
    started = time.perf_counter()
    for start in range(0, len(prepared), batch):
        chunk = prepared[start:start + batch]
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
    return len(prepared) / (time.perf_counter() - started)


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


def count_emails(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(
            select(func.count()).select_from(build_tables().emails)).scalar_one())


def run(settings: PersistSettings) -> list[Figure]:
    ours: list[float] = []
    plain: list[float] = []
    for round_number in range(settings.rounds):
        seed = settings.seed * 1000 + round_number
        documents = routed_documents(settings.records, seed)
        with private_database("persist") as ours_url, private_database("sqla") as plain_url:
            ours_engine, plain_engine = create_engine_for(ours_url), create_engine_for(plain_url)
            try:
                order = [("ours", ours_engine), ("plain", plain_engine)]
                if round_number % 2:
                    order.reverse()
                for label, engine in order:
                    progress(f"persist round {round_number + 1}: {label}, "
                             f"{settings.records} records")
                    if label == "ours":
                        ours.append(store_rate(engine, documents, settings.batch_size))
                    else:
                        plain.append(plain_rate(engine, documents, settings.batch_size))
                if count_emails(ours_engine) != settings.records:
                    raise BenchError(f"persist: ours stored {count_emails(ours_engine)} of "
                                     f"{settings.records} emails")
                ours_rows, plain_rows = row_counts(ours_engine), row_counts(plain_engine)
                if ours_rows != plain_rows:
                    raise BenchError(f"persist: the reference wrote other rows than ours: "
                                     f"{plain_rows} against {ours_rows}")
            finally:
                ours_engine.dispose()
                plain_engine.dispose()
    value, ceiling = median(ours), median(plain)
    return [Figure("persist records/s (PostgreSQL)", value, "rec/s", ceiling,
                   target=f">= {TARGET:,.0f}", meets_target=value >= TARGET,
                   reference="plain SQLAlchemy",
                   detail={"rounds": ours, "ceiling_rounds": plain})]
