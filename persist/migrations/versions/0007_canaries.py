"""Canaries: marked test messages sent to forwarding users (canaries) and their schedule.

Revision ID: 0007_canaries
Revises: 0006_history_indexes
Create Date: 2026-11-27 14:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_canaries"
down_revision: str | None = "0006_history_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "canaries",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("principal_kind", sa.String(), nullable=False),
        sa.Column("principal", sa.String(), nullable=False),
        sa.Column("address", sa.String(), nullable=False),
        sa.Column("forward_mailbox", sa.String(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.CheckConstraint("principal_kind IN ('user', 'queue')",
                           name=op.f("ck_canaries_principal_kind")),
        sa.CheckConstraint("outcome IN ('sending', 'sent', 'failed', 'seen', 'missing')",
                           name=op.f("ck_canaries_outcome")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canaries")),
    )
    op.create_index(op.f("ix_canaries_principal_kind_principal_sent_at"), "canaries",
                    ["principal_kind", "principal", "sent_at"])
    op.create_index(op.f("ix_canaries_outcome_deadline_at"), "canaries",
                    ["outcome", "deadline_at"])
    op.create_table(
        "canary_schedule",
        sa.Column("principal_kind", sa.String(), nullable=False),
        sa.Column("principal", sa.String(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("principal_kind", "principal", name=op.f("pk_canary_schedule")),
    )


def downgrade() -> None:
    op.drop_table("canary_schedule")
    op.drop_index(op.f("ix_canaries_outcome_deadline_at"), table_name="canaries")
    op.drop_index(op.f("ix_canaries_principal_kind_principal_sent_at"), table_name="canaries")
    op.drop_table("canaries")
