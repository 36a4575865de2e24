"""A job's phase before its first trial (what its worker is doing: loading, statistics, moments) lives in its row,
no longer in an attribute of its first study.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("phase", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite drops a column by rebuilding the table
        batch.drop_column("phase")
