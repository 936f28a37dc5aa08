"""The inbound ledger and the record of every delivery's outcome: nothing accepted is lost."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, JsonValue, utcnow


class InboundMessage(Base):
    """One accepted message, deduplicated on its idempotency key.

    Call updates are folded from these rows, so a call's merged state never depends on the
    order in which its updates arrived.
    """

    __tablename__ = "inbound_message"
    __table_args__ = (
        Index("ix_inbound_message_natural_key", "source_kind", "source_system", "source_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    schema: Mapped[str] = mapped_column(String(40))
    source_kind: Mapped[str] = mapped_column(String(20))
    source_system: Mapped[str] = mapped_column(String(100))
    source_id: Mapped[str] = mapped_column(String(500))
    #: The validated message (an email's raw bytes live in the document store, not here).
    payload: Mapped[dict[str, Any]] = mapped_column(JsonValue)
    event_id: Mapped[int | None] = mapped_column(ForeignKey("crm_event.id", ondelete="SET NULL"))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class RejectedMessage(Base):
    """Bad input: never retried, kept with its reason and payload, replayable after a fix."""

    __tablename__ = "rejected_message"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_name: Mapped[str] = mapped_column(String(100))
    task_id: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(Text)
    errors: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    payload: Mapped[Any] = mapped_column(JsonValue)
    rejected_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    replayed_at: Mapped[datetime | None]


class FailedMessage(Base):
    """A message whose processing failed after its bounded retries, or hit a bug."""

    __tablename__ = "failed_message"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_name: Mapped[str] = mapped_column(String(100))
    task_id: Mapped[str | None] = mapped_column(String(100))
    #: transient (retries exhausted) | bug | timeout (over the task time limit) | poison (its
    #: worker process died on every delivery, see :class:`DeliveryAttempt`)
    kind: Mapped[str] = mapped_column(String(20))
    exception: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(default=1)
    payload: Mapped[Any] = mapped_column(JsonValue)
    #: The queue the message was delivered from: ``replay`` sends it back there.
    queue: Mapped[str | None] = mapped_column(String(200))
    failed_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    replayed_at: Mapped[datetime | None]


class Delivery(Base):
    """How one published task message ended, keyed by its Celery task id.

    ``publish --wait`` and the fault tests read this to account for every message.
    """

    __tablename__ = "delivery"

    task_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(100))
    #: stored | duplicate | rejected | failed | done
    outcome: Mapped[str] = mapped_column(String(20))
    event_id: Mapped[int | None] = mapped_column(ForeignKey("crm_event.id", ondelete="SET NULL"))
    detail: Mapped[str] = mapped_column(Text, default="")
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeliveryAttempt(Base):
    """How many times the broker has delivered one task message (by its Celery task id).

    A first delivery writes nothing here. Only a redelivery counts (a message put back on its
    queue because the worker process running it died, or because its worker stopped before
    acknowledging it), and the count is committed before the task runs, so it survives the
    next death too. Past ``CRM_MAX_DELIVERIES`` the message is recorded as a ``poison``
    failure instead of being run again.
    """

    __tablename__ = "delivery_attempt"

    task_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(100))
    #: Deliveries so far, the first one included.
    deliveries: Mapped[int]
    last_delivered_at: Mapped[datetime] = mapped_column(default=utcnow)
