"""Statistics: event counts by class (laji), type, category, property or seller."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.events import CrmEvent, EventPropertyLink
from models.parties import Staff
from tasks.periods import period_bounds


def statistics(
    session: Session, by: str, period: str | None, zone: ZoneInfo
) -> list[dict[str, Any]]:
    count = func.count(CrmEvent.id.distinct())
    if by == "property":
        key = EventPropertyLink.property_code
        query = select(key, count).join(
            EventPropertyLink, EventPropertyLink.event_id == CrmEvent.id
        )
    elif by == "seller":
        key = Staff.username
        query = select(key, count).join(Staff, Staff.id == CrmEvent.seller_id)
    else:
        key = {
            "class": CrmEvent.class_code,
            "type": CrmEvent.type_code,
            "category": CrmEvent.category_code,
        }[by]
        query = select(key, count)
    query = query.where(CrmEvent.cancelled.is_(False))
    if period:
        start, end = period_bounds(period, zone)
        query = query.where(CrmEvent.occurred_at >= start, CrmEvent.occurred_at < end)
    rows = session.execute(query.group_by(key).order_by(count.desc(), key)).all()
    return [{by: value, "events": n} for value, n in rows]
