"""follow-up indexes: a customer's open follow-ups, and the follow-ups an event closed

A call that may close a follow-up read every follow-up its customer ever had; a CDR backfill of
a busy customer's year read more of them with each batch. Both reads are now by index.

Revision ID: 0014_follow_up_indexes
Revises: 0013_erasure
Create Date: 2026-12-06 20:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_follow_up_indexes"
down_revision: str | Sequence[str] | None = "0013_erasure"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_follow_up_open_customer",
        "follow_up",
        ["customer_id"],
        unique=False,
        postgresql_where=sa.text("state = 'open'"),
        sqlite_where=sa.text("state = 'open'"),
    )
    op.create_index(
        op.f("ix_follow_up_closed_by_event_id"),
        "follow_up",
        ["closed_by_event_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_follow_up_closed_by_event_id"), table_name="follow_up")
    op.drop_index("ix_follow_up_open_customer", table_name="follow_up")
