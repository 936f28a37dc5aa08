"""target changes: a target replaced by one with the same start date leaves a trace

Every target set or changed gets a row: the value before (none for a new one) and after, who
set it and when. The targets there are already become their first rows.

Revision ID: 0009_target_changes
Revises: 0008_incremental_tallies
Create Date: 2026-12-05 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base

revision: str = "0009_target_changes"
down_revision: str | Sequence[str] | None = "0008_incremental_tallies"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "target_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seller_id", sa.Integer(), nullable=False),
        sa.Column("category_code", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("valid_from", sa.Date(), nullable=False),
        sa.Column("old_value", sa.Integer(), nullable=True),
        sa.Column("new_value", sa.Integer(), nullable=False),
        sa.Column("changed_by", sa.String(length=200), nullable=False),
        sa.Column("changed_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["category_code"],
            ["category.code"],
            name=op.f("fk_target_change_category_code_category"),
        ),
        sa.ForeignKeyConstraint(
            ["seller_id"], ["staff.id"], name=op.f("fk_target_change_seller_id_staff")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_target_change")),
    )
    op.create_index(
        "ix_target_change_seller_id_category_code",
        "target_change",
        ["seller_id", "category_code"],
    )
    op.execute(
        "INSERT INTO target_change (seller_id, category_code, kind, valid_from, old_value, "
        "new_value, changed_by, changed_at) SELECT seller_id, category_code, kind, valid_from, "
        "NULL, value, source_system, created_at FROM target ORDER BY created_at, id"
    )


def downgrade() -> None:
    op.drop_index("ix_target_change_seller_id_category_code", table_name="target_change")
    op.drop_table("target_change")
