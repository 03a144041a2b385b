"""The email store: routed documents in, email records with their deliveries out.

Takes decoded ``routed`` documents (see ``shared.schemas.RoutedSchema``) and writes a whole
batch in one transaction: one ``emails`` row per ``dedup_key`` (with its parties and
attachments, attachment content stored once per SHA-256), one ``deliveries`` row per
(email, principal), one ``queue_items`` row per queue delivery.  Every insert is
``ON CONFLICT DO NOTHING`` on a natural key, so a redelivered document changes nothing; the
:class:`SaveResult` of each document says what was new.
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

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from persist.database import translate_errors
from persist.tables import Tables, build_tables
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
    email_id: int = field(default=0)


class EmailStore:
    """Idempotent batch writes of routed documents, and the reads the CLI and tests need."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        self._tables: Tables = build_tables()
        self._clock = clock or (lambda: datetime.now(UTC))

    @property
    def tables(self) -> Tables:
        return self._tables

    def save(self, routed_documents: Sequence[dict[str, Any]]) -> list[SaveResult]:
        """Store every document in one transaction; results in the order given."""
        if not routed_documents:
            return []
        now = self._clock()
        prepared = [_prepare(document, now) for document in routed_documents]
        with translate_errors(), self._engine.begin() as connection:
            new_keys = self._insert_emails(connection, prepared)
            self._insert_email_details(connection, [p for p in prepared if p.dedup_key in new_keys])
            new_deliveries = self._insert_deliveries(connection, prepared, now)
        return _results(prepared, new_keys, new_deliveries)

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
        for item in prepared:
            item.email_id = ids[item.dedup_key]
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
            connection.execute(self._insert(connection, tables.parties), parties)
        if attachments:
            connection.execute(self._insert(connection, tables.attachments), attachments)

    def _insert_deliveries(
        self, connection: Connection, prepared: list[_Prepared], now: datetime
    ) -> set[DeliveryKey]:
        deliveries = self._tables.deliveries
        rows: dict[DeliveryKey, dict[str, Any]] = {}
        for item in prepared:
            for row in item.deliveries:
                key = (item.email_id, row["principal_kind"], row["principal"])
                rows.setdefault(key, {**row, "email_id": item.email_id})
        inserted = connection.execute(
            self._insert(connection, deliveries).returning(
                deliveries.c.email_id, deliveries.c.principal_kind, deliveries.c.principal
            ),
            [rows[key] for key in sorted(rows)],
        ).all()
        queue_rows = [
            {"email_id": email_id, "queue": principal, "state": "active", "created_at": now}
            for email_id, kind, principal in sorted(rows)
            if kind == "queue"
        ]
        if queue_rows:
            connection.execute(self._insert(connection, self._tables.queue_items), queue_rows)
        return {(int(e), str(k), str(p)) for e, k, p in inserted}

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
                   emails.c.first_seen_at, delivery_count.label("deliveries"))
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

    def attachments_for(self, email_id: int) -> list[dict[str, Any]]:
        attachments = self._tables.attachments
        return self._all(
            select(attachments.c.sha256, attachments.c.filename, attachments.c.content_type,
                   attachments.c.size)
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
        rows = self._all(select(contents.c.content).where(contents.c.sha256 == sha256))
        return bytes(rows[0]["content"]) if rows else None

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
    }
    parties: dict[tuple[str, str], dict[str, Any]] = {}
    for role, key in PARTY_FIELDS:
        for party in _addresses(email, key):
            parties.setdefault((role, party["address"]), {"role": role, **party})
    attachments: dict[tuple[str, str], dict[str, Any]] = {}
    contents: list[dict[str, Any]] = []
    for attachment in email.get("attachments") or []:
        content = attachment["content"]
        if not isinstance(content, bytes | bytearray | memoryview):
            raise TypeError(f"attachment content is {type(content).__name__}, not bytes")
        content = bytes(content)
        sha256 = hashlib.sha256(content).hexdigest()
        if str(attachment["sha256"]).lower() != sha256:
            raise PermanentError("unstorable", f"attachment {attachment.get('filename')!r}: "
                                 "sha256 does not match its content")
        filename = _text(attachment["filename"])
        attachments.setdefault((sha256, filename), {
            "sha256": sha256,
            "filename": filename,
            "content_type": _text(attachment["content_type"]),
            "size": len(content),
        })
        contents.append({"sha256": sha256, "size": len(content), "content": content})
    deliveries = [_delivery_row(d, source, trace_id, now) for d in document["deliveries"]]
    if not deliveries:
        raise ValueError("a routed document needs at least one delivery")
    return _Prepared(
        dedup_key=dedup_key,
        email=email_row,
        parties=list(parties.values()),
        attachments=list(attachments.values()),
        contents=contents,
        deliveries=deliveries,
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
