"""Route's history lookups: (subject_key, id) and (thread_index_root, id) indexes.

route asks "the newest email with this subject key (or Thread-Index root)", i.e. ``WHERE
subject_key = ? ... ORDER BY id DESC LIMIT 1``.  With one-column indexes PostgreSQL may walk
the primary key backwards and filter, which reads the whole table whenever nothing matches
(most mail): the pipeline slowed as the table grew.  Composite indexes give it the rows of
one key already in id order.

Revision ID: 0006_history_indexes
Revises: 0005_operations
Create Date: 2026-11-27 10:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006_history_indexes"
down_revision: str | None = "0005_operations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("emails") as batch:
        batch.drop_index("ix_emails_subject_key")
        batch.drop_index("ix_emails_thread_index_root")
        batch.create_index("ix_emails_subject_key_id", ["subject_key", "id"], unique=False)
        batch.create_index("ix_emails_thread_index_root_id", ["thread_index_root", "id"],
                           unique=False)


def downgrade() -> None:
    with op.batch_alter_table("emails") as batch:
        batch.drop_index("ix_emails_thread_index_root_id")
        batch.drop_index("ix_emails_subject_key_id")
        batch.create_index("ix_emails_thread_index_root", ["thread_index_root"], unique=False)
        batch.create_index("ix_emails_subject_key", ["subject_key"], unique=False)
