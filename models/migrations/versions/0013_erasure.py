"""erasure: records of erased personal data, and keyed hashes of the erased identifiers

Revision ID: 0013_erasure
Revises: 0012_event_state
Create Date: 2026-12-06 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base

revision: str = "0013_erasure"
down_revision: str | Sequence[str] | None = "0012_event_state"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "erasure",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("erased_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("erased_by", sa.String(length=200), nullable=False),
        sa.Column("subject", sa.String(length=20), nullable=False),
        sa.Column("data_kinds", models.base.JsonValue, nullable=False),
        sa.Column("counts", models.base.JsonValue, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_erasure")),
    )
    op.create_table(
        "erased_identifier",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("erasure_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["erasure_id"],
            ["erasure.id"],
            name=op.f("fk_erased_identifier_erasure_id_erasure"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_erased_identifier")),
    )
    op.create_index(
        op.f("ix_erased_identifier_digest"), "erased_identifier", ["digest"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_erased_identifier_digest"), table_name="erased_identifier")
    op.drop_table("erased_identifier")
    op.drop_table("erasure")
