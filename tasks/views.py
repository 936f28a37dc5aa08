"""Read models shared by the refresh stage and the command line: event JSON, cards, progress.

A card's counts and its event list are computed from one query result, so they always agree.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.catalogue import Category
from models.documents import EventDocument
from models.events import CrmEvent, EventParticipant, EventPropertyLink, FollowUp
from models.parties import Contact, Customer, Staff
from models.targets import Tally, Target
from tasks.periods import period_bounds, period_dates, period_keys
from tasks.store import seller_zone


def events_json(
    session: Session, events: list[CrmEvent], zone: ZoneInfo | None = None
) -> list[dict[str, Any]]:
    """The JSON of events (DESIGN §10), loaded with a fixed number of queries.

    Times are ISO 8601 with the offset of ``zone`` (the configured zone), as people read them.
    """
    if not events:
        return []
    zone = zone or ZoneInfo("UTC")
    ids = [e.id for e in events]
    staff = {s.id: s.username for s in session.scalars(select(Staff))}
    customers = dict(session.execute(select(Customer.id, Customer.customer_number)).all())
    contact_ids = {e.contact_id for e in events if e.contact_id}
    for e in events:
        contact_ids.update(
            c for c in (e.details or {}).get("contact_ids", []) if isinstance(c, int)
        )
    contacts = dict(
        session.execute(select(Contact.id, Contact.name).where(Contact.id.in_(contact_ids))).all()
    )
    properties: dict[int, list[str]] = defaultdict(list)
    for event_id, code in session.execute(
        select(EventPropertyLink.event_id, EventPropertyLink.property_code)
        .where(EventPropertyLink.event_id.in_(ids))
        .order_by(EventPropertyLink.property_code)
    ):
        properties[event_id].append(code)
    participants: dict[int, list[str]] = defaultdict(list)
    for event_id, staff_id in session.execute(
        select(EventParticipant.event_id, EventParticipant.staff_id).where(
            EventParticipant.event_id.in_(ids)
        )
    ):
        participants[event_id].append(staff[staff_id])
    documents: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for doc in session.scalars(
        select(EventDocument).where(EventDocument.event_id.in_(ids)).order_by(EventDocument.id)
    ):
        documents[doc.event_id].append(
            {
                "filename": doc.filename,
                "media_type": doc.media_type,
                "size": doc.size,
                "sha256": doc.sha256,
                "role": doc.role,
                "note": doc.note,
            }
        )
    result = []
    for e in events:
        result.append(
            {
                "id": e.id,
                "source": e.source_system,
                "source_kind": e.source_kind,
                "source_id": e.source_id,
                "category": e.category_code,
                "class": e.class_code,
                "type": e.type_code,
                "properties": properties[e.id],
                "customer_number": customers.get(e.customer_id) if e.customer_id else None,
                "contact": contacts.get(e.contact_id) if e.contact_id else None,
                "contacts": _contact_names(e, contacts),
                "link_state": e.link_state,
                "candidates": e.candidates,
                "seller": staff.get(e.seller_id) if e.seller_id else None,
                "staff": sorted(participants[e.id]),
                "occurred_at": e.occurred_at.astimezone(zone).isoformat(),
                "ended_at": e.ended_at.astimezone(zone).isoformat() if e.ended_at else None,
                "duration_s": e.duration_s,
                "direction": e.direction,
                "subject": e.subject,
                "body": e.body,
                "status": e.status,
                "cancelled": e.cancelled,
                "thread_key": e.thread_key,
                "documents": documents[e.id],
                "classification_note": e.classification_note,
                "match_note": e.match_note,
            }
        )
    return result


def _contact_names(event: CrmEvent, names: dict[int, str]) -> list[str]:
    ids = [event.contact_id] if event.contact_id else []
    ids += [c for c in (event.details or {}).get("contact_ids", []) if c not in ids]
    return [names[c] for c in ids if c in names]


def staff_by_username(session: Session, username: str) -> Staff | None:
    return session.scalar(select(Staff).where(Staff.username == username))


def target_in_force(session: Session, seller_id: int, category: str, period: str) -> int | None:
    """The target that applied to a period: the latest one valid by the period's last day.

    A changed target therefore never rewrites the periods that ended before it took effect.
    """
    kind = "weekly" if "W" in period else "monthly"
    _, last = period_dates(period)
    return session.scalar(
        select(Target.value)
        .where(
            Target.seller_id == seller_id,
            Target.category_code == category,
            Target.kind == kind,
            Target.valid_from <= last,
        )
        .order_by(Target.valid_from.desc(), Target.id.desc())
        .limit(1)
    )


def tally_count(session: Session, seller_id: int, category: str, period: str) -> int:
    return (
        session.scalar(
            select(Tally.count).where(
                Tally.seller_id == seller_id,
                Tally.category_code == category,
                Tally.period == period,
            )
        )
        or 0
    )


def pace(target: int | None, actual: int, period: str, zone: Any, now: datetime) -> dict[str, Any]:
    """Expected by now (pro rata over the period) vs actual; behind when 10 % or more short."""
    if not target:
        return {"expected_by_now": None, "pace": None}
    start, end = period_bounds(period, zone)
    if now >= end:
        fraction = 1.0
    elif now <= start:
        fraction = 0.0
    else:
        fraction = (now - start) / (end - start)
    expected = target * fraction
    on_track = actual >= expected * 0.9
    return {"expected_by_now": round(expected, 1), "pace": "on track" if on_track else "behind"}


def targets_progress(
    session: Session,
    *,
    seller: str | None = None,
    period: str | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    now = now or utcnow()
    query = (
        select(Staff).where(Staff.active.is_(True), Staff.role == "seller").order_by(Staff.username)
    )
    if seller:
        query = select(Staff).where(Staff.username == seller)
    categories = session.scalars(
        select(Category).where(Category.sales_target.is_(True)).order_by(Category.position)
    ).all()
    rows = []
    for staff in session.scalars(query):
        zone = seller_zone(session, staff.id)
        periods = [period] if period else list(period_keys(now, zone))
        for p in periods:
            for category in categories:
                target = target_in_force(session, staff.id, category.code, p)
                actual = tally_count(session, staff.id, category.code, p)
                rows.append(
                    {
                        "seller": staff.username,
                        "category": category.code,
                        "category_name": category.name_fi,
                        "period": p,
                        "kind": "weekly" if "W" in p else "monthly",
                        "target": target,
                        "actual": actual,
                        **pace(target, actual, p, zone, now),
                    }
                )
    return rows


def seller_cards(
    session: Session, seller: Staff, now: datetime | None = None
) -> list[dict[str, Any]]:
    """The seller view: one card per category, counts and lists from the same rows."""
    now = now or utcnow()
    zone = seller_zone(session, seller.id)
    week, month = period_keys(now, zone)
    week_start, week_end = period_bounds(week, zone)
    month_start, month_end = period_bounds(month, zone)
    rows = session.scalars(
        select(CrmEvent)
        .where(
            CrmEvent.seller_id == seller.id,
            CrmEvent.cancelled.is_(False),
            or_(
                and_(CrmEvent.occurred_at >= week_start, CrmEvent.occurred_at < week_end),
                and_(CrmEvent.occurred_at >= month_start, CrmEvent.occurred_at < month_end),
            ),
        )
        .order_by(CrmEvent.occurred_at.desc(), CrmEvent.id.desc())
    ).all()
    by_category: dict[str, list[CrmEvent]] = defaultdict(list)
    for event in rows:
        by_category[event.category_code].append(event)
    follow_ups = session.execute(
        select(FollowUp, CrmEvent.category_code, CrmEvent.subject)
        .join(CrmEvent, CrmEvent.id == FollowUp.event_id)
        .where(FollowUp.seller_id == seller.id, FollowUp.state == "open")
        .order_by(FollowUp.created_at)
    ).all()
    cards = []
    for category in session.scalars(select(Category).order_by(Category.position)):
        events = by_category.get(category.code, [])
        listed = []
        for e in events:
            listed.append(
                {
                    "id": e.id,
                    "occurred_at": e.occurred_at.astimezone(zone).isoformat(),
                    "subject": e.subject,
                    "status": e.status,
                    "in_week": week_start <= e.occurred_at < week_end,
                    "in_month": month_start <= e.occurred_at < month_end,
                }
            )
        card: dict[str, Any] = {
            "card": category.name_fi,
            "card_en": category.name_en,
            "category": category.code,
            "week": week,
            "month": month,
            "count_week": sum(1 for e in listed if e["in_week"]),
            "count_month": sum(1 for e in listed if e["in_month"]),
            "events": listed,
            "follow_ups": [
                {"event_id": f.event_id, "reason": f.reason, "subject": subject}
                for f, code, subject in follow_ups
                if code == category.code
            ],
            "target": None,
        }
        if category.sales_target:
            card["target"] = {
                "weekly": target_in_force(session, seller.id, category.code, week),
                "monthly": target_in_force(session, seller.id, category.code, month),
            }
        cards.append(card)
    return cards


def parse_day(text: str) -> date:
    return date.fromisoformat(text)


def count_events(session: Session) -> int:
    return session.scalar(select(func.count(CrmEvent.id))) or 0
