"""event state: the CRM status of an event (Lemonsoft's "tila"), done unless a message says
otherwise; meetings already stored read as scheduled or cancelled

Revision ID: 0012_event_state
Revises: 0011_project_offer
Create Date: 2026-12-05 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_event_state"
down_revision: str | Sequence[str] | None = "0011_project_offer"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("crm_event") as batch:
        batch.add_column(
            sa.Column("state", sa.String(length=20), nullable=False, server_default="done")
        )
    event = sa.table(
        "crm_event",
        sa.column("state", sa.String),
        sa.column("source_kind", sa.String),
        sa.column("cancelled", sa.Boolean),
    )
    op.execute(event.update().where(event.c.cancelled.is_(True)).values(state="cancelled"))
    op.execute(
        event.update()
        .where(event.c.source_kind == "meeting", event.c.cancelled.is_(False))
        .values(state="scheduled")
    )


def downgrade() -> None:
    with op.batch_alter_table("crm_event") as batch:
        batch.drop_column("state")
