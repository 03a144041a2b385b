"""The database schema as SQLAlchemy Core tables: the one description of what persist stores.

Takes nothing; :func:`build_metadata` gives a fresh :class:`~sqlalchemy.MetaData` holding every
table.  The Alembic migrations under ``persist/migrations`` must produce exactly these tables
(a test compares them).  Enumerations are CHECK constraints, so a row the rest of the code
forgot to validate still fails as an ``IntegrityError`` rather than landing as nonsense.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

PARTY_ROLES = ("from", "to", "cc", "reply_to")
PRINCIPAL_KINDS = ("user", "queue")
DELIVERY_METHODS = ("direct", "forward")
QUEUE_ITEM_STATES = ("active",)
MAILBOX_STATUSES = ("not-run", "success", "failing", "disabled")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that always comes back in UTC, on SQLite as on PostgreSQL.

    SQLite has no time zones: the value is stored as naive UTC and made aware again on read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: persist stores aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _id_column() -> Column[int]:
    # BIGINT on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the auto-numbered rowid.
    return Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                  autoincrement=True)


def _email_fk() -> Column[int]:
    return Column("email_id", BigInteger().with_variant(Integer(), "sqlite"),
                  ForeignKey("emails.id", ondelete="CASCADE"), nullable=False)


def _one_of(column: str, values: tuple[str, ...], name: str) -> CheckConstraint:
    quoted = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({quoted})", name=name)


@dataclass(frozen=True)
class Tables:
    """The tables, by name, with the metadata they belong to."""

    metadata: MetaData
    emails: Table
    parties: Table
    attachment_contents: Table
    attachments: Table
    deliveries: Table
    queue_items: Table
    mailbox_state: Table
    mailbox_leases: Table
    pop3_seen: Table


def build_tables() -> Tables:
    """A fresh MetaData with every table (no shared module state)."""
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    emails = Table(
        "emails", metadata,
        _id_column(),
        Column("dedup_key", String, nullable=False),
        Column("message_id", Text),
        Column("subject", Text, nullable=False),
        Column("sent_at", UtcDateTime),
        Column("from_address", Text),
        Column("in_reply_to", Text),
        Column("text_body", Text),
        Column("html_body", Text),
        Column("fingerprint", String, nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("defects", JSON, nullable=False),
        Column("trace_id", String, nullable=False),
        Column("first_seen_at", UtcDateTime, nullable=False),
        UniqueConstraint("dedup_key"),
        Index(None, "message_id"),
        Index(None, "first_seen_at"),
    )
    parties = Table(
        "parties", metadata,
        _id_column(),
        _email_fk(),
        Column("role", String, nullable=False),
        Column("address", Text, nullable=False),
        Column("name", Text, nullable=False),
        UniqueConstraint("email_id", "role", "address"),
        _one_of("role", PARTY_ROLES, "role"),
        Index(None, "address"),
    )
    attachment_contents = Table(
        "attachment_contents", metadata,
        Column("sha256", String, primary_key=True),
        Column("size", BigInteger, nullable=False),
        Column("content", LargeBinary, nullable=False),
    )
    attachments = Table(
        "attachments", metadata,
        _id_column(),
        _email_fk(),
        Column("sha256", String, ForeignKey("attachment_contents.sha256"), nullable=False),
        Column("filename", Text, nullable=False),
        Column("content_type", String, nullable=False),
        Column("size", BigInteger, nullable=False),
        UniqueConstraint("email_id", "sha256", "filename"),
        Index(None, "sha256"),
    )
    deliveries = Table(
        "deliveries", metadata,
        _id_column(),
        _email_fk(),
        Column("principal_kind", String, nullable=False),
        Column("principal", String, nullable=False),
        Column("address", Text, nullable=False),
        Column("mailbox", String, nullable=False),
        Column("method", String, nullable=False),
        Column("evidence", JSON, nullable=False),
        Column("source_mailbox", String, nullable=False),
        Column("source_folder", String, nullable=False),
        Column("source_uidvalidity", BigInteger),
        Column("source_uid", String, nullable=False),
        Column("trace_id", String, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        UniqueConstraint("email_id", "principal_kind", "principal"),
        _one_of("principal_kind", PRINCIPAL_KINDS, "principal_kind"),
        _one_of("method", DELIVERY_METHODS, "method"),
        Index(None, "principal_kind", "principal", "created_at"),
    )
    queue_items = Table(
        "queue_items", metadata,
        _id_column(),
        _email_fk(),
        Column("queue", String, nullable=False),
        Column("state", String, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        UniqueConstraint("email_id", "queue"),
        _one_of("state", QUEUE_ITEM_STATES, "state"),
        Index(None, "queue", "state", "created_at"),
    )
    mailbox_state = Table(
        "mailbox_state", metadata,
        Column("mailbox", String, primary_key=True),
        Column("folder", String, primary_key=True),
        Column("uidvalidity", BigInteger),
        Column("last_uid", BigInteger),
        Column("status", String, nullable=False),
        Column("last_poll_at", UtcDateTime),
        Column("last_success_at", UtcDateTime),
        Column("last_error", Text),
        Column("consecutive_failures", Integer, nullable=False),
        Column("messages_fetched", BigInteger, nullable=False),
        _one_of("status", MAILBOX_STATUSES, "status"),
    )
    # The fleet's schedule: which ingest process holds a mailbox (until lease_until), when it
    # is next due, and whether it is disabled (and why).  One row per configured mailbox.
    mailbox_leases = Table(
        "mailbox_leases", metadata,
        Column("mailbox", String, primary_key=True),
        Column("owner", String),
        Column("lease_until", UtcDateTime),
        Column("due_at", UtcDateTime, nullable=False),
        Column("disabled_reason", Text),
        Column("validity_resets", Integer, nullable=False),
        Column("validity_reset_at", UtcDateTime),
        Index(None, "due_at"),
    )
    # POP3 has no cursor: the UIDLs already handed to the broker, per mailbox.
    pop3_seen = Table(
        "pop3_seen", metadata,
        Column("mailbox", String, primary_key=True),
        Column("uidl", String, primary_key=True),
        Column("seen_at", UtcDateTime, nullable=False),
    )
    return Tables(
        metadata=metadata,
        emails=emails,
        parties=parties,
        attachment_contents=attachment_contents,
        attachments=attachments,
        deliveries=deliveries,
        queue_items=queue_items,
        mailbox_state=mailbox_state,
        mailbox_leases=mailbox_leases,
        pop3_seen=pop3_seen,
    )
