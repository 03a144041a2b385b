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
    Boolean,
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
    true,
)
from sqlalchemy.types import TypeDecorator

PARTY_ROLES = ("from", "to", "cc", "reply_to")
PRINCIPAL_KINDS = ("user", "queue")
DELIVERY_METHODS = ("direct", "forward")
QUEUE_ITEM_STATES = ("active",)
MAILBOX_STATUSES = ("not-run", "success", "failing", "disabled")
CORRELATION_METHODS = ("token", "in-reply-to", "references", "thread-index", "smart", "none")
PARTY_RESOLUTIONS = ("user", "queue", "contact", "account", "unresolved")
ATTACHMENT_STATUSES = ("stored", "blocked-extension", "too-large")
CONTENT_STORAGES = ("database", "filesystem")
DIRECTORY_SOURCES = ("config", "cli", "csv", "auto")
ACCOUNT_ADDRESS_KINDS = ("address", "domain")
LINK_TARGETS = ("email", "case", "contact", "account")
CASE_STATES = ("open",)
# sending: recorded, not yet handed over; sent: handed over, awaited in the forward mailbox;
# failed: the hand-over failed (or the sender stopped first); seen: it arrived; missing: its
# deadline passed first (a late arrival still turns it to seen).
CANARY_OUTCOMES = ("sending", "sent", "failed", "seen", "missing")

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


def _fk(name: str, target: str, nullable: bool = True, ondelete: str | None = None
        ) -> Column[int]:
    return Column(name, BigInteger().with_variant(Integer(), "sqlite"),
                  ForeignKey(target, ondelete=ondelete), nullable=nullable)


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
    replay_positions: Table
    accounts: Table
    account_addresses: Table
    contacts: Table
    contact_addresses: Table
    cases: Table
    links: Table
    mailbox_leases: Table
    pop3_seen: Table
    canaries: Table
    canary_schedule: Table


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
        # Threading (route/threading.py): the thread is the id of its first email.
        Column("thread_id", BigInteger().with_variant(Integer(), "sqlite")),
        Column("parent_email_id", BigInteger().with_variant(Integer(), "sqlite")),
        Column("correlation_method", String),
        Column("correlation", JSON),
        Column("subject_key", Text),
        Column("thread_index_root", String),
        Column("tracked", Boolean, nullable=False, server_default=true()),
        Column("rule", String),
        Column("notes", JSON),
        UniqueConstraint("dedup_key"),
        Index(None, "message_id"),
        Index(None, "first_seen_at"),
        Index(None, "thread_id"),
        # (key, id): route's "newest email with this key" reads one key's rows in id order
        Index(None, "subject_key", "id"),
        Index(None, "thread_index_root", "id"),
    )
    parties = Table(
        "parties", metadata,
        _id_column(),
        _email_fk(),
        Column("role", String, nullable=False),
        Column("address", Text, nullable=False),
        Column("name", Text, nullable=False),
        Column("resolution", String),
        _fk("contact_id", "contacts.id", ondelete="SET NULL"),
        _fk("account_id", "accounts.id", ondelete="SET NULL"),
        UniqueConstraint("email_id", "role", "address"),
        _one_of("role", PARTY_ROLES, "role"),
        Index(None, "address"),
    )
    attachment_contents = Table(
        "attachment_contents", metadata,
        Column("sha256", String, primary_key=True),
        Column("size", BigInteger, nullable=False),
        Column("content", LargeBinary),  # NULL when the content lives in the file store
        Column("storage", String, nullable=False, server_default="database"),
        _one_of("storage", CONTENT_STORAGES, "storage"),
    )
    attachments = Table(
        "attachments", metadata,
        _id_column(),
        _email_fk(),
        # No foreign key to attachment_contents: a refused attachment has no content row.
        Column("sha256", String, nullable=False),
        Column("filename", Text, nullable=False),
        # the name as the mail declared it; NULL when none (filename was generated)
        Column("declared_filename", Text),
        Column("content_type", String, nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("status", String, nullable=False, server_default="stored"),
        _one_of("status", ATTACHMENT_STATUSES, "status"),
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
        Column("tracked", Boolean, nullable=False, server_default=true()),
        Column("untracked_reason", String),
        Column("rule", String),
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
        Column("priority", String),
        Column("owner", String),
        Column("rule", String),
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
    # Where each `mailroute replay` run has got to in the journal, so an interrupted run
    # resumes; the key is a hash of the stage, time range and filters.
    replay_positions = Table(
        "replay_positions", metadata,
        Column("key", String, primary_key=True),
        Column("stage", String, nullable=False),
        Column("request", JSON, nullable=False),
        Column("last_offset", BigInteger),
        Column("replayed", BigInteger, nullable=False),
        Column("done", Boolean, nullable=False),
        Column("updated_at", UtcDateTime, nullable=False),
    )
    accounts, account_addresses, contacts, contact_addresses = _directory_tables(metadata)
    cases = Table(
        "cases", metadata,
        _id_column(),
        Column("title", Text, nullable=False),
        Column("state", String, nullable=False),
        Column("priority", String),
        Column("owner", String),
        Column("queue", String),
        Column("rule", String, nullable=False),
        _fk("created_from_email_id", "emails.id", nullable=False, ondelete="CASCADE"),
        Column("thread_id", BigInteger().with_variant(Integer(), "sqlite")),
        Column("created_at", UtcDateTime, nullable=False),
        UniqueConstraint("created_from_email_id"),
        _one_of("state", CASE_STATES, "state"),
        Index(None, "thread_id"),
    )
    links = Table(
        "links", metadata,
        _id_column(),
        _email_fk(),
        Column("target_kind", String, nullable=False),
        Column("target_id", BigInteger().with_variant(Integer(), "sqlite"), nullable=False),
        Column("method", String, nullable=False),
        UniqueConstraint("email_id", "target_kind", "target_id"),
        _one_of("target_kind", LINK_TARGETS, "target_kind"),
        Index(None, "target_kind", "target_id"),
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
    canaries, canary_schedule = _canary_tables(metadata)
    return Tables(
        metadata=metadata,
        emails=emails,
        parties=parties,
        attachment_contents=attachment_contents,
        attachments=attachments,
        deliveries=deliveries,
        queue_items=queue_items,
        mailbox_state=mailbox_state,
        replay_positions=replay_positions,
        accounts=accounts,
        account_addresses=account_addresses,
        contacts=contacts,
        contact_addresses=contact_addresses,
        cases=cases,
        links=links,
        mailbox_leases=mailbox_leases,
        pop3_seen=pop3_seen,
        canaries=canaries,
        canary_schedule=canary_schedule,
    )


def _directory_tables(metadata: MetaData) -> tuple[Table, Table, Table, Table]:
    """Accounts and contacts edited at runtime (CLI, CSV, auto-created), plus config copies."""
    accounts = Table(
        "accounts", metadata,
        _id_column(),
        Column("name", Text, nullable=False),
        Column("source", String, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        UniqueConstraint("name"),
        _one_of("source", DIRECTORY_SOURCES, "source"),
    )
    account_addresses = Table(
        "account_addresses", metadata,
        Column("value", Text, primary_key=True),  # an address, or a domain
        Column("kind", String, nullable=False),
        _fk("account_id", "accounts.id", nullable=False, ondelete="CASCADE"),
        _one_of("kind", ACCOUNT_ADDRESS_KINDS, "kind"),
        Index(None, "account_id"),
    )
    contacts = Table(
        "contacts", metadata,
        _id_column(),
        Column("name", Text, nullable=False),
        _fk("account_id", "accounts.id", ondelete="SET NULL"),
        Column("source", String, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        _one_of("source", DIRECTORY_SOURCES, "source"),
    )
    contact_addresses = Table(
        "contact_addresses", metadata,
        Column("address", Text, primary_key=True),
        _fk("contact_id", "contacts.id", nullable=False, ondelete="CASCADE"),
        Index(None, "contact_id"),
    )
    return accounts, account_addresses, contacts, contact_addresses


def _canary_tables(metadata: MetaData) -> tuple[Table, Table]:
    """Canary test messages (one row each, never an email record) and when each forwarding
    user's next one is due (claimed by one ingest process at a time)."""
    canaries = Table(
        "canaries", metadata,
        Column("id", String, primary_key=True),
        Column("principal_kind", String, nullable=False),
        Column("principal", String, nullable=False),
        Column("address", String, nullable=False),
        Column("forward_mailbox", String, nullable=False),
        Column("sent_at", UtcDateTime, nullable=False),
        Column("deadline_at", UtcDateTime, nullable=False),
        Column("seen_at", UtcDateTime),
        Column("outcome", String, nullable=False),
        Column("detail", Text),
        _one_of("principal_kind", PRINCIPAL_KINDS, "principal_kind"),
        _one_of("outcome", CANARY_OUTCOMES, "outcome"),
        Index(None, "principal_kind", "principal", "sent_at"),
        Index(None, "outcome", "deadline_at"),
    )
    canary_schedule = Table(
        "canary_schedule", metadata,
        Column("principal_kind", String, primary_key=True),
        Column("principal", String, primary_key=True),
        Column("due_at", UtcDateTime, nullable=False),
    )
    return canaries, canary_schedule
