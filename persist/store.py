"""The email store: routed documents in, email records with their deliveries out.

Takes decoded ``routed`` documents (see ``shared.schemas.RoutedSchema``) and writes a whole
batch in one transaction: one ``emails`` row per ``dedup_key`` (with its parties and
attachments, attachment content stored once per SHA-256), one ``deliveries`` row per
(email, principal) -- tracked or not, with the reason and the rule that fired -- and one
``queue_items`` row per tracked queue delivery; then the records route decided: the email's
thread and correlation (repeating the Message-ID lookup inside the transaction for a reply
whose parent route could not see yet), a case created or linked, its parties resolved to
contacts and accounts (an unknown sender optionally becoming a contact) and ``links`` rows
for each.  Attachment content goes to a :mod:`persist.blobs` store once per SHA-256.  A
Message-ID reused by a different message (another fingerprint) gets a key of its own.
Every insert is ``ON CONFLICT DO NOTHING`` on a natural key, so a redelivered document
changes nothing; the :class:`SaveResult` of each document says what was new.  A batch costs
a fixed number of statements whatever its size: the stored emails looked up (and ids taken
for the new ones) in one, the parties resolved in one (on PostgreSQL both in one round trip
with the transaction's BEGIN), the rows written with one multi-row insert per table (on
PostgreSQL one statement for all of them); a batch that finds one of its new emails stored
meanwhile by another writer starts again from the look-up.
Fails with ``PermanentError("unstorable", ...)`` on a document it cannot store (missing or
ill-typed fields, a value the database refuses; the whole batch is rolled back, so the caller
can retry the documents one by one) and ``TransientError`` when the database is unreachable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from persist.blobs import BlobStore, DatabaseBlobStore, sanitise_filename
from persist.database import KeptConnection, pipelined, translate_errors
from persist.directory_store import (
    DirectoryStore,
    PartyRef,
    match_parties,
    party_parameters,
    party_statement,
)
from persist.history import known_by_message_ids
from persist.tables import CORRELATION_METHODS, Tables, build_tables
from route.directory import address_keys, strict_address
from route.history import KnownEmail
from route.tracking import NOT_A_REPLY
from shared import fastjson
from shared.errors import PermanentError, TransientError

PARTY_FIELDS = (("from", "from_"), ("to", "to"), ("cc", "cc"), ("reply_to", "reply_to"))
MAX_BIGINT = 2**63 - 1
# A batch that loses the race for a new email to another writer is redone from its look-up;
# the other writer has committed by then, so the second attempt finds the email.
RACE_ATTEMPTS = 3
# The tables a batch's rows go to, in this order (parents first).
_WRITTEN = ("emails", "parties", "attachments", "deliveries", "queue_items")
_NEW_DELIVERY = ("email_id", "principal_kind", "principal")

DeliveryKey = tuple[int, str, str]  # (email_id, principal_kind, principal)


@dataclass(frozen=True)
class DeliveryOutcome:
    principal_kind: str
    principal: str
    new: bool


@dataclass(frozen=True)
class SaveResult:
    """What saving one routed document did."""

    email_id: int
    dedup_key: str
    email_new: bool
    deliveries: tuple[DeliveryOutcome, ...]

    @property
    def changed_anything(self) -> bool:
        return self.email_new or any(d.new for d in self.deliveries)


@dataclass
class _Prepared:
    """One routed document turned into rows (email_id filled in later)."""

    dedup_key: str
    email: dict[str, Any]
    parties: list[dict[str, Any]]
    attachments: list[dict[str, Any]]
    contents: list[dict[str, Any]]
    deliveries: list[dict[str, Any]]
    correlation: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    email_id: int = field(default=0)


class _LostRace(Exception):
    """Another transaction stored an email this batch was about to create."""


class EmailStore:
    """Idempotent batch writes of routed documents, and the reads the CLI and tests need."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] | None = None,
                 blobs: BlobStore | None = None, create_unknown_contacts: bool = False
                 ) -> None:
        self._engine = engine
        self._tables: Tables = build_tables()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._blobs: BlobStore = blobs or DatabaseBlobStore()
        self._directory = DirectoryStore(engine, self._clock)
        self._create_unknown_contacts = create_unknown_contacts
        self._json_inserts: dict[Any, str] = {}  # statements by the shape of their rows
        self._kept = KeptConnection(engine)
        self._party_sql: str | None = None  # party_statement, compiled for PostgreSQL

    @property
    def tables(self) -> Tables:
        return self._tables

    def save(self, routed_documents: Sequence[dict[str, Any]]) -> list[SaveResult]:
        """Store every document in one transaction; results in the order given."""
        if not routed_documents:
            return []
        for _ in range(RACE_ATTEMPTS):
            now = self._clock()
            # prepared afresh for each attempt: saving fills in and rekeys the items
            prepared = [_prepare(document, now) for document in routed_documents]
            self._store_contents(prepared)
            try:
                with translate_errors(), self._transaction() as connection:
                    return self._save(connection, prepared, now)
            except _LostRace:
                continue
        raise TransientError(f"another writer kept storing this batch's emails first "
                             f"({RACE_ATTEMPTS} attempts)")

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A transaction on the kept connection (PostgreSQL; see KeptConnection)."""
        with self._kept.use() as connection, connection.begin():
            yield connection

    def close(self) -> None:
        """Give back the kept connection (a later save makes a new one)."""
        self._kept.close()

    def _save(self, connection: Connection, prepared: list[_Prepared],
              now: datetime) -> list[SaveResult]:
        """The batch in a constant number of statements: look up the stored emails and take
        ids for the new ones, thread them, resolve their parties, then write the rows."""
        wanted = {address: address_keys(address) for address in {
            strict_address(row["address"]) for item in prepared for row in item.parties}
            if address}
        first_items, refs = self._assign_emails(connection, prepared, wanted)
        new_keys = set(first_items)
        new_items = list(first_items.values())  # in the order of the documents
        links = self._thread(connection, new_items)
        parties, attachments = self._email_details(connection, new_items, refs)
        deliveries, queue_items = self._delivery_rows(prepared, now)
        # A stable order keeps concurrent batches from deadlocking on each other's keys.
        emails = [{**item.email, "id": item.email_id}
                  for item in sorted(new_items, key=lambda i: i.dedup_key)]
        new_deliveries = self._write(connection, {
            "emails": emails, "parties": parties, "attachments": attachments,
            "deliveries": deliveries, "queue_items": queue_items},
            {item.email_id for item in new_items})
        self._make_records(connection, prepared, new_keys, parties, links, now)
        return _results(prepared, new_keys, new_deliveries)

    def _store_contents(self, prepared: list[_Prepared]) -> None:
        """Content into the blob store before the commit (see ``persist.blobs``)."""
        for item in prepared:
            for row in item.contents:
                row["storage"] = self._blobs.storage
                if self._blobs.storage != "database":
                    self._blobs.put(row["sha256"], row["content"])
                    row["content"] = None

    # -- writing --------------------------------------------------------------------------

    def _insert(self, connection: Connection, table: Table) -> Any:
        if connection.dialect.name == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        if connection.dialect.name == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        raise RuntimeError(f"unsupported database dialect {connection.dialect.name!r}")

    def _insert_rows(self, connection: Connection, table: Table, rows: list[dict[str, Any]],
                     returning: tuple[str, ...] = ()) -> list[Any]:
        """``INSERT ... ON CONFLICT DO NOTHING`` of every row in one statement; gives the
        ``returning`` columns of the rows inserted.  On PostgreSQL the rows travel as one JSON
        parameter expanded by ``json_populate_recordset``: binding each value through
        SQLAlchemy and psycopg cost more CPU than PostgreSQL spent storing the rows."""
        if not rows:
            return []
        if connection.dialect.name != "postgresql" or table.name == "attachment_contents":
            # (attachment content is bytes, which JSON would carry as hex: twice the size)
            statement = self._insert(connection, table)
            if returning:
                statement = statement.returning(*(table.c[name] for name in returning))
                return list(connection.execute(statement, rows).all())
            connection.execute(statement, rows)
            return []
        sql = self._json_inserts.get((table.name, tuple(rows[0]), returning))
        if sql is None:
            quote = connection.dialect.identifier_preparer.quote
            columns = ", ".join(quote(name) for name in rows[0])
            sql = (f"INSERT INTO {quote(table.name)} ({columns}) SELECT {columns} "
                   f"FROM json_populate_recordset(NULL::{quote(table.name)}, %(rows)s::json) "
                   "ON CONFLICT DO NOTHING")
            if returning:
                sql += " RETURNING " + ", ".join(quote(name) for name in returning)
            self._json_inserts[(table.name, tuple(rows[0]), returning)] = sql
        result = connection.exec_driver_sql(
            sql, {"rows": fastjson.dumps(rows, default=_json_value).decode()})
        return list(result.all()) if returning else []

    def _assign_emails(self, connection: Connection, prepared: list[_Prepared],
                       parties: dict[str, tuple[str, ...]]
                       ) -> tuple[dict[str, _Prepared], dict[str, PartyRef]]:
        """Give every item its email id: the stored email's, or a new id taken from the
        emails' sequence.  A stored email with the same Message-ID but another fingerprint is
        another message: the newcomer gets the key ``mid:<id>#fp:<fingerprint>``.  Gives the
        first item of each email this batch creates, by key, and the contacts and accounts
        of the ``parties`` addresses (looked up with the emails)."""
        keys = {item.dedup_key for item in prepared}
        keys |= {_reused_key(item) for item in prepared if item.dedup_key.startswith("mid:")}
        # each document makes at most one new email: under its key or its reused-key
        at_most = len({(item.dedup_key, item.email["fingerprint"]) for item in prepared})
        stored, spare_ids, refs = self._look_up(connection, sorted(keys), at_most, parties)
        first_items: dict[str, _Prepared] = {}
        for item in prepared:
            found = stored.get(item.dedup_key)
            if (found is not None and item.dedup_key.startswith("mid:")
                    and found[1] != item.email["fingerprint"]):
                item.dedup_key = _reused_key(item)
                item.email = {**item.email, "dedup_key": item.dedup_key,
                              "notes": [*(item.email.get("notes") or []), "message-id-reused"]}
                found = stored.get(item.dedup_key)
            if found is not None:
                item.email_id = found[0]
            else:
                first_items.setdefault(item.dedup_key, item)
        ids = dict(zip(sorted(first_items), spare_ids[:len(first_items)], strict=True))
        for item in prepared:
            if item.dedup_key in ids:
                item.email_id = ids[item.dedup_key]
        return first_items, refs

    def _look_up(self, connection: Connection, keys: list[str], new_ids: int,
                 parties: dict[str, tuple[str, ...]]
                 ) -> tuple[dict[str, tuple[int, str]], list[int], dict[str, PartyRef]]:
        """The stored emails among ``keys`` (id and fingerprint by key), ``new_ids`` ids for
        new emails (unused ones are gaps, as a conflicting insert leaves anyway), and the
        contacts and accounts of the ``parties`` addresses."""
        if connection.dialect.name != "postgresql":
            stored, spare_ids = self._look_up_emails_sqlite(connection, keys, new_ids)
            rows = connection.execute(party_statement(self._tables, "sqlite"),
                                      party_parameters(parties)).all() if parties else []
            return stored, spare_ids, match_parties(parties, rows)
        if self._party_sql is None:
            self._party_sql = str(party_statement(self._tables, "postgresql")
                                  .compile(dialect=connection.dialect))
        # BEGIN, the emails and the parties in one round trip: at a few hundred mails a
        # second persist's batches are small, and each round trip waited for PostgreSQL to be
        # scheduled on a busy machine.
        with pipelined(connection) as raw:
            emails = raw.execute(
                "SELECT id, dedup_key, fingerprint FROM emails WHERE dedup_key = ANY(%(keys)s) "
                "UNION ALL SELECT nextval(pg_get_serial_sequence('emails', 'id')), NULL, NULL "
                "FROM generate_series(1, %(count)s)", {"keys": keys, "count": new_ids})
            found = raw.execute(self._party_sql, party_parameters(parties)) if parties else None
        rows = emails.fetchall()
        refs = match_parties(parties, found.fetchall()) if found is not None else {}
        return ({key: (int(i), fingerprint) for i, key, fingerprint in rows if key is not None},
                [int(i) for i, key, _ in rows if key is None], refs)

    def _look_up_emails_sqlite(self, connection: Connection, keys: list[str], new_ids: int
                               ) -> tuple[dict[str, tuple[int, str]], list[int]]:
        emails = self._tables.emails
        stored = {row.dedup_key: (int(row.id), row.fingerprint) for row in connection.execute(
            select(emails.c.id, emails.c.dedup_key, emails.c.fingerprint)
            .where(emails.c.dedup_key.in_(keys)))}
        # SQLite: the transaction holds the write lock from its BEGIN IMMEDIATE
        highest = connection.execute(select(func.max(emails.c.id))).scalar() or 0
        return stored, list(range(highest + 1, highest + 1 + new_ids))

    def _write(self, connection: Connection, rows: dict[str, list[dict[str, Any]]],
               new_ids: set[int]) -> set[DeliveryKey]:
        """Insert the batch's rows (by table name, in the order of ``_WRITTEN``); gives the
        deliveries that were new.  Raises ``_LostRace`` when an email this batch meant to
        create was stored by another transaction since the look-up."""
        if connection.dialect.name == "postgresql":
            inserted = self._write_in_one_statement(connection, rows, new_ids)
            emails = {int(row[1]) for row in inserted if row[0] == "email"}
            deliveries = [row[1:] for row in inserted if row[0] == "delivery"]
        else:
            tables = self._tables.metadata.tables
            emails = {int(row.id) for row in self._insert_rows(
                connection, tables["emails"], rows["emails"], returning=("id",))}
            if emails != new_ids:
                raise _LostRace()
            for name in ("parties", "attachments"):
                self._insert_rows(connection, tables[name], rows[name])
            deliveries = self._insert_rows(connection, tables["deliveries"], rows["deliveries"],
                                           returning=_NEW_DELIVERY)
            self._insert_rows(connection, tables["queue_items"], rows["queue_items"])
        if emails != new_ids:
            # another transaction stored one of these keys after the look-up: start again
            raise _LostRace()
        return {(int(e), str(k), str(p)) for e, k, p in deliveries}

    def _write_in_one_statement(self, connection: Connection,
                                rows: dict[str, list[dict[str, Any]]],
                                new_ids: set[int]) -> list[Any]:
        """PostgreSQL: every table's rows in one statement of data-modifying CTEs (each
        statement cost a round trip, which on a busy machine cost more than the work).  The
        rows of new emails are kept only if their email was inserted, so a lost race is
        seen as missing email ids rather than as a foreign key violation."""
        present = tuple((name, tuple(rows[name][0])) for name in _WRITTEN if rows[name])
        sql = self._json_inserts.get(present)
        if sql is None:
            sql = self._statement_for(connection, present)
            self._json_inserts[present] = sql
        parameters: dict[str, Any] = {
            name: fastjson.dumps(rows[name], default=_json_value).decode()
            for name, _ in present}
        parameters["new_ids"] = sorted(new_ids)
        return list(connection.exec_driver_sql(sql, parameters).all())

    def _statement_for(self, connection: Connection,
                       present: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
        quote = connection.dialect.identifier_preparer.quote
        names = {name for name, _ in present}
        inserted_email = "r.email_id IN (SELECT id FROM new_emails)" if "emails" in names \
            else "false"
        ctes = []
        for name, columns in present:
            listed = ", ".join(quote(column) for column in columns)
            where = ""
            if name in ("parties", "attachments"):  # always of new emails
                where = f" WHERE {inserted_email}"
            elif name in ("deliveries", "queue_items"):  # of new or stored emails
                where = f" WHERE r.email_id <> ALL(%(new_ids)s::bigint[]) OR {inserted_email}"
            returning = {"emails": " RETURNING id",
                         "deliveries": " RETURNING " + ", ".join(_NEW_DELIVERY)}.get(name, "")
            ctes.append(f"new_{name} AS (INSERT INTO {quote(name)} ({listed}) SELECT {listed} "
                        f"FROM json_populate_recordset(NULL::{quote(name)}, %({name})s::json) r"
                        f"{where} ON CONFLICT DO NOTHING{returning})")
        results = []
        if "emails" in names:
            results.append("SELECT 'email', id, NULL, NULL FROM new_emails")
        if "deliveries" in names:
            results.append("SELECT 'delivery', " + ", ".join(_NEW_DELIVERY)
                           + " FROM new_deliveries")
        return "WITH " + ", ".join(ctes) + " " + " UNION ALL ".join(results)

    def _email_details(self, connection: Connection, new_items: list[_Prepared],
                       refs: dict[str, PartyRef]
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Parties (resolved to contacts and accounts: ``refs``, by strict address) and
        attachments of emails this batch creates; their attachment content is stored here."""
        parties: list[dict[str, Any]] = []
        attachments: list[dict[str, Any]] = []
        contents: dict[str, dict[str, Any]] = {}
        for item in new_items:  # the first document of each new email
            parties.extend({**row, "email_id": item.email_id} for row in item.parties)
            attachments.extend({**row, "email_id": item.email_id} for row in item.attachments)
            contents.update((row["sha256"], row) for row in item.contents)
        tables = self._tables
        self._insert_rows(connection, tables.attachment_contents,
                          [contents[sha] for sha in sorted(contents)])
        if parties:
            strict = {a: strict_address(a) for a in {row["address"] for row in parties}}
            internal = {address: kind for item in new_items
                        for address, kind in (item.records.get("principals") or {}).items()}
            for row in parties:
                address = strict[row["address"]] or ""
                ref = refs.get(address)
                row["resolution"] = (ref.kind if ref else internal.get(address)
                                     or "unresolved")
                row["contact_id"] = ref.id if ref and ref.kind == "contact" else None
                row["account_id"] = (ref.id if ref and ref.kind == "account"
                                     else ref.account_id if ref else None)
        return parties, attachments

    def _delivery_rows(self, prepared: list[_Prepared], now: datetime
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """One row per (email, principal), and a queue item per tracked queue delivery."""
        rows: dict[DeliveryKey, dict[str, Any]] = {}
        # the records route decided for the document that carried each delivery: one email
        # can arrive in a batch through several mailboxes, each with its own decision
        records: dict[DeliveryKey, dict[str, Any]] = {}
        for item in prepared:
            for row in item.deliveries:
                key = (item.email_id, row["principal_kind"], row["principal"])
                if key not in rows:
                    rows[key] = {**row, "email_id": item.email_id}
                    records[key] = item.records
        queue_rows = []
        for key in sorted(rows):
            email_id, kind, principal = key
            row = rows[key]
            if kind != "queue" or not row["tracked"]:
                continue
            record = records.get(key) or {}
            own = record.get("rule") is not None and record.get("rule") == row["rule"]
            queue_rows.append({"email_id": email_id, "queue": principal, "state": "active",
                               "created_at": now, "rule": row["rule"],
                               "priority": record.get("priority") if own else None,
                               "owner": record.get("owner") if own else None})
        return [rows[key] for key in sorted(rows)], queue_rows

    def _thread(self, connection: Connection, new_items: list[_Prepared]
                ) -> list[dict[str, Any]]:
        """Thread, parent and correlation of each new email, set on its row before the insert;
        gives the links to parents.  A reply whose parent route could not see (not committed
        yet) is looked up again here, among the stored emails and the batch's own."""
        late = [item for item in new_items if item.correlation.get("parent_email_id") is None
                and item.correlation.get("candidates")]
        known: dict[str, KnownEmail] = {}
        if late:
            candidates = sorted({str(m) for item in late for m in item.correlation["candidates"]})
            known = {k.message_id or "": k
                     for k in known_by_message_ids(connection, self._tables, candidates)}
            for item in sorted(new_items, key=lambda i: i.email_id):  # the oldest id first
                message_id = item.email.get("message_id")
                if message_id is not None and message_id not in known:
                    known[message_id] = KnownEmail(
                        email_id=item.email_id, thread_id=item.email_id, message_id=message_id,
                        tracked=bool(item.email["tracked"]))
        threads: dict[int, int] = {}  # email id -> thread id, for parents in this batch
        links: list[dict[str, Any]] = []
        for item in new_items:
            correlation = item.correlation
            if correlation.get("parent_email_id") is None and correlation.get("candidates"):
                self._resolve_late(item, known, threads)
            parent_id = correlation.get("parent_email_id")
            thread_id = correlation.get("thread_id")
            threads[item.email_id] = item.email_id if thread_id is None else int(thread_id)
            method = correlation.get("method") or "none"
            item.email.update(thread_id=threads[item.email_id], parent_email_id=parent_id,
                              correlation_method=method if method in CORRELATION_METHODS
                              else "none", correlation=correlation,
                              tracked=any(d["tracked"] for d in item.deliveries))
            if parent_id is not None and parent_id != item.email_id:
                links.append({"email_id": item.email_id, "target_kind": "email",
                              "target_id": parent_id, "method": method})
        return links

    def _resolve_late(self, item: _Prepared, known: dict[str, KnownEmail],
                      threads: dict[int, int]) -> None:
        correlation = item.correlation
        found = [k for m in correlation["candidates"]
                 if (k := known.get(str(m))) is not None and k.email_id != item.email_id]
        if not found:
            return
        parent = found[0]
        direct = parent.message_id == item.email.get("in_reply_to")
        correlation.update(method="in-reply-to" if direct else "references",
                           parent_email_id=parent.email_id,
                           parent_message_id=parent.message_id,
                           thread_id=threads.get(parent.email_id, parent.thread_id),
                           case_id=parent.case_id, parent_tracked=parent.tracked,
                           resolved_by="persist")
        if not parent.tracked:
            return
        for delivery in item.deliveries:  # "replies" tracking, now that the parent is known
            if delivery["untracked_reason"] == NOT_A_REPLY:
                delivery.update(tracked=True, untracked_reason=None)

    def _make_records(self, connection: Connection, prepared: list[_Prepared],
                      new_keys: set[str], party_rows: list[dict[str, Any]],
                      links: list[dict[str, Any]], now: datetime) -> None:
        """Cases and links of tracked emails; unknown senders as contacts when configured."""
        emails = self._tables.emails
        linked: set[int] = set()
        became_tracked: list[dict[str, Any]] = []
        got_rule: list[dict[str, Any]] = []
        wanted_cases: list[_Prepared] = []
        written: set[int] = set()  # emails whose row this batch wrote from its first document
        for item in prepared:  # every document: another recipient may bring another rule
            first = item.dedup_key in new_keys and item.email_id not in written
            written.add(item.email_id)
            if not any(d["tracked"] for d in item.deliveries):
                continue
            if not first:
                became_tracked.append({"b_id": item.email_id})
                if item.records.get("rule"):
                    got_rule.append({"b_id": item.email_id, "b_rule": item.records["rule"]})
            wanted_cases.append(item)
            if item.dedup_key in new_keys:
                linked.add(item.email_id)
        if became_tracked:
            connection.execute(update(emails).where(
                emails.c.id == bindparam("b_id"), emails.c.tracked.is_(False)
            ).values(tracked=True), became_tracked)
        if got_rule:
            connection.execute(update(emails).where(
                emails.c.id == bindparam("b_id"), emails.c.rule.is_(None)
            ).values(rule=bindparam("b_rule")), got_rule)
        links = links + self._cases_for(connection, wanted_cases, now)
        links += self._party_links(connection, [r for r in party_rows if r["email_id"] in linked])
        self._insert_rows(connection, self._tables.links, links)

    def _cases_for(self, connection: Connection, items: list[_Prepared],
                   now: datetime) -> list[dict[str, Any]]:
        """Create the cases the rules ask for; gives each email's link to its case."""
        cases = self._tables.cases
        targets: list[tuple[_Prepared, int | None, str]] = []
        create: dict[int, dict[str, Any]] = {}  # by the email it is created from
        for item in items:
            records = item.records
            if records.get("case") == "link":
                targets.append((item, records.get("case_id"), "thread"))
            elif records.get("link_case") and item.correlation.get("case_id") is not None:
                targets.append((item, item.correlation["case_id"], "thread"))  # found by persist
            elif records.get("case") == "create":
                targets.append((item, None, "created"))
                create.setdefault(item.email_id, {  # the first delivery of the email wins
                    "title": (records.get("title") or item.email["subject"]
                              or "(no subject)")[:500],
                    "state": "open", "priority": records.get("priority"),
                    "owner": records.get("owner"), "queue": records.get("queue"),
                    "rule": records.get("rule") or "", "created_from_email_id": item.email_id,
                    "thread_id": item.correlation.get("thread_id") or item.email_id,
                    "created_at": now})
        created: dict[int, int] = {}
        if create:
            created = {int(email_id): int(case_id) for case_id, email_id in self._insert_rows(
                connection, cases, [create[e] for e in sorted(create)],
                returning=("id", "created_from_email_id"))}
            if missing := sorted(set(create) - set(created)):  # created by an earlier batch
                created.update({int(email_id): int(case_id) for case_id, email_id in
                                connection.execute(select(cases.c.id,
                                                          cases.c.created_from_email_id)
                                                   .where(cases.c.created_from_email_id
                                                          .in_(missing)))})
        links: list[dict[str, Any]] = []
        for item, case_id, method in targets:
            if method == "created":
                case_id = created[item.email_id]
            if case_id is not None:
                links.append({"email_id": item.email_id, "target_kind": "case",
                              "target_id": int(case_id), "method": method})
        return links

    def _party_links(self, connection: Connection,
                     party_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Links from each new tracked email to its parties' contacts and accounts (the rows
        as this batch stored them, in their order)."""
        parties = self._tables.parties
        links: dict[tuple[int, str, int], str] = {}
        for row in party_rows:
            contact_id, account_id = row["contact_id"], row["account_id"]
            if (row["role"] == "from" and row["resolution"] == "unresolved"
                    and self._create_unknown_contacts
                    and (address := strict_address(row["address"])) is not None):
                ref: PartyRef = self._directory.ensure_contact(connection, address, row["name"])
                contact_id = ref.id
                connection.execute(update(parties).where(
                    parties.c.email_id == row["email_id"], parties.c.role == row["role"],
                    parties.c.address == row["address"]).values(
                    resolution="contact", contact_id=ref.id))
                links.setdefault((row["email_id"], "contact", ref.id), "created-from-sender")
            if contact_id is not None:
                links.setdefault((row["email_id"], "contact", int(contact_id)), row["role"])
            if account_id is not None:
                links.setdefault((row["email_id"], "account", int(account_id)), row["role"])
        return [{"email_id": email_id, "target_kind": kind, "target_id": target,
                 "method": method} for (email_id, kind, target), method in sorted(links.items())]

    # -- reading --------------------------------------------------------------------------

    def count_rows(self) -> dict[str, int]:
        """Rows in each table, by table name."""
        with translate_errors(), self._engine.connect() as connection:
            return {
                table.name: int(connection.execute(
                    select(func.count()).select_from(table)).scalar_one())
                for table in self._tables.metadata.sorted_tables
            }

    def list_emails(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest emails first (no bodies), each with its number of deliveries."""
        emails = self._tables.emails
        return self._all(self._summaries().order_by(emails.c.id.desc()).limit(limit))

    def _summaries(self) -> Any:
        """The columns of an email in a list (no bodies), with its number of deliveries."""
        emails, deliveries = self._tables.emails, self._tables.deliveries
        delivery_count = (
            select(func.count()).where(deliveries.c.email_id == emails.c.id).scalar_subquery()
        )
        return select(emails.c.id, emails.c.dedup_key, emails.c.message_id, emails.c.subject,
                      emails.c.sent_at, emails.c.from_address, emails.c.size,
                      emails.c.first_seen_at, emails.c.tracked, emails.c.correlation_method,
                      emails.c.thread_id, emails.c.rule, delivery_count.label("deliveries"))

    def search_emails(self, text: str, limit: int = 100) -> list[dict[str, Any]]:
        """Emails whose Message-ID is ``text`` (with or without <>), or whose subject, sender
        or any party's or delivery's address contains it (case-insensitive); newest first,
        the same columns as :meth:`list_emails`."""
        emails, parties = self._tables.emails, self._tables.parties
        deliveries = self._tables.deliveries
        text = text.strip()
        if not text:
            return self.list_emails(limit)
        pattern = "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%") \
            .replace("_", "\\_") + "%"

        def contains(column: Any) -> Any:
            return func.lower(column).like(pattern, escape="\\")

        message_id = text[1:-1] if text.startswith("<") and text.endswith(">") else text
        matching = (
            (emails.c.message_id == message_id) | contains(emails.c.subject)
            | contains(emails.c.from_address)
            | emails.c.id.in_(select(parties.c.email_id).where(contains(parties.c.address)))
            | emails.c.id.in_(select(deliveries.c.email_id)
                              .where(contains(deliveries.c.address))))
        return self._all(self._summaries().where(matching).order_by(emails.c.id.desc())
                         .limit(limit))

    def count_emails(self, since: datetime | None = None) -> int:
        """Emails stored (first seen at or after ``since``, when given)."""
        emails = self._tables.emails
        query = select(func.count()).select_from(emails)
        if since is not None:
            query = query.where(emails.c.first_seen_at >= since)
        with translate_errors(), self._engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def email(self, email_id: int) -> dict[str, Any] | None:
        """One email row with its bodies, or None."""
        emails = self._tables.emails
        rows = self._all(select(emails).where(emails.c.id == email_id))
        return rows[0] if rows else None

    def email_id_for(self, dedup_key: str) -> int | None:
        emails = self._tables.emails
        rows = self._all(select(emails.c.id).where(emails.c.dedup_key == dedup_key))
        return int(rows[0]["id"]) if rows else None

    def deliveries_for(self, email_id: int) -> list[dict[str, Any]]:
        deliveries = self._tables.deliveries
        return self._all(
            select(deliveries).where(deliveries.c.email_id == email_id).order_by(deliveries.c.id)
        )

    def parties_for(self, email_id: int) -> list[dict[str, Any]]:
        parties = self._tables.parties
        return self._all(
            select(parties.c.role, parties.c.address, parties.c.name)
            .where(parties.c.email_id == email_id)
            .order_by(parties.c.id)
        )

    def resolved_parties_for(self, email_id: int) -> list[dict[str, Any]]:
        """Parties with what each address resolved to (contact, account or unresolved)."""
        parties = self._tables.parties
        return self._all(
            select(parties.c.role, parties.c.address, parties.c.name, parties.c.resolution,
                   parties.c.contact_id, parties.c.account_id)
            .where(parties.c.email_id == email_id)
            .order_by(parties.c.id)
        )

    def attachments_for(self, email_id: int) -> list[dict[str, Any]]:
        attachments = self._tables.attachments
        return self._all(
            select(attachments.c.sha256, attachments.c.filename,
                   attachments.c.declared_filename, attachments.c.content_type,
                   attachments.c.size, attachments.c.status)
            .where(attachments.c.email_id == email_id)
            .order_by(attachments.c.id)
        )

    def queue_items_for(self, email_id: int) -> list[dict[str, Any]]:
        items = self._tables.queue_items
        return self._all(
            select(items).where(items.c.email_id == email_id).order_by(items.c.id)
        )

    def attachment_content(self, sha256: str) -> bytes | None:
        contents = self._tables.attachment_contents
        rows = self._all(select(contents.c.content, contents.c.storage)
                         .where(contents.c.sha256 == sha256))
        if not rows:
            return None
        if rows[0]["content"] is not None:
            return bytes(rows[0]["content"])
        return self._blobs.get(sha256)

    def links_for(self, email_id: int) -> list[dict[str, Any]]:
        links = self._tables.links
        return self._all(select(links.c.target_kind, links.c.target_id, links.c.method)
                         .where(links.c.email_id == email_id).order_by(links.c.id))

    def cases_for(self, email_id: int) -> list[dict[str, Any]]:
        """The cases the email is linked to (created by it or by its thread)."""
        cases, links = self._tables.cases, self._tables.links
        return self._all(
            select(cases, links.c.method.label("link"))
            .join(links, (links.c.target_kind == "case") & (links.c.target_id == cases.c.id))
            .where(links.c.email_id == email_id).order_by(cases.c.id))

    def _all(self, query: Any) -> list[dict[str, Any]]:
        with translate_errors(), self._engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]


# -- turning a routed document into rows -----------------------------------------------------


def _prepare(document: dict[str, Any], now: datetime) -> _Prepared:
    try:
        return _rows_for(document, now)
    except PermanentError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        trace = document.get("trace_id") if isinstance(document, dict) else None
        raise PermanentError(
            "unstorable", f"routed document {trace or '(no trace_id)'}: {type(exc).__name__}: {exc}"
        ) from exc


def _rows_for(document: dict[str, Any], now: datetime) -> _Prepared:
    email = document["email"]
    source = document["source"]
    trace_id = _text(document["trace_id"])
    dedup_key = _text(email["dedup_key"])
    if not dedup_key:
        raise ValueError("empty dedup_key")
    senders = _addresses(email, "from_")
    correlation = dict(document.get("correlation") or {})
    records = dict(document.get("records") or {})
    fastjson.dumps([correlation, records])  # refuse what the JSON columns could not store
    deliveries = [_delivery_row(d, source, trace_id, now) for d in document["deliveries"]]
    email_row = {
        "dedup_key": dedup_key,
        "message_id": _optional_text(email.get("message_id")),
        "subject": _text(email.get("subject") or ""),
        "sent_at": _optional_datetime(email.get("date")),
        "from_address": senders[0]["address"] if senders else None,
        "in_reply_to": _optional_text(email.get("in_reply_to")),
        "text_body": _optional_text(email.get("text")),
        "html_body": _optional_text(email.get("html")),
        "fingerprint": _text(email["fingerprint"]),
        "size": _bigint(email["size"], "email.size"),
        "defects": [_text(d) for d in email.get("defects") or []],
        "trace_id": trace_id,
        "first_seen_at": now,
        "subject_key": _optional_text(correlation.get("subject_key")),
        "thread_index_root": _optional_text(correlation.get("thread_index_root")),
        "correlation_method": _optional_text(correlation.get("method")) or "none",
        "correlation": correlation,
        "tracked": any(d["tracked"] for d in deliveries),
        "rule": _optional_text(records.get("rule")),
        "notes": [_text(n) for n in records.get("notes") or []],
    }
    parties: dict[tuple[str, str], dict[str, Any]] = {}
    for role, key in PARTY_FIELDS:
        for party in _addresses(email, key):
            # one party per address, compared as routing compares them: case-insensitively
            parties.setdefault((role, party["address"].lower()), {"role": role, **party})
    attachments: dict[tuple[str, str], dict[str, Any]] = {}
    contents: list[dict[str, Any]] = []
    for attachment in email.get("attachments") or []:
        status = _text(attachment.get("status") or "stored")
        declared = _optional_text(attachment.get("declared_filename"))
        if status != "stored":
            sha256 = _text(attachment["sha256"]).lower()
            filename = sanitise_filename(_text(attachment["filename"]))
            attachments.setdefault((sha256, filename), {
                "sha256": sha256, "filename": filename, "status": status,
                "declared_filename": declared,
                "content_type": _text(attachment["content_type"]),
                "size": _bigint(attachment["size"], "attachment.size")})
            continue
        content = attachment["content"]
        if not isinstance(content, bytes | bytearray | memoryview):
            raise TypeError(f"attachment content is {type(content).__name__}, not bytes")
        content = bytes(content)
        sha256 = hashlib.sha256(content).hexdigest()
        if str(attachment["sha256"]).lower() != sha256:
            raise PermanentError("unstorable", f"attachment {attachment.get('filename')!r}: "
                                 "sha256 does not match its content")
        filename = sanitise_filename(_text(attachment["filename"]))
        attachments.setdefault((sha256, filename), {
            "status": "stored",
            "sha256": sha256,
            "filename": filename,
            "declared_filename": declared,
            "content_type": _text(attachment["content_type"]),
            "size": len(content),
        })
        contents.append({"sha256": sha256, "size": len(content), "content": content})
    if not deliveries:
        raise ValueError("a routed document needs at least one delivery")
    return _Prepared(
        dedup_key=dedup_key,
        email=email_row,
        parties=list(parties.values()),
        attachments=list(attachments.values()),
        contents=contents,
        deliveries=deliveries,
        correlation=correlation,
        records=records,
    )


def _delivery_row(
    delivery: dict[str, Any], source: dict[str, Any], trace_id: str, now: datetime
) -> dict[str, Any]:
    evidence = dict(delivery.get("evidence") or {})
    fastjson.dumps(evidence)  # refuse what the JSON column could not store (TypeError)
    uidvalidity = source.get("uidvalidity")
    return {
        "principal_kind": _text(delivery["principal_kind"]),
        "principal": _text(delivery["principal"]),
        "address": _text(delivery["address"]),
        "mailbox": _text(delivery["mailbox"]),
        "method": _text(delivery["method"]),
        "evidence": evidence,
        "source_mailbox": _text(source["mailbox"]),
        "source_folder": _text(source["folder"]),
        "source_uidvalidity": None if uidvalidity is None else _bigint(uidvalidity, "uidvalidity"),
        "source_uid": _text(str(source["uid"])),
        "trace_id": trace_id,
        "created_at": now,
        "tracked": bool(delivery.get("tracked", True)),
        "untracked_reason": _optional_text(delivery.get("untracked_reason")),
        "rule": _optional_text(delivery.get("rule")),
    }


def _addresses(email: dict[str, Any], key: str) -> list[dict[str, str]]:
    # Decoded documents carry "from_" (the schema's attribute); accept the wire name too.
    values: Iterable[dict[str, Any]] = email.get(key) or (
        email.get("from") or [] if key == "from_" else []
    )
    return [
        {"address": _text(v["address"]), "name": _text(v.get("name") or "")} for v in values
    ]


def _results(
    prepared: list[_Prepared], new_keys: set[str], new_deliveries: set[DeliveryKey]
) -> list[SaveResult]:
    credited_emails: set[str] = set()
    credited_deliveries: set[DeliveryKey] = set()
    results = []
    for item in prepared:
        # When a batch holds the same email or delivery twice, only the first is "new".
        email_new = item.dedup_key in new_keys and item.dedup_key not in credited_emails
        credited_emails.add(item.dedup_key)
        outcomes = []
        for row in item.deliveries:
            key = (item.email_id, row["principal_kind"], row["principal"])
            new = key in new_deliveries and key not in credited_deliveries
            credited_deliveries.add(key)
            outcomes.append(DeliveryOutcome(row["principal_kind"], row["principal"], new))
        results.append(SaveResult(item.email_id, item.dedup_key, email_new, tuple(outcomes)))
    return results


def _reused_key(item: _Prepared) -> str:
    return f"{item.dedup_key}#fp:{item.email['fingerprint']}"


def _json_value(value: Any) -> Any:
    """What json.dumps cannot write itself: timestamps (ISO 8601 with their offset)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: persist stores aware datetimes only")
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def _text(value: Any) -> str:
    """A string PostgreSQL will take: no NUL characters, no lone surrogates."""
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _optional_datetime(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"expected an aware datetime, got {value!r}")
    return value


def _bigint(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BIGINT:
        raise ValueError(f"{what}: {value!r} is not a non-negative 64-bit integer")
    return value
