"""CRM records: threading, tracking and rules on emails and deliveries; contacts, accounts,
cases and links; attachment content in a file store (the database keeps the metadata).

Existing attachment content stays in ``attachment_contents.content`` (``storage`` =
'database') and remains readable; new content goes where ``attachments.store`` says.

Revision ID: 0003_crm_records
Revises: 0001
Create Date: 2026-11-27 08:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_crm_records"
# The initial migration's revision id is "0001" (file 0001_initial.py).
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id_type() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("source IN ('config', 'cli', 'csv', 'auto')",
                           name=op.f("ck_accounts_source")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("name", name=op.f("uq_accounts_name")),
    )
    op.create_table(
        "account_addresses",
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("account_id", _id_type(), nullable=False),
        sa.CheckConstraint("kind IN ('address', 'domain')",
                           name=op.f("ck_account_addresses_kind")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"],
                                name=op.f("fk_account_addresses_account_id_accounts"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("value", name=op.f("pk_account_addresses")),
    )
    op.create_index(op.f("ix_account_addresses_account_id"), "account_addresses",
                    ["account_id"], unique=False)
    op.create_table(
        "contacts",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("account_id", _id_type(), nullable=True),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("source IN ('config', 'cli', 'csv', 'auto')",
                           name=op.f("ck_contacts_source")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"],
                                name=op.f("fk_contacts_account_id_accounts"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contacts")),
    )
    op.create_table(
        "contact_addresses",
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("contact_id", _id_type(), nullable=False),
        sa.ForeignKeyConstraint(["contact_id"], ["contacts.id"],
                                name=op.f("fk_contact_addresses_contact_id_contacts"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_contact_addresses")),
    )
    op.create_index(op.f("ix_contact_addresses_contact_id"), "contact_addresses",
                    ["contact_id"], unique=False)
    op.create_table(
        "cases",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("priority", sa.String(), nullable=True),
        sa.Column("owner", sa.String(), nullable=True),
        sa.Column("queue", sa.String(), nullable=True),
        sa.Column("rule", sa.String(), nullable=False),
        sa.Column("created_from_email_id", _id_type(), nullable=False),
        sa.Column("thread_id", _id_type(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("state IN ('open')", name=op.f("ck_cases_state")),
        sa.ForeignKeyConstraint(["created_from_email_id"], ["emails.id"],
                                name=op.f("fk_cases_created_from_email_id_emails"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cases")),
        sa.UniqueConstraint("created_from_email_id",
                            name=op.f("uq_cases_created_from_email_id")),
    )
    op.create_index(op.f("ix_cases_thread_id"), "cases", ["thread_id"], unique=False)
    op.create_table(
        "links",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("email_id", _id_type(), nullable=False),
        sa.Column("target_kind", sa.String(), nullable=False),
        sa.Column("target_id", _id_type(), nullable=False),
        sa.Column("method", sa.String(), nullable=False),
        sa.CheckConstraint("target_kind IN ('email', 'case', 'contact', 'account')",
                           name=op.f("ck_links_target_kind")),
        sa.ForeignKeyConstraint(["email_id"], ["emails.id"],
                                name=op.f("fk_links_email_id_emails"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_links")),
        sa.UniqueConstraint("email_id", "target_kind", "target_id",
                            name=op.f("uq_links_email_id_target_kind_target_id")),
    )
    op.create_index(op.f("ix_links_target_kind_target_id"), "links",
                    ["target_kind", "target_id"], unique=False)

    with op.batch_alter_table("emails") as batch:
        batch.add_column(sa.Column("thread_id", _id_type(), nullable=True))
        batch.add_column(sa.Column("parent_email_id", _id_type(), nullable=True))
        batch.add_column(sa.Column("correlation_method", sa.String(), nullable=True))
        batch.add_column(sa.Column("correlation", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("subject_key", sa.Text(), nullable=True))
        batch.add_column(sa.Column("thread_index_root", sa.String(), nullable=True))
        batch.add_column(sa.Column("tracked", sa.Boolean(), nullable=False,
                                   server_default=sa.true()))
        batch.add_column(sa.Column("rule", sa.String(), nullable=True))
        batch.add_column(sa.Column("notes", sa.JSON(), nullable=True))
        batch.create_index(op.f("ix_emails_thread_id"), ["thread_id"], unique=False)
        batch.create_index(op.f("ix_emails_subject_key"), ["subject_key"], unique=False)
        batch.create_index(op.f("ix_emails_thread_index_root"), ["thread_index_root"],
                           unique=False)
    with op.batch_alter_table("parties") as batch:
        batch.add_column(sa.Column("resolution", sa.String(), nullable=True))
        batch.add_column(sa.Column("contact_id", _id_type(), nullable=True))
        batch.add_column(sa.Column("account_id", _id_type(), nullable=True))
        batch.create_foreign_key(op.f("fk_parties_contact_id_contacts"), "contacts",
                                 ["contact_id"], ["id"], ondelete="SET NULL")
        batch.create_foreign_key(op.f("fk_parties_account_id_accounts"), "accounts",
                                 ["account_id"], ["id"], ondelete="SET NULL")
    with op.batch_alter_table("attachment_contents") as batch:
        batch.alter_column("content", existing_type=sa.LargeBinary(), nullable=True)
        batch.add_column(sa.Column("storage", sa.String(), nullable=False,
                                   server_default="database"))
        batch.create_check_constraint(op.f("ck_attachment_contents_storage"),
                                      "storage IN ('database', 'filesystem')")
    with op.batch_alter_table("attachments") as batch:
        batch.drop_constraint(op.f("fk_attachments_sha256_attachment_contents"),
                              type_="foreignkey")
        batch.add_column(sa.Column("status", sa.String(), nullable=False,
                                   server_default="stored"))
        batch.create_check_constraint(
            op.f("ck_attachments_status"),
            "status IN ('stored', 'blocked-extension', 'too-large')")
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("tracked", sa.Boolean(), nullable=False,
                                   server_default=sa.true()))
        batch.add_column(sa.Column("untracked_reason", sa.String(), nullable=True))
        batch.add_column(sa.Column("rule", sa.String(), nullable=True))
    with op.batch_alter_table("queue_items") as batch:
        batch.add_column(sa.Column("priority", sa.String(), nullable=True))
        batch.add_column(sa.Column("owner", sa.String(), nullable=True))
        batch.add_column(sa.Column("rule", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queue_items") as batch:
        for column in ("rule", "owner", "priority"):
            batch.drop_column(column)
    with op.batch_alter_table("deliveries") as batch:
        for column in ("rule", "untracked_reason", "tracked"):
            batch.drop_column(column)
    with op.batch_alter_table("attachments") as batch:
        batch.drop_constraint(op.f("ck_attachments_status"), type_="check")
        batch.drop_column("status")
        batch.create_foreign_key(op.f("fk_attachments_sha256_attachment_contents"),
                                 "attachment_contents", ["sha256"], ["sha256"])
    with op.batch_alter_table("attachment_contents") as batch:
        batch.drop_constraint(op.f("ck_attachment_contents_storage"), type_="check")
        batch.drop_column("storage")
        batch.alter_column("content", existing_type=sa.LargeBinary(), nullable=False)
    with op.batch_alter_table("parties") as batch:
        batch.drop_constraint(op.f("fk_parties_account_id_accounts"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_parties_contact_id_contacts"), type_="foreignkey")
        for column in ("account_id", "contact_id", "resolution"):
            batch.drop_column(column)
    with op.batch_alter_table("emails") as batch:
        for index in ("ix_emails_thread_index_root", "ix_emails_subject_key",
                      "ix_emails_thread_id"):
            batch.drop_index(op.f(index))
        for column in ("notes", "rule", "tracked", "thread_index_root", "subject_key",
                       "correlation", "correlation_method", "parent_email_id", "thread_id"):
            batch.drop_column(column)
    for index, table in (("ix_links_target_kind_target_id", "links"),
                         ("ix_cases_thread_id", "cases"),
                         ("ix_contact_addresses_contact_id", "contact_addresses"),
                         ("ix_account_addresses_account_id", "account_addresses")):
        op.drop_index(op.f(index), table_name=table)
    for table in ("links", "cases", "contact_addresses", "contacts", "account_addresses",
                  "accounts"):
        op.drop_table(table)
