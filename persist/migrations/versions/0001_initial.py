"""The initial schema: emails, parties, attachments, deliveries, queue items, mailbox state.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-27 06:36:09.038517
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


def _id_type() -> sa.types.TypeEngine[int]:
    # BIGINT on PostgreSQL; SQLite auto-numbers only an "INTEGER PRIMARY KEY" (the rowid).
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "attachment_contents",
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_attachment_contents")),
    )
    op.create_table(
        "emails",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("dedup_key", sa.String(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("from_address", sa.Text(), nullable=True),
        sa.Column("in_reply_to", sa.Text(), nullable=True),
        sa.Column("text_body", sa.Text(), nullable=True),
        sa.Column("html_body", sa.Text(), nullable=True),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("defects", sa.JSON(), nullable=False),
        sa.Column("trace_id", sa.String(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_emails")),
        sa.UniqueConstraint("dedup_key", name=op.f("uq_emails_dedup_key")),
    )
    op.create_index(op.f("ix_emails_first_seen_at"), "emails", ["first_seen_at"], unique=False)
    op.create_index(op.f("ix_emails_message_id"), "emails", ["message_id"], unique=False)
    op.create_table(
        "mailbox_state",
        sa.Column("mailbox", sa.String(), nullable=False),
        sa.Column("folder", sa.String(), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("last_uid", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("last_poll_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("messages_fetched", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "status IN ('not-run', 'success', 'failing', 'disabled')",
            name=op.f("ck_mailbox_state_status"),
        ),
        sa.PrimaryKeyConstraint("mailbox", "folder", name=op.f("pk_mailbox_state")),
    )
    op.create_table(
        "attachments",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("email_id", _id_type(), nullable=False),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("content_type", sa.String(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["email_id"],
            ["emails.id"],
            name=op.f("fk_attachments_email_id_emails"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sha256"],
            ["attachment_contents.sha256"],
            name=op.f("fk_attachments_sha256_attachment_contents"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attachments")),
        sa.UniqueConstraint(
            "email_id", "sha256", "filename", name=op.f("uq_attachments_email_id_sha256_filename")
        ),
    )
    op.create_index(op.f("ix_attachments_sha256"), "attachments", ["sha256"], unique=False)
    op.create_table(
        "deliveries",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("email_id", _id_type(), nullable=False),
        sa.Column("principal_kind", sa.String(), nullable=False),
        sa.Column("principal", sa.String(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("mailbox", sa.String(), nullable=False),
        sa.Column("method", sa.String(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("source_mailbox", sa.String(), nullable=False),
        sa.Column("source_folder", sa.String(), nullable=False),
        sa.Column("source_uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("source_uid", sa.String(), nullable=False),
        sa.Column("trace_id", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("method IN ('direct', 'forward')", name=op.f("ck_deliveries_method")),
        sa.CheckConstraint(
            "principal_kind IN ('user', 'queue')", name=op.f("ck_deliveries_principal_kind")
        ),
        sa.ForeignKeyConstraint(
            ["email_id"],
            ["emails.id"],
            name=op.f("fk_deliveries_email_id_emails"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint(
            "email_id",
            "principal_kind",
            "principal",
            name=op.f("uq_deliveries_email_id_principal_kind_principal"),
        ),
    )
    op.create_index(
        op.f("ix_deliveries_principal_kind_principal_created_at"),
        "deliveries",
        ["principal_kind", "principal", "created_at"],
        unique=False,
    )
    op.create_table(
        "parties",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("email_id", _id_type(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.CheckConstraint(
            "role IN ('from', 'to', 'cc', 'reply_to')", name=op.f("ck_parties_role")
        ),
        sa.ForeignKeyConstraint(
            ["email_id"], ["emails.id"], name=op.f("fk_parties_email_id_emails"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_parties")),
        sa.UniqueConstraint(
            "email_id", "role", "address", name=op.f("uq_parties_email_id_role_address")
        ),
    )
    op.create_index(op.f("ix_parties_address"), "parties", ["address"], unique=False)
    op.create_table(
        "queue_items",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("email_id", _id_type(), nullable=False),
        sa.Column("queue", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("state IN ('active')", name=op.f("ck_queue_items_state")),
        sa.ForeignKeyConstraint(
            ["email_id"],
            ["emails.id"],
            name=op.f("fk_queue_items_email_id_emails"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queue_items")),
        sa.UniqueConstraint("email_id", "queue", name=op.f("uq_queue_items_email_id_queue")),
    )
    op.create_index(
        op.f("ix_queue_items_queue_state_created_at"),
        "queue_items",
        ["queue", "state", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_queue_items_queue_state_created_at"), table_name="queue_items")
    op.drop_table("queue_items")
    op.drop_index(op.f("ix_parties_address"), table_name="parties")
    op.drop_table("parties")
    op.drop_index(
        op.f("ix_deliveries_principal_kind_principal_created_at"), table_name="deliveries"
    )
    op.drop_table("deliveries")
    op.drop_index(op.f("ix_attachments_sha256"), table_name="attachments")
    op.drop_table("attachments")
    op.drop_table("mailbox_state")
    op.drop_index(op.f("ix_emails_message_id"), table_name="emails")
    op.drop_index(op.f("ix_emails_first_seen_at"), table_name="emails")
    op.drop_table("emails")
    op.drop_table("attachment_contents")
