"""Alembic keeps the schema version from here on: the hand-written ``adapruner_schema`` table goes.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("adapruner_schema"):
        op.drop_table("adapruner_schema")


def downgrade() -> None:
    op.create_table(
        "adapruner_schema",
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute("INSERT INTO adapruner_schema (version, applied_at) VALUES (1, CURRENT_TIMESTAMP)")
