"""master data: contact addresses, event party keys, leads

Revision ID: 0002_master_data
Revises: 0001
Create Date: 2026-11-27 07:00:00

New tables only (no ALTER), so the same operations work on PostgreSQL and SQLite. Existing
contacts' addresses are copied into contact_email, which is what matching reads from now on.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base

revision: str = "0002_master_data"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "contact_email",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("contact_id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.ForeignKeyConstraint(
            ["contact_id"],
            ["contact.id"],
            name=op.f("fk_contact_email_contact_id_contact"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contact_email")),
        sa.UniqueConstraint("contact_id", "email", name=op.f("uq_contact_email_contact_id_email")),
    )
    op.create_index(op.f("ix_contact_email_email"), "contact_email", ["email"], unique=False)
    op.execute(
        "INSERT INTO contact_email (contact_id, email) "
        "SELECT id, lower(email) FROM contact WHERE email IS NOT NULL AND email <> ''"
    )

    op.create_table(
        "event_party_key",
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("value", sa.String(length=320), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["crm_event.id"],
            name=op.f("fk_event_party_key_event_id_crm_event"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("event_id", "kind", "value", name=op.f("pk_event_party_key")),
    )
    op.create_index(
        "ix_event_party_key_kind_value", "event_party_key", ["kind", "value"], unique=False
    )

    op.create_table(
        "lead",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("value", sa.String(length=320), nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=True),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["crm_event.id"],
            name=op.f("fk_lead_event_id_crm_event"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lead")),
        sa.UniqueConstraint("kind", "value", name=op.f("uq_lead_kind_value")),
    )
    op.create_index(op.f("ix_lead_event_id"), "lead", ["event_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_lead_event_id"), table_name="lead")
    op.drop_table("lead")
    op.drop_index("ix_event_party_key_kind_value", table_name="event_party_key")
    op.drop_table("event_party_key")
    op.drop_index(op.f("ix_contact_email_email"), table_name="contact_email")
    op.drop_table("contact_email")
