"""work tasks: something to do about an event, by a date, done or not yet

Revision ID: 0010_work_tasks
Revises: 0009_target_changes
Create Date: 2026-12-05 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base

revision: str = "0010_work_tasks"
down_revision: str | Sequence[str] | None = "0009_target_changes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "work_task",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("assignee_id", sa.Integer(), nullable=True),
        sa.Column("title", sa.String(length=500), nullable=False),
        sa.Column("due_date", sa.Date(), nullable=True),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("done_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("done_by", sa.String(length=200), nullable=True),
        sa.Column("source_system", sa.String(length=100), nullable=True),
        sa.Column("source_id", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(
            ["assignee_id"], ["staff.id"], name=op.f("fk_work_task_assignee_id_staff")
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["crm_event.id"],
            name=op.f("fk_work_task_event_id_crm_event"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_work_task")),
        sa.UniqueConstraint(
            "source_system", "source_id", name=op.f("uq_work_task_source_system_source_id")
        ),
    )
    op.create_index(op.f("ix_work_task_event_id"), "work_task", ["event_id"])
    op.create_index(
        "ix_work_task_assignee_id_state_due_date",
        "work_task",
        ["assignee_id", "state", "due_date"],
    )


def downgrade() -> None:
    op.drop_index("ix_work_task_assignee_id_state_due_date", table_name="work_task")
    op.drop_index(op.f("ix_work_task_event_id"), table_name="work_task")
    op.drop_table("work_task")
