"""email: per-sender windows for the mail-loop limit

Revision ID: 0003_email
Revises: 0001
Create Date: 2026-11-27 12:30:00

- ``email_sender_window``: emails accepted from one sender per fixed time window, so that a
  sender over ``CRM_EMAIL_SENDER_LIMIT`` (a mail loop) is refused by every worker process alike.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base

revision: str = "0003_email"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "email_sender_window",
        sa.Column("sender", sa.String(length=320), nullable=False),
        sa.Column("window_start", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("sender", "window_start", name=op.f("pk_email_sender_window")),
    )
    op.create_index(
        op.f("ix_email_sender_window_window_start"),
        "email_sender_window",
        ["window_start"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_email_sender_window_window_start"), table_name="email_sender_window")
    op.drop_table("email_sender_window")
