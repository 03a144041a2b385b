"""The mailbox fleet: leases and schedule per mailbox, POP3 UIDLs already handed on.

Revision ID: 0004_mailbox_fleet
Revises: 0003_crm_records
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_mailbox_fleet"
down_revision: str | None = "0003_crm_records"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "mailbox_leases",
        sa.Column("mailbox", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("validity_resets", sa.Integer(), nullable=False),
        sa.Column("validity_reset_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("mailbox", name=op.f("pk_mailbox_leases")),
    )
    op.create_index(op.f("ix_mailbox_leases_due_at"), "mailbox_leases", ["due_at"])
    op.create_table(
        "pop3_seen",
        sa.Column("mailbox", sa.String(), nullable=False),
        sa.Column("uidl", sa.String(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("mailbox", "uidl", name=op.f("pk_pop3_seen")),
    )


def downgrade() -> None:
    op.drop_table("pop3_seen")
    op.drop_index(op.f("ix_mailbox_leases_due_at"), table_name="mailbox_leases")
    op.drop_table("mailbox_leases")
