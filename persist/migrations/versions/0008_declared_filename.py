"""Attachments keep the file name the mail declared beside the sanitised one.

``filename`` stays what is shown and stored (sanitised, or generated when the part declared
none); ``declared_filename`` is the name as declared, NULL when there was none.  Rows stored
before this revision get NULL: which of their names were generated is not known.

Revision ID: 0008_declared_filename
Revises: 0007_canaries
Create Date: 2026-11-28 10:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_declared_filename"
down_revision: str | None = "0007_canaries"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("attachments", sa.Column("declared_filename", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("attachments", "declared_filename")
