"""Sales targets, tallies, the seller views' refresh state and the report runs."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, JsonValue, utcnow


class Target(Base):
    """A weekly or monthly count target, valid from a date until a later target replaces it."""

    __tablename__ = "target"
    __table_args__ = (UniqueConstraint("seller_id", "category_code", "kind", "valid_from"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    seller_id: Mapped[int] = mapped_column(ForeignKey("staff.id"))
    category_code: Mapped[str] = mapped_column(ForeignKey("category.code"))
    #: weekly | monthly
    kind: Mapped[str] = mapped_column(String(10))
    value: Mapped[int]
    valid_from: Mapped[date]
    #: Who set it: ``cli`` (``crm-events targets set``) or the ``source_system`` of a
    #: ``crm.target/1`` message.
    source_system: Mapped[str] = mapped_column(String(100), default="cli", server_default="cli")
    #: When it was set (or last replaced by a target with the same start date).
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TargetChange(Base):
    """A target set or changed, kept for good: a target with the start date of an earlier one
    replaces its value, and this says what it was, what it became, who set it and when."""

    __tablename__ = "target_change"
    __table_args__ = (
        Index("ix_target_change_seller_id_category_code", "seller_id", "category_code"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    seller_id: Mapped[int] = mapped_column(ForeignKey("staff.id"))
    category_code: Mapped[str] = mapped_column(ForeignKey("category.code"))
    #: weekly | monthly
    kind: Mapped[str] = mapped_column(String(10))
    valid_from: Mapped[date]
    #: None: the target was new.
    old_value: Mapped[int | None]
    new_value: Mapped[int]
    #: ``cli:<user>`` (``crm-events targets set``) or the ``source_system`` of a message.
    changed_by: Mapped[str] = mapped_column(String(200))
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)


class Tally(Base):
    """Events of one seller in one category in one period (``2026-W48`` or ``2026-11``)."""

    __tablename__ = "tally"

    seller_id: Mapped[int] = mapped_column(ForeignKey("staff.id"), primary_key=True)
    category_code: Mapped[str] = mapped_column(ForeignKey("category.code"), primary_key=True)
    period: Mapped[str] = mapped_column(String(10), primary_key=True)
    count: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class RefreshRequest(Base):
    """A refresh of one seller is queued: later changes piggyback on it (coalescing)."""

    __tablename__ = "refresh_request"

    seller_id: Mapped[int] = mapped_column(ForeignKey("staff.id"), primary_key=True)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)


class SellerView(Base):
    """A seller's view as its latest refresh saw it: when, and the current periods' tallies.

    The cards themselves are read from the events and tallies when asked for; this row is
    what the live screens without Redis watch for a change (and what the refresh published).
    """

    __tablename__ = "seller_view"

    seller_id: Mapped[int] = mapped_column(ForeignKey("staff.id"), primary_key=True)
    refreshed_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: ``{"sales_action/2026-W48": 3, …}``: the seller's tallies of the current week and month.
    tallies: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)


class ReportRun(Base):
    """One target report per (manager, kind, period): the row is claimed before sending."""

    __tablename__ = "report_run"
    __table_args__ = (UniqueConstraint("manager_id", "kind", "period"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    manager_id: Mapped[int] = mapped_column(ForeignKey("staff.id"))
    kind: Mapped[str] = mapped_column(String(10))
    period: Mapped[str] = mapped_column(String(10))
    #: claimed | sent | failed
    state: Mapped[str] = mapped_column(String(10), default="claimed")
    detail: Mapped[str] = mapped_column(Text, default="")
    #: Sending attempts so far (a refused or failed send is retried and counted).
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    #: When the current claim was taken: a claim older than the task time limit is abandoned.
    claimed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]


class ReconcileRun(Base):
    """The outcome of one recomputation of all tallies from the stored events."""

    __tablename__ = "reconcile_run"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    keys_checked: Mapped[int] = mapped_column(default=0)
    drift: Mapped[int] = mapped_column(default=0)
    details: Mapped[list[dict[str, Any]]] = mapped_column(JsonValue, default=list)
