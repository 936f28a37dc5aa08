"""Read models shared by the refresh stage and the command line: event JSON, cards, progress.

A card's counts and its event list are computed from one query result, so they always agree.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from config.settings import known_zone
from models.base import utcnow
from models.catalogue import Category, EventClass, EventType
from models.db import chunked
from models.documents import EventDocument
from models.events import (
    CrmEvent,
    EventParticipant,
    EventPropertyLink,
    FollowUp,
    counted,
    source_of,
)
from models.invalid import BadInput
from models.parties import Contact, Customer, Staff
from models.targets import Tally, Target
from tasks.periods import period_bounds, period_dates, period_keys, period_kind

DEFAULT_ZONE = "Europe/Helsinki"
#: Pace is "behind" when the actual count is short of the expected count by this share or more.
BEHIND_SHARE = 0.10


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
    customer_ids = {e.customer_id for e in events if e.customer_id}
    customers = dict(
        session.execute(
            select(Customer.id, Customer.customer_number).where(Customer.id.in_(customer_ids))
        ).all()
    )
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
    taking_part = session.execute(
        select(EventParticipant.event_id, EventParticipant.staff_id).where(
            EventParticipant.event_id.in_(ids)
        )
    ).all()
    staff_ids = {e.seller_id for e in events if e.seller_id} | {s for _, s in taking_part}
    staff = dict(
        session.execute(select(Staff.id, Staff.username).where(Staff.id.in_(staff_ids))).all()
    )
    participants: dict[int, list[str]] = defaultdict(list)
    for event_id, staff_id in taking_part:
        participants[event_id].append(staff[staff_id])
    documents: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for doc in session.scalars(
        select(EventDocument).where(EventDocument.event_id.in_(ids)).order_by(EventDocument.id)
    ):
        documents[doc.event_id].append(
            {
                "id": doc.id,
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
                "source": source_of(e),
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
                # Where a visit took place (crm.visit/1 location); null for calls and emails.
                "location": (e.details or {}).get("location"),
                # The ERP's project and offer, when the messages named them.
                "project_number": e.project_number,
                "project_name": e.project_name,
                "offer_number": e.offer_number,
                "offer_url": e.offer_url,
                "status": e.status,
                # The CRM status (valmis, kesken, sovittu, peruttu); status is the source's own.
                "state": e.state,
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


def known_staff(session: Session, username: str) -> Staff:
    """The staff member a filter names: one who does not exist is bad input, never a list that
    is empty for that reason."""
    staff = staff_by_username(session, username)
    if staff is None:
        raise BadInput(f"no staff member with the username {username[:40]!r}")
    return staff


def zone_of(staff: Staff) -> ZoneInfo:
    """The staff member's zone (weeks and months are counted in it); Helsinki if unusable."""
    try:
        return known_zone(staff.time_zone or DEFAULT_ZONE)
    except ValueError:
        return ZoneInfo(DEFAULT_ZONE)


def target_in_force(session: Session, seller_id: int, category: str, period: str) -> int | None:
    """The target that applied to a period: the latest one valid by the period's last day.

    A changed target therefore never rewrites the periods that ended before it took effect.
    """
    _, last = period_dates(period)
    return session.scalar(
        select(Target.value)
        .where(
            Target.seller_id == seller_id,
            Target.category_code == category,
            Target.kind == period_kind(period),
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
    """Expected by now (pro rata over the period) vs actual.

    "behind" when the actual count falls short of the expected count by 10 % or more (Zoho
    Motivator's "off track"); a closed period expects the whole target.
    """
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
    behind = expected > 0 and actual <= expected * (1 - BEHIND_SHARE) + 1e-9
    return {"expected_by_now": round(expected, 1), "pace": "behind" if behind else "on track"}


def target_categories(session: Session) -> list[Category]:
    return list(
        session.scalars(
            select(Category).where(Category.sales_target.is_(True)).order_by(Category.position)
        )
    )


def progress_rows(
    session: Session,
    sellers: list[Staff],
    categories: list[Category],
    periods: Callable[[Staff], list[str]],
    now: datetime,
) -> list[dict[str, Any]]:
    """Targets vs actuals for many sellers with a fixed number of queries (reports, the CLI).

    Actuals are the tallies (kept exact by the refresh, proven by the nightly reconcile);
    targets are the ones in force for each period (see :func:`target_in_force`).
    """
    if not sellers or not categories:
        return []
    ids = [s.id for s in sellers]
    codes = [c.code for c in categories]
    wanted = {s.id: periods(s) for s in sellers}
    all_periods = sorted({p for ps in wanted.values() for p in ps})
    history: dict[tuple[int, str, str], list[tuple[date, int]]] = defaultdict(list)
    counts: dict[tuple[int, str, str], int] = {}
    for chunk in chunked(ids):
        for seller_id, code, kind, valid_from, value in session.execute(
            select(
                Target.seller_id, Target.category_code, Target.kind, Target.valid_from, Target.value
            )
            .where(Target.seller_id.in_(chunk), Target.category_code.in_(codes))
            .order_by(Target.valid_from.desc(), Target.id.desc())
        ):
            history[(seller_id, code, kind)].append((valid_from, value))
        for seller_id, code, period, count in session.execute(
            select(Tally.seller_id, Tally.category_code, Tally.period, Tally.count).where(
                Tally.seller_id.in_(chunk),
                Tally.category_code.in_(codes),
                Tally.period.in_(all_periods),
            )
        ):
            counts[(seller_id, code, period)] = count
    rows = []
    for staff in sellers:
        zone = zone_of(staff)
        for period in wanted[staff.id]:
            kind = period_kind(period)
            _, last = period_dates(period)
            for category in categories:
                target = next(
                    (v for start, v in history[(staff.id, category.code, kind)] if start <= last),
                    None,
                )
                actual = counts.get((staff.id, category.code, period), 0)
                rows.append(
                    {
                        "seller": staff.username,
                        "seller_name": staff.name,
                        "category": category.code,
                        "category_name": category.name_fi,
                        "period": period,
                        "kind": kind,
                        "target": target,
                        "actual": actual,
                        **pace(target, actual, period, zone, now),
                    }
                )
    return rows


def targets_progress(
    session: Session,
    *,
    seller: str | None = None,
    period: str | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Targets vs actuals of the active sellers (or one) for a period, else this week and month."""
    now = now or utcnow()
    query = (
        select(Staff).where(Staff.active.is_(True), Staff.role == "seller").order_by(Staff.username)
    )
    sellers = [known_staff(session, seller)] if seller else list(session.scalars(query))

    def periods(staff: Staff) -> list[str]:
        return [period] if period else list(period_keys(now, zone_of(staff)))

    return progress_rows(session, sellers, target_categories(session), periods, now)


@dataclass(frozen=True)
class CardDefinition:
    """One card of the seller view: the events of a category, or of a class (laji)."""

    #: ``category`` or ``class``
    kind: str
    code: str
    title: str
    title_en: str
    #: The category of a category card (its targets); None for a class card.
    category: Category | None

    @property
    def key(self) -> str:
        return self.code if self.kind == "category" else f"class:{self.code}"


def card_definitions(
    session: Session, configured: Sequence[tuple[str, str]] = ()
) -> list[CardDefinition]:
    """The seller view's cards: ``CRM_SELLER_CARDS`` when set, else one per category.

    A category card's default title is the name of its category's type (DESIGN §3:
    CRM-tapahtumat, Liidit, Myyntitoimenpiteet, Asiakaskäynnit), or the category's own name where
    another card has the same type; a class card (``class:sales``, the seed: the class shapes the
    cards too) is titled by the class. A configured ``=Title`` overrides both. A configured
    category or class that does not exist (any more) is left out.
    """
    categories = {c.code: c for c in session.scalars(select(Category).order_by(Category.position))}
    types = {t.code: t for t in session.scalars(select(EventType))}
    classes = {c.code: c for c in session.scalars(select(EventClass))}
    chosen = list(configured) or [(code, "") for code in categories]
    type_uses = Counter(categories[code].default_type for code, _ in chosen if code in categories)
    cards = []
    for code, title in chosen:
        if code.startswith("class:"):
            found = classes.get(code.removeprefix("class:"))
            if found is not None:
                cards.append(
                    CardDefinition(
                        "class", found.code, title or found.name_fi, title or found.name_en, None
                    )
                )
            continue
        category = categories.get(code)
        if category is None:
            continue
        kind = types.get(category.default_type)
        named = kind if kind is not None and type_uses[category.default_type] == 1 else None
        cards.append(
            CardDefinition(
                "category",
                category.code,
                title or (named.name_fi if named else category.name_fi),
                title or (named.name_en if named else category.name_en),
                category,
            )
        )
    return cards


#: The latest events a card lists; its counts cover every event of its periods.
CARD_EVENTS = 50


def seller_cards(
    session: Session,
    seller: Staff,
    now: datetime | None = None,
    cards: Sequence[tuple[str, str]] = (),
) -> list[dict[str, Any]]:
    """The seller view: one card per configured card, read with a few indexed queries.

    A card counts the seller's events of its category (from the tallies, which move with every
    change in its transaction) or of its class (counted) in the week and the month of ``now``,
    and lists the latest :data:`CARD_EVENTS` of them, newest first (``more``: there are more);
    with the open follow-ups and, where the category takes sales targets, the targets in force
    with the pace so far. Read it in one snapshot (``tasks.maintenance.snapshot``) and the counts
    and the lists are of the same events. The cost does not grow with the seller's history.
    """
    now = now or utcnow()
    zone = zone_of(seller)
    week, month = period_keys(now, zone)
    week_start, week_end = period_bounds(week, zone)
    month_start, month_end = period_bounds(month, zone)
    in_periods = or_(
        and_(CrmEvent.occurred_at >= week_start, CrmEvent.occurred_at < week_end),
        and_(CrmEvent.occurred_at >= month_start, CrmEvent.occurred_at < month_end),
    )
    definitions = card_definitions(session, cards)
    tallies = {
        (category, period): count
        for category, period, count in session.execute(
            select(Tally.category_code, Tally.period, Tally.count).where(
                Tally.seller_id == seller.id,
                Tally.period.in_((week, month)),
                Tally.category_code.in_([d.code for d in definitions if d.kind == "category"]),
            )
        )
    }
    follow_ups = session.execute(
        select(FollowUp, CrmEvent.category_code, CrmEvent.subject)
        .join(CrmEvent, CrmEvent.id == FollowUp.event_id)
        .where(FollowUp.seller_id == seller.id, FollowUp.state == "open")
        .order_by(FollowUp.created_at)
    ).all()
    result = []
    for definition in definitions:
        category = definition.category
        of_card = (
            CrmEvent.category_code == definition.code
            if definition.kind == "category"
            else CrmEvent.class_code == definition.code
        )
        mine = (CrmEvent.seller_id == seller.id, *counted(session), of_card)
        rows = session.execute(
            select(
                CrmEvent.id,
                CrmEvent.occurred_at,
                CrmEvent.subject,
                CrmEvent.status,
                CrmEvent.state,
                CrmEvent.category_code,
            )
            .where(*mine, in_periods)
            .order_by(CrmEvent.occurred_at.desc(), CrmEvent.id.desc())
            .limit(CARD_EVENTS + 1)
        ).all()
        if definition.kind == "category":
            count_week = tallies.get((definition.code, week), 0)
            count_month = tallies.get((definition.code, month), 0)
        else:
            count_week, count_month = session.execute(
                select(
                    func.count().filter(
                        CrmEvent.occurred_at >= week_start, CrmEvent.occurred_at < week_end
                    ),
                    func.count().filter(
                        CrmEvent.occurred_at >= month_start, CrmEvent.occurred_at < month_end
                    ),
                ).where(*mine, in_periods)
            ).one()
        listed = [
            {
                "id": e.id,
                "occurred_at": e.occurred_at.astimezone(zone).isoformat(),
                "subject": e.subject,
                "status": e.status,
                "state": e.state,
                "category": e.category_code,
                "in_week": week_start <= e.occurred_at < week_end,
                "in_month": month_start <= e.occurred_at < month_end,
            }
            for e in rows[:CARD_EVENTS]
        ]
        card: dict[str, Any] = {
            "card": definition.title,
            "card_en": definition.title_en,
            "key": definition.key,
            "category": category.code if category else None,
            "class": definition.code if definition.kind == "class" else None,
            "week": week,
            "month": month,
            "count_week": count_week,
            "count_month": count_month,
            "events": listed,
            "more": len(rows) > CARD_EVENTS,
            "follow_ups": [
                {"event_id": f.event_id, "reason": f.reason, "subject": subject}
                for f, code, subject in follow_ups
                if category is not None and code == category.code
            ],
            "target": None,
        }
        if category is not None and category.sales_target:
            weekly = target_in_force(session, seller.id, category.code, week)
            monthly = target_in_force(session, seller.id, category.code, month)
            card["target"] = {
                "weekly": weekly,
                "monthly": monthly,
                "week": {
                    "period": week,
                    "target": weekly,
                    "actual": count_week,
                    **pace(weekly, count_week, week, zone, now),
                },
                "month": {
                    "period": month,
                    "target": monthly,
                    "actual": count_month,
                    **pace(monthly, count_month, month, zone, now),
                },
            }
        result.append(card)
    return result


def parse_day(text: str) -> date:
    return date.fromisoformat(text)


def count_events(session: Session) -> int:
    return session.scalar(select(func.count(CrmEvent.id))) or 0
