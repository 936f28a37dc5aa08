"""project and offer: the ERP's project an event belongs to and the offer it concerns

Revision ID: 0011_project_offer
Revises: 0010_work_tasks
Create Date: 2026-12-05 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_project_offer"
down_revision: str | Sequence[str] | None = "0010_work_tasks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("crm_event") as batch:
        batch.add_column(sa.Column("project_number", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("project_name", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("offer_number", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("offer_url", sa.String(length=1000), nullable=True))
    op.create_index(op.f("ix_crm_event_project_number"), "crm_event", ["project_number"])
    op.create_index(op.f("ix_crm_event_offer_number"), "crm_event", ["offer_number"])


def downgrade() -> None:
    op.drop_index(op.f("ix_crm_event_offer_number"), table_name="crm_event")
    op.drop_index(op.f("ix_crm_event_project_number"), table_name="crm_event")
    with op.batch_alter_table("crm_event") as batch:
        for column in ("offer_url", "offer_number", "project_name", "project_number"):
            batch.drop_column(column)
