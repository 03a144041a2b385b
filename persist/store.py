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
changes nothing; the :class:`SaveResult` of each document says what was new.
Fails with ``PermanentError("unstorable", ...)`` on a document it cannot store (missing or
ill-typed fields, a value the database refuses; the whole batch is rolled back, so the caller
can retry the documents one by one) and ``TransientError`` when the database is unreachable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from persist.blobs import BlobStore, DatabaseBlobStore, sanitise_filename
from persist.database import translate_errors
from persist.directory_store import DirectoryStore, PartyRef, resolve_parties
from persist.history import known_by_message_ids
from persist.tables import CORRELATION_METHODS, Tables, build_tables
from route.directory import strict_address
from route.tracking import NOT_A_REPLY
from shared.errors import PermanentError

PARTY_FIELDS = (("from", "from_"), ("to", "to"), ("cc", "cc"), ("reply_to", "reply_to"))
MAX_BIGINT = 2**63 - 1

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

    @property
    def tables(self) -> Tables:
        return self._tables

    def save(self, routed_documents: Sequence[dict[str, Any]]) -> list[SaveResult]:
        """Store every document in one transaction; results in the order given."""
        if not routed_documents:
            return []
        now = self._clock()
        prepared = [_prepare(document, now) for document in routed_documents]
        self._store_contents(prepared)
        with translate_errors(), self._engine.begin() as connection:
            new_keys = self._insert_emails(connection, prepared)
            new_items = [p for p in prepared if p.dedup_key in new_keys]
            self._insert_email_details(connection, new_items)
            self._thread(connection, new_items)
            new_deliveries = self._insert_deliveries(connection, prepared, now)
            self._make_records(connection, prepared, new_keys, now)
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

    def _insert_emails(self, connection: Connection, prepared: list[_Prepared]) -> set[str]:
        """Insert the emails not stored yet, set every email_id; give the keys that were new."""
        emails = self._tables.emails
        first_by_key: dict[str, dict[str, Any]] = {}
        for item in prepared:
            first_by_key.setdefault(item.dedup_key, item.email)
        # A stable order keeps concurrent batches from deadlocking on each other's keys.
        rows = [first_by_key[key] for key in sorted(first_by_key)]
        inserted = connection.execute(
            self._insert(connection, emails).returning(emails.c.id, emails.c.dedup_key), rows
        ).all()
        ids = {key: email_id for email_id, key in inserted}
        missing = [key for key in first_by_key if key not in ids]
        if missing:
            found = connection.execute(
                select(emails.c.id, emails.c.dedup_key).where(emails.c.dedup_key.in_(missing))
            ).all()
            ids.update({key: email_id for email_id, key in found})
        new_keys = {key for _, key in inserted}
        new_keys |= self._rekey_reused_message_ids(connection, prepared, new_keys, ids)
        for item in prepared:
            item.email_id = ids[item.dedup_key]
        return new_keys

    def _rekey_reused_message_ids(self, connection: Connection, prepared: list[_Prepared],
                                  new_keys: set[str], ids: dict[str, int]) -> set[str]:
        """A stored email with this Message-ID but another fingerprint is another message:
        give the newcomer the key ``mid:<id>#fp:<fingerprint>`` and insert it too."""
        emails = self._tables.emails
        existing = [item for item in prepared
                    if item.dedup_key not in new_keys and item.dedup_key.startswith("mid:")]
        if not existing:
            return set()
        stored = dict(connection.execute(
            select(emails.c.dedup_key, emails.c.fingerprint)
            .where(emails.c.dedup_key.in_({i.dedup_key for i in existing}))).all())
        rekeyed: dict[str, dict[str, Any]] = {}
        for item in existing:
            fingerprint = item.email["fingerprint"]
            if stored.get(item.dedup_key) in (None, fingerprint):
                continue
            item.dedup_key = f"{item.dedup_key}#fp:{fingerprint}"
            notes = [*(item.email.get("notes") or []), "message-id-reused"]
            rekeyed.setdefault(item.dedup_key, {**item.email, "dedup_key": item.dedup_key,
                                                "notes": notes})
        if not rekeyed:
            return set()
        inserted = connection.execute(
            self._insert(connection, emails).returning(emails.c.id, emails.c.dedup_key),
            [rekeyed[key] for key in sorted(rekeyed)]).all()
        ids.update({key: email_id for email_id, key in inserted})
        missing = [key for key in rekeyed if key not in ids]
        if missing:
            ids.update({key: email_id for email_id, key in connection.execute(
                select(emails.c.id, emails.c.dedup_key).where(emails.c.dedup_key.in_(missing)))})
        return {key for _, key in inserted}

    def _insert_email_details(self, connection: Connection, new_items: list[_Prepared]) -> None:
        """Parties, attachments and attachment content of emails this batch created."""
        seen: set[str] = set()
        parties: list[dict[str, Any]] = []
        attachments: list[dict[str, Any]] = []
        contents: dict[str, dict[str, Any]] = {}
        for item in new_items:
            if item.dedup_key in seen:
                continue  # the same email twice in one batch: its first document wins
            seen.add(item.dedup_key)
            parties.extend({**row, "email_id": item.email_id} for row in item.parties)
            attachments.extend({**row, "email_id": item.email_id} for row in item.attachments)
            contents.update((row["sha256"], row) for row in item.contents)
        tables = self._tables
        if contents:
            connection.execute(self._insert(connection, tables.attachment_contents),
                               [contents[sha] for sha in sorted(contents)])
        if parties:
            refs = resolve_parties(connection, tables, {
                a for row in parties if (a := strict_address(row["address"]))})
            internal = {address: kind for item in new_items
                        for address, kind in (item.records.get("principals") or {}).items()}
            for row in parties:
                address = strict_address(row["address"]) or ""
                ref = refs.get(address)
                row["resolution"] = (ref.kind if ref else internal.get(address)
                                     or "unresolved")
                row["contact_id"] = ref.id if ref and ref.kind == "contact" else None
                row["account_id"] = (ref.id if ref and ref.kind == "account"
                                     else ref.account_id if ref else None)
            connection.execute(self._insert(connection, tables.parties), parties)
        if attachments:
            connection.execute(self._insert(connection, tables.attachments), attachments)

    def _insert_deliveries(
        self, connection: Connection, prepared: list[_Prepared], now: datetime
    ) -> set[DeliveryKey]:
        deliveries = self._tables.deliveries
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
        inserted = connection.execute(
            self._insert(connection, deliveries).returning(
                deliveries.c.email_id, deliveries.c.principal_kind, deliveries.c.principal
            ),
            [rows[key] for key in sorted(rows)],
        ).all()
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
        if queue_rows:
            connection.execute(self._insert(connection, self._tables.queue_items), queue_rows)
        return {(int(e), str(k), str(p)) for e, k, p in inserted}

    def _thread(self, connection: Connection, new_items: list[_Prepared]) -> None:
        """Thread, parent and correlation of each new email.  A reply whose parent route
        could not see (not committed yet) is looked up again here, where this transaction
        also sees the batch's own emails."""
        emails = self._tables.emails
        threads: dict[int, int] = {}  # email id -> thread id, for parents in this batch
        updates: list[dict[str, Any]] = []
        links: list[dict[str, Any]] = []
        for item in new_items:
            if item.email_id in threads:
                continue
            correlation = item.correlation
            if correlation.get("parent_email_id") is None and correlation.get("candidates"):
                self._resolve_late(connection, item, threads)
            parent_id = correlation.get("parent_email_id")
            thread_id = correlation.get("thread_id")
            threads[item.email_id] = item.email_id if thread_id is None else int(thread_id)
            method = correlation.get("method") or "none"
            updates.append({
                "b_id": item.email_id, "b_thread": threads[item.email_id],
                "b_parent": parent_id,
                "b_method": method if method in CORRELATION_METHODS else "none",
                "b_correlation": correlation,
                "b_tracked": any(d["tracked"] for d in item.deliveries)})
            if parent_id is not None and parent_id != item.email_id:
                links.append({"email_id": item.email_id, "target_kind": "email",
                              "target_id": parent_id, "method": method})
        if updates:
            connection.execute(
                update(emails).where(emails.c.id == bindparam("b_id")).values(
                    thread_id=bindparam("b_thread"), parent_email_id=bindparam("b_parent"),
                    correlation_method=bindparam("b_method"),
                    correlation=bindparam("b_correlation", type_=emails.c.correlation.type),
                    tracked=bindparam("b_tracked")),
                updates)
        if links:
            connection.execute(self._insert(connection, self._tables.links), links)

    def _resolve_late(self, connection: Connection, item: _Prepared,
                      threads: dict[int, int]) -> None:
        correlation = item.correlation
        candidates = [str(m) for m in correlation["candidates"]]
        found = [k for k in known_by_message_ids(connection, self._tables, candidates)
                 if k.email_id != item.email_id]
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
                      new_keys: set[str], now: datetime) -> None:
        """Cases and links of tracked emails; unknown senders as contacts when configured."""
        tables = self._tables
        linked: list[int] = []
        case_links: list[dict[str, Any]] = []
        written: set[int] = set()  # emails whose row this batch wrote from its first document
        for item in prepared:  # every document: another recipient may bring another rule
            first = item.dedup_key in new_keys and item.email_id not in written
            written.add(item.email_id)
            if not any(d["tracked"] for d in item.deliveries):
                continue
            if not first:
                connection.execute(update(tables.emails).where(
                    tables.emails.c.id == item.email_id, tables.emails.c.tracked.is_(False)
                ).values(tracked=True))
                if item.records.get("rule"):
                    connection.execute(update(tables.emails).where(
                        tables.emails.c.id == item.email_id, tables.emails.c.rule.is_(None)
                    ).values(rule=item.records["rule"]))
            case_link = self._case_for(connection, item, now)
            if case_link is not None:
                case_links.append(case_link)
            if item.dedup_key in new_keys and item.email_id not in linked:
                linked.append(item.email_id)
        if case_links:
            connection.execute(self._insert(connection, tables.links), case_links)
        if linked:
            self._link_parties(connection, linked)

    def _case_for(self, connection: Connection, item: _Prepared,
                  now: datetime) -> dict[str, Any] | None:
        """Create the case the rule asks for; gives the email's link to its case, if any."""
        records, cases = item.records, self._tables.cases
        case_id = None
        method = "thread"
        if records.get("case") == "link":
            case_id = records.get("case_id")
        elif records.get("link_case") and item.correlation.get("case_id") is not None:
            case_id = item.correlation["case_id"]  # the parent was found by persist
        elif records.get("case") == "create":
            case_id = connection.execute(self._insert(connection, cases).values(
                title=(records.get("title") or item.email["subject"] or "(no subject)")[:500],
                state="open", priority=records.get("priority"), owner=records.get("owner"),
                queue=records.get("queue"), rule=records.get("rule") or "",
                created_from_email_id=item.email_id,
                thread_id=item.correlation.get("thread_id") or item.email_id, created_at=now,
            ).returning(cases.c.id)).scalar()
            if case_id is None:  # created by an earlier delivery of this email
                case_id = connection.execute(select(cases.c.id).where(
                    cases.c.created_from_email_id == item.email_id)).scalar_one()
            method = "created"
        if case_id is None:
            return None
        return {"email_id": item.email_id, "target_kind": "case", "target_id": int(case_id),
                "method": method}

    def _link_parties(self, connection: Connection, email_ids: list[int]) -> None:
        parties, tables = self._tables.parties, self._tables
        rows = connection.execute(select(parties).where(
            parties.c.email_id.in_(email_ids)).order_by(parties.c.id)).all()
        links: dict[tuple[int, str, int], str] = {}
        for row in rows:
            contact_id, account_id = row.contact_id, row.account_id
            if (row.role == "from" and row.resolution == "unresolved"
                    and self._create_unknown_contacts
                    and (address := strict_address(row.address)) is not None):
                ref: PartyRef = self._directory.ensure_contact(connection, address, row.name)
                contact_id = ref.id
                connection.execute(update(parties).where(parties.c.id == row.id).values(
                    resolution="contact", contact_id=ref.id))
                links.setdefault((row.email_id, "contact", ref.id), "created-from-sender")
            if contact_id is not None:
                links.setdefault((row.email_id, "contact", int(contact_id)), row.role)
            if account_id is not None:
                links.setdefault((row.email_id, "account", int(account_id)), row.role)
        if links:
            connection.execute(self._insert(connection, tables.links), [
                {"email_id": email_id, "target_kind": kind, "target_id": target,
                 "method": method} for (email_id, kind, target), method in sorted(links.items())])

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
        emails, deliveries = self._tables.emails, self._tables.deliveries
        delivery_count = (
            select(func.count()).where(deliveries.c.email_id == emails.c.id).scalar_subquery()
        )
        query = (
            select(emails.c.id, emails.c.dedup_key, emails.c.message_id, emails.c.subject,
                   emails.c.sent_at, emails.c.from_address, emails.c.size,
                   emails.c.first_seen_at, emails.c.tracked, emails.c.correlation_method,
                   emails.c.thread_id, emails.c.rule, delivery_count.label("deliveries"))
            .order_by(emails.c.id.desc())
            .limit(limit)
        )
        return self._all(query)

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
            select(attachments.c.sha256, attachments.c.filename, attachments.c.content_type,
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
    json.dumps([correlation, records])  # refuse what the JSON columns could not store
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
            parties.setdefault((role, party["address"]), {"role": role, **party})
    attachments: dict[tuple[str, str], dict[str, Any]] = {}
    contents: list[dict[str, Any]] = []
    for attachment in email.get("attachments") or []:
        status = _text(attachment.get("status") or "stored")
        if status != "stored":
            sha256 = _text(attachment["sha256"]).lower()
            filename = sanitise_filename(_text(attachment["filename"]))
            attachments.setdefault((sha256, filename), {
                "sha256": sha256, "filename": filename, "status": status,
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
    json.dumps(evidence)  # refuse what the JSON column could not store (TypeError)
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
