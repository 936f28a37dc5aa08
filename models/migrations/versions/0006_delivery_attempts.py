"""delivery attempts: the redelivery counter that parks poison messages; the failed message's queue

Revision ID: 0006_delivery_attempts
Revises: 0002_master_data, 0003_email, 0005_targets
Create Date: 2026-11-27 09:00:00

- ``delivery_attempt``: deliveries of one task message, counted from its first redelivery and
  committed before the task runs (``CRM_MAX_DELIVERIES``).
- ``failed_message.queue``: where the message came from, so that ``replay`` sends it back there.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base

revision: str = "0006_delivery_attempts"
down_revision: str | Sequence[str] | None = ("0002_master_data", "0003_email", "0005_targets")
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery_attempt",
        sa.Column("task_id", sa.String(length=100), nullable=False),
        sa.Column("task_name", sa.String(length=100), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("last_delivered_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_delivery_attempt")),
    )
    with op.batch_alter_table("failed_message") as batch:
        batch.add_column(sa.Column("queue", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("failed_message") as batch:
        batch.drop_column("queue")
    op.drop_table("delivery_attempt")
