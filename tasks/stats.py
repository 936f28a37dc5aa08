"""Statistics: event counts by class (laji), type, category, property or seller.

Cancelled events and internal calls (unless ``CRM_COUNT_INTERNAL_CALLS``) are not counted; a
period (``2026-W48`` or ``2026-11``) is read in the configured zone. Each row names its code in
Finnish and English, as the catalogue does.
"""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from models.catalogue import Category, EventClass, EventProperty, EventType
from models.db import counts_internal_calls
from models.events import CrmEvent, EventPropertyLink, counted_when
from models.parties import Staff
from tasks.periods import period_bounds

DIMENSIONS = ("class", "type", "category", "property", "seller")


def statistics_query(
    by: str, period: str | None, zone: ZoneInfo, count_internal_calls: bool = False
) -> Select[Any]:
    """The GROUP BY behind ``crm-events stats`` (also what docs/targets-and-reports.md EXPLAINs);
    internal calls are left out unless they count (``CRM_COUNT_INTERNAL_CALLS``)."""
    # count(*): every join is at most one row per event (one seller; a property once per
    # event), and the covering occurred_at index then answers a period without the table.
    count = func.count()
    query: Select[Any]
    if by == "property":
        key: Any = EventPropertyLink.property_code
        query = (
            select(key, count)
            .select_from(CrmEvent)
            .join(EventPropertyLink, EventPropertyLink.event_id == CrmEvent.id)
        )
    elif by == "seller":
        key = Staff.username
        query = select(key, count).select_from(CrmEvent).join(Staff, Staff.id == CrmEvent.seller_id)
    elif by in ("class", "type", "category"):
        key = {
            "class": CrmEvent.class_code,
            "type": CrmEvent.type_code,
            "category": CrmEvent.category_code,
        }[by]
        query = select(key, count).select_from(CrmEvent)
    else:
        raise ValueError(f"statistics are by one of {', '.join(DIMENSIONS)}, not {by!r}")
    query = query.where(*counted_when(count_internal_calls))
    if period:
        start, end = period_bounds(period, zone)
        query = query.where(CrmEvent.occurred_at >= start, CrmEvent.occurred_at < end)
    return query.group_by(key).order_by(count.desc(), key)


def statistics(
    session: Session, by: str, period: str | None, zone: ZoneInfo
) -> list[dict[str, Any]]:
    names = _names(session, by)
    query = statistics_query(by, period, zone, counts_internal_calls(session))
    rows = session.execute(query).all()
    result = []
    for value, n in rows:
        fi, en = names.get(value, (value, value))
        result.append({by: value, "name": fi, "name_en": en, "events": n})
    return result


def _names(session: Session, by: str) -> dict[str, tuple[str, str]]:
    if by == "seller":
        return {u: (n, n) for u, n in session.execute(select(Staff.username, Staff.name))}
    columns = {
        "class": (EventClass.code, EventClass.name_fi, EventClass.name_en),
        "type": (EventType.code, EventType.name_fi, EventType.name_en),
        "category": (Category.code, Category.name_fi, Category.name_en),
        "property": (EventProperty.code, EventProperty.name_fi, EventProperty.name_en),
    }[by]
    return {code: (fi, en) for code, fi, en in session.execute(select(*columns))}
