"""incremental tallies: counts move with each change; cards are read, not stored

A change of an event now moves its counts in its own transaction, so the touch list that a
refresh recounted (``tally_touch``) and the stored cards (``seller_card``) go. Touches still
pending are recounted here first; ``seller_view`` keeps what the refresh last published.

Revision ID: 0008_incremental_tallies
Revises: 0007_api_tokens
Create Date: 2026-12-04 19:00:00
"""

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import models.base

revision: str = "0008_incremental_tallies"
down_revision: str | Sequence[str] | None = "0007_api_tokens"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _bounds(period: str, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The period's half-open interval in UTC (as tasks.periods, frozen for this migration)."""
    if "-W" in period:
        week_year, week = period.split("-W")
        first = date.fromisocalendar(int(week_year), int(week), 1)
        last = first + timedelta(days=7)
    else:
        year, month = (int(part) for part in period.split("-"))
        first = date(year, month, 1)
        last = date(year + month // 12, month % 12 + 1, 1)

    def instant(day: date) -> datetime:
        return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)

    return instant(first), instant(last)


_event = sa.table(
    "crm_event",
    sa.column("seller_id", sa.Integer()),
    sa.column("category_code", sa.String()),
    sa.column("cancelled", sa.Boolean()),
    sa.column("occurred_at", models.base.UTCDateTime(timezone=True)),
)
_tally = sa.table(
    "tally",
    sa.column("seller_id", sa.Integer()),
    sa.column("category_code", sa.String()),
    sa.column("period", sa.String()),
    sa.column("count", sa.Integer()),
    sa.column("updated_at", models.base.UTCDateTime(timezone=True)),
)


def _recount_pending_touches() -> None:
    connection = op.get_bind()
    touched = connection.execute(
        sa.text(
            "SELECT DISTINCT t.seller_id, t.category_code, t.period, s.time_zone"
            " FROM tally_touch t JOIN staff s ON s.id = t.seller_id"
        )
    ).all()
    now = datetime.now(UTC)
    for seller_id, category, period, zone_name in touched:
        try:
            zone = ZoneInfo(zone_name or "Europe/Helsinki")
        except (KeyError, ValueError):
            zone = ZoneInfo("Europe/Helsinki")
        start, end = _bounds(period, zone)
        count = connection.execute(
            sa.select(sa.func.count()).where(
                _event.c.seller_id == seller_id,
                _event.c.category_code == category,
                _event.c.cancelled.is_(False),
                _event.c.occurred_at >= start,
                _event.c.occurred_at < end,
            )
        ).scalar_one()
        key = (
            (_tally.c.seller_id == seller_id)
            & (_tally.c.category_code == category)
            & (_tally.c.period == period)
        )
        if not connection.execute(
            sa.update(_tally).where(key).values(count=count, updated_at=now)
        ).rowcount:
            connection.execute(
                sa.insert(_tally).values(
                    seller_id=seller_id,
                    category_code=category,
                    period=period,
                    count=count,
                    updated_at=now,
                )
            )


def upgrade() -> None:
    _recount_pending_touches()
    with op.batch_alter_table("tally_touch") as batch:
        batch.drop_index("ix_tally_touch_seller_id_id")
    op.drop_table("tally_touch")
    op.drop_table("seller_card")
    op.create_table(
        "seller_view",
        sa.Column("seller_id", sa.Integer(), nullable=False),
        sa.Column("refreshed_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "tallies",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["seller_id"], ["staff.id"], name=op.f("fk_seller_view_seller_id_staff")
        ),
        sa.PrimaryKeyConstraint("seller_id", name=op.f("pk_seller_view")),
    )


def downgrade() -> None:
    op.drop_table("seller_view")
    op.create_table(
        "seller_card",
        sa.Column("seller_id", sa.Integer(), nullable=False),
        sa.Column("card", sa.String(length=40), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("computed_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["seller_id"], ["staff.id"], name=op.f("fk_seller_card_seller_id_staff")
        ),
        sa.PrimaryKeyConstraint("seller_id", "card", name=op.f("pk_seller_card")),
    )
    op.create_table(
        "tally_touch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seller_id", sa.Integer(), nullable=False),
        sa.Column("category_code", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=10), nullable=False),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["seller_id"], ["staff.id"], name=op.f("fk_tally_touch_seller_id_staff")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tally_touch")),
    )
    op.create_index("ix_tally_touch_seller_id_id", "tally_touch", ["seller_id", "id"])
