"""targets, reports and search: target source, report attempts, statistics and text indexes

Revision ID: 0005_targets
Revises: 0001
Create Date: 2026-11-27 12:00:00

- ``target.source_system``: who set a target (``cli`` or the ERP's ``crm.target/1`` sender).
- ``report_run.attempts`` and ``claimed_at``: a refused send is retried and counted; a claim
  abandoned by a killed worker can be taken again after the task time limit.
- ``crm_event``: the ``occurred_at`` index becomes a covering one (statistics per period are an
  index-only scan), and on PostgreSQL trigram (pg_trgm) GIN indexes serve the free-text search
  over subject and memo.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base

revision: str = "0005_targets"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    with op.batch_alter_table("target") as batch:
        batch.add_column(
            sa.Column("source_system", sa.String(length=100), server_default="cli", nullable=False)
        )
    with op.batch_alter_table("report_run") as batch:
        batch.add_column(
            sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(
            sa.Column("claimed_at", models.base.UTCDateTime(timezone=True), nullable=True)
        )
    # Replaces the plain occurred_at index: same key, plus the codes statistics group by.
    op.create_index(
        "ix_crm_event_occurred_classification",
        "crm_event",
        ["occurred_at"],
        unique=False,
        postgresql_include=["class_code", "type_code", "category_code", "seller_id", "cancelled"],
    )
    op.drop_index("ix_crm_event_occurred_at", table_name="crm_event")
    if _postgresql():
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.create_index(
            "ix_crm_event_subject_trgm",
            "crm_event",
            ["subject"],
            unique=False,
            postgresql_using="gin",
            postgresql_ops={"subject": "gin_trgm_ops"},
        )
        op.create_index(
            "ix_crm_event_body_trgm",
            "crm_event",
            ["body"],
            unique=False,
            postgresql_using="gin",
            postgresql_ops={"body": "gin_trgm_ops"},
        )


def downgrade() -> None:
    if _postgresql():
        op.drop_index("ix_crm_event_body_trgm", table_name="crm_event")
        op.drop_index("ix_crm_event_subject_trgm", table_name="crm_event")
        # The pg_trgm extension stays: other objects may use it.
    op.create_index("ix_crm_event_occurred_at", "crm_event", ["occurred_at"], unique=False)
    op.drop_index("ix_crm_event_occurred_classification", table_name="crm_event")
    with op.batch_alter_table("report_run") as batch:
        batch.drop_column("claimed_at")
        batch.drop_column("attempts")
    with op.batch_alter_table("target") as batch:
        batch.drop_column("source_system")
