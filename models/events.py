"""CRM events (CRM-tapahtumat), their properties, the staff involved and follow-ups."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    and_,
    literal_column,
    or_,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.base import Base, JsonValue, utcnow
from models.db import counts_internal_calls


class CrmEvent(Base):
    __tablename__ = "crm_event"
    __table_args__ = (
        # The natural key: redelivery, duplicate webhooks and the same email through two
        # mailboxes all converge on this one row.
        UniqueConstraint("source_system", "source_kind", "source_id"),
        Index("ix_crm_event_seller_category_occurred", "seller_id", "category_code", "occurred_at"),
        Index("ix_crm_event_customer_occurred", "customer_id", "occurred_at"),
        # Time ranges and newest-first listings; on PostgreSQL it also carries the codes that
        # statistics group by, so statistics for a period are an index-only scan (see
        # docs/targets-and-reports.md for the plans).
        Index(
            "ix_crm_event_occurred_classification",
            "occurred_at",
            postgresql_include=[
                "class_code",
                "type_code",
                "category_code",
                "seller_id",
                "cancelled",
            ],
        ),
        # Free-text search over subject and memo: trigram indexes serve ILIKE '%word%' on
        # PostgreSQL. SQLite has no such index (the embedded default scans, which is fine at its
        # size); ``ddl_if`` keeps them PostgreSQL-only and models.migrate compares accordingly.
        Index(
            "ix_crm_event_subject_trgm",
            "subject",
            postgresql_using="gin",
            postgresql_ops={"subject": "gin_trgm_ops"},
        ).ddl_if(dialect="postgresql"),
        Index(
            "ix_crm_event_body_trgm",
            "body",
            postgresql_using="gin",
            postgresql_ops={"body": "gin_trgm_ops"},
        ).ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    source_system: Mapped[str] = mapped_column(String(100))
    #: call | email | visit | meeting
    source_kind: Mapped[str] = mapped_column(String(20))
    source_id: Mapped[str] = mapped_column(String(500))

    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customer.id"))
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contact.id"), index=True)
    #: The assigned seller: targets and cards count this staff member.
    seller_id: Mapped[int | None] = mapped_column(ForeignKey("staff.id"))
    #: linked | unlinked | ambiguous
    link_state: Mapped[str] = mapped_column(String(20), default="unlinked", index=True)
    #: auto | hand: events linked by hand are never re-linked automatically.
    linked_by: Mapped[str] = mapped_column(String(10), default="auto")
    match_note: Mapped[str] = mapped_column(Text, default="")
    #: Other candidates when the match is ambiguous (contact ids and names).
    candidates: Mapped[list[dict[str, Any]]] = mapped_column(JsonValue, default=list)

    category_code: Mapped[str] = mapped_column(ForeignKey("category.code"), index=True)
    class_code: Mapped[str] = mapped_column(ForeignKey("event_class.code"), index=True)
    type_code: Mapped[str] = mapped_column(ForeignKey("event_type.code"), index=True)
    classification_note: Mapped[str] = mapped_column(Text, default="")

    subject: Mapped[str] = mapped_column(Text, default="")
    body: Mapped[str] = mapped_column(Text, default="")
    #: inbound | outbound | null (visits, memos without a direction)
    direction: Mapped[str | None] = mapped_column(String(20))
    status: Mapped[str | None] = mapped_column(String(40))
    #: Indexed by ix_crm_event_occurred_classification (above).
    occurred_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    duration_s: Mapped[int | None]
    thread_key: Mapped[str | None] = mapped_column(String(500), index=True)
    #: The ERP's project the event belongs to (Lemonsoft's CRM event carries it), and the offer
    #: it concerns: given by the messages, searched by number.
    project_number: Mapped[str | None] = mapped_column(String(40), index=True)
    project_name: Mapped[str | None] = mapped_column(String(200))
    offer_number: Mapped[str | None] = mapped_column(String(40), index=True)
    offer_url: Mapped[str | None] = mapped_column(String(1000))
    #: The CRM status (Lemonsoft's "tila"), one of :data:`STATES`: done
    #: (valmis) unless a message says otherwise. A call's ``status`` is its telephony status.
    state: Mapped[str] = mapped_column(String(20), default="done", server_default="done")
    cancelled: Mapped[bool] = mapped_column(default=False)
    #: Source-specific facts that do not deserve a column (raw numbers, merged call state).
    details: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


#: An inbound call in one of these statuses reached us: it closes earlier follow-ups.
ANSWERED_STATUSES = ("answered", "completed")


def sql_word(word: str) -> Any:
    """``word`` written into the statement as a string constant, not sent as a parameter: a
    partial index whose predicate names it (``state = 'open'``) then serves the generic plan of
    a prepared statement too, where a parameter's value is unknown when it is planned."""
    if "'" in word:
        raise ValueError(f"not a plain word: {word!r}")
    return literal_column(f"'{word}'", String)


def reaches_customer_sql(table: Any) -> Any:
    """``table``'s event is a call that reached the customer: an answered inbound call or any
    outbound call (``tasks.ingest.call_state.reaches_customer``).

    The values are written into the statement, not sent as parameters: the planner then sees
    that ``ix_crm_event_reaching_call`` holds exactly such calls, also in the generic plan of a
    prepared statement (``sql_word``).
    """
    return and_(
        table.source_kind == sql_word("call"),
        or_(
            table.direction == sql_word("outbound"),
            and_(
                table.direction == sql_word("inbound"),
                table.status.in_([sql_word(s) for s in ANSWERED_STATUSES]),
            ),
        ),
    )


# A customer's calls that reached them, in time order and then id: which call closes a
# follow-up is the first entry after the missed call's time, found without a sort and whatever
# the statistics say (a backfill outruns ANALYZE; with the index of all the customer's events a
# planner told that few of them qualify sorted every later event of the customer instead).
Index(
    "ix_crm_event_reaching_call",
    CrmEvent.customer_id,
    CrmEvent.occurred_at,
    CrmEvent.id,
    postgresql_where=reaches_customer_sql(CrmEvent.__table__.c),
    sqlite_where=reaches_customer_sql(CrmEvent.__table__.c),
)


class EventPropertyLink(Base):
    __tablename__ = "event_property_link"

    event_id: Mapped[int] = mapped_column(
        ForeignKey("crm_event.id", ondelete="CASCADE"), primary_key=True
    )
    property_code: Mapped[str] = mapped_column(
        ForeignKey("event_property.code"), primary_key=True, index=True
    )


class EventParticipant(Base):
    """Staff involved in an event ("who has been in touch"), the assigned seller included."""

    __tablename__ = "event_participant"

    event_id: Mapped[int] = mapped_column(
        ForeignKey("crm_event.id", ondelete="CASCADE"), primary_key=True
    )
    staff_id: Mapped[int] = mapped_column(ForeignKey("staff.id"), primary_key=True, index=True)


class FollowUp(Base):
    """An open task for a seller, e.g. to call back a customer whose call was missed."""

    __tablename__ = "follow_up"
    __table_args__ = (
        # A customer's open follow-ups, read by every call that may close one: without it, all
        # of a busy customer's follow-ups of the past were read for each (tasks.ingest.call_state).
        Index(
            "ix_follow_up_open_customer",
            "customer_id",
            postgresql_where=text("state = 'open'"),
            sqlite_where=text("state = 'open'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(
        ForeignKey("crm_event.id", ondelete="CASCADE"), unique=True
    )
    seller_id: Mapped[int | None] = mapped_column(ForeignKey("staff.id"), index=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customer.id"), index=True)
    reason: Mapped[str] = mapped_column(Text)
    #: open | closed
    state: Mapped[str] = mapped_column(String(10), default="open")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None]
    closed_by_event_id: Mapped[int | None] = mapped_column(
        ForeignKey("crm_event.id", ondelete="SET NULL"), index=True
    )


class WorkTask(Base):
    """A work task on an event: something someone must do about it (send the offer, call back),
    by a due date, done or not yet. Set by a ``crm.task/1`` message, the command line or the
    API; closed by hand."""

    __tablename__ = "work_task"
    __table_args__ = (
        # A sender's own id for its task: a later message with it changes the same task.
        UniqueConstraint("source_system", "source_id"),
        Index("ix_work_task_assignee_id_state_due_date", "assignee_id", "state", "due_date"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(
        ForeignKey("crm_event.id", ondelete="CASCADE"), index=True
    )
    assignee_id: Mapped[int | None] = mapped_column(ForeignKey("staff.id"))
    title: Mapped[str] = mapped_column(String(500))
    due_date: Mapped[date | None]
    #: open | done
    state: Mapped[str] = mapped_column(String(10), default="open")
    #: Who set it: ``cli:<user>``, ``api:<token name>`` or a message's ``source_system``.
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    done_at: Mapped[datetime | None]
    done_by: Mapped[str | None] = mapped_column(String(200))
    source_system: Mapped[str | None] = mapped_column(String(100))
    source_id: Mapped[str | None] = mapped_column(String(200))


#: The columns of the ERP's project and offer (``models.schemas.common.ErpReferencesSchema``).
ERP_REFERENCES = ("project_number", "project_name", "offer_number", "offer_url")

#: The CRM statuses of an event (Lemonsoft's "tila") and their Finnish names. A call or an
#: email is open or done; a visit or a meeting may also be scheduled, or cancelled (then it
#: does not count). Done unless a message says otherwise.
STATES = {"open": "kesken", "scheduled": "sovittu", "done": "valmis", "cancelled": "peruttu"}


def counted(session: Session) -> tuple[Any, ...]:
    """The conditions on ``crm_event`` for an event to count toward cards, tallies, targets and
    statistics: not cancelled, and not an internal call unless those count
    (``CRM_COUNT_INTERNAL_CALLS``)."""
    return counted_when(counts_internal_calls(session))


def counted_when(count_internal_calls: bool) -> tuple[Any, ...]:
    """:func:`counted`, with internal calls counting or not."""
    if count_internal_calls:
        return (CrmEvent.cancelled.is_(False),)
    return (CrmEvent.cancelled.is_(False), CrmEvent.link_state != "internal")


def counts(session: Session, event: CrmEvent) -> bool:
    """Whether ``event`` counts (:func:`counted`), assigned or not."""
    if event.cancelled:
        return False
    return event.link_state != "internal" or counts_internal_calls(session)


#: Kinds whose key's ``source_system`` is fixed (``email``, ``calendar``) so that one email or
#: meeting through two gateways is one event: their sender is the gateway (``details``).
DELIVERED_KINDS = ("email", "meeting")


def sent_by(system: str) -> Any:
    """Events that ``system`` sent: a call's or a visit's ``source_system``; for an email or a
    meeting invitation, the gateway or mailbox that delivered it (see :data:`DELIVERED_KINDS`)."""
    return or_(
        and_(CrmEvent.source_kind.not_in(DELIVERED_KINDS), CrmEvent.source_system == system),
        and_(
            CrmEvent.source_kind.in_(DELIVERED_KINDS),
            CrmEvent.details["gateway"].as_string() == system,
        ),
    )


def source_of(event: CrmEvent) -> str:
    """The system that sent ``event`` (:func:`sent_by`)."""
    if event.source_kind in DELIVERED_KINDS:
        return str((event.details or {}).get("gateway") or event.source_system)
    return event.source_system
