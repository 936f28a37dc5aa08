"""the calls that reached a customer, in time order: which call closes a follow-up, by index

A follow-up is closed by the customer's first call after the missed one that reached them, in
the order of time and then id. With the index of all the customer's events, a planner whose
statistics a backfill had outrun sorted every later event of the customer to find it (thousands
of them for a call missed months ago, in each batch of a backfill); in this index of such calls
only, ordered as the question is, the first entry after the missed call is the answer.

Revision ID: 0015_customer_calls_in_order
Revises: 0014_follow_up_indexes
Create Date: 2026-12-06 23:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_customer_calls_in_order"
down_revision: str | Sequence[str] | None = "0014_follow_up_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REACHED = (
    "source_kind = 'call' AND (direction = 'outbound'"
    " OR (direction = 'inbound' AND status IN ('answered', 'completed')))"
)


def upgrade() -> None:
    op.create_index(
        "ix_crm_event_reaching_call",
        "crm_event",
        ["customer_id", "occurred_at", "id"],
        unique=False,
        postgresql_where=sa.text(REACHED),
        sqlite_where=sa.text(REACHED),
    )


def downgrade() -> None:
    op.drop_index("ix_crm_event_reaching_call", table_name="crm_event")
