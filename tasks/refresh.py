"""Refresh stage: recompute the touched tallies and the seller's cards from stored events.

``crm.refresh.seller`` is coalesced: producers enqueue it only when no refresh of that seller is
pending (``tasks.store.claim_refresh``), and one run handles every key touched until it starts.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from models.base import utcnow
from models.db import is_postgresql, upsert_insert
from models.events import CrmEvent
from models.parties import Staff
from models.targets import SellerCard, Tally, TallyTouch
from tasks.context import StageContext
from tasks.periods import period_bounds
from tasks.store import seller_zone
from tasks.views import seller_cards

log = logging.getLogger(__name__)

#: Namespace of the transaction-level advisory locks that serialise one seller's refreshes.
REFRESH_LOCK_NAMESPACE = 0x43524D  # "CRM"


def count_for(session: Session, seller_id: int, category: str, period: str) -> int:
    zone = seller_zone(session, seller_id)
    start, end = period_bounds(period, zone)
    return (
        session.scalar(
            select(func.count(CrmEvent.id)).where(
                CrmEvent.seller_id == seller_id,
                CrmEvent.category_code == category,
                CrmEvent.cancelled.is_(False),
                CrmEvent.occurred_at >= start,
                CrmEvent.occurred_at < end,
            )
        )
        or 0
    )


def write_tally(session: Session, seller_id: int, category: str, period: str, count: int) -> None:
    write_tallies(session, [(seller_id, category, period, count)])


def write_tallies(session: Session, rows: list[tuple[int, str, str, int]]) -> None:
    """Upsert tally rows (seller, category, period, count) in one statement per batch."""
    if not rows:
        return
    now = utcnow()
    statement = upsert_insert(session, Tally.__table__)
    statement = statement.on_conflict_do_update(
        index_elements=["seller_id", "category_code", "period"],
        set_={"count": statement.excluded["count"], "updated_at": statement.excluded.updated_at},
    )
    for start in range(0, len(rows), 5000):
        session.execute(
            statement,
            [
                {"seller_id": s, "category_code": c, "period": p, "count": n, "updated_at": now}
                for s, c, p, n in rows[start : start + 5000]
            ],
        )


def lock_seller(session: Session, seller_id: int) -> None:
    """Serialise refreshes of one seller (SQLite serialises every writer already)."""
    if is_postgresql(session):
        session.execute(
            text("SELECT pg_advisory_xact_lock(:ns, :key)"),
            {"ns": REFRESH_LOCK_NAMESPACE, "key": seller_id},
        )


def refresh_seller(session: Session, ctx: StageContext, seller_id: int) -> dict[str, Any] | None:
    """Recompute touched tallies and the cards of one seller; returns the notification."""
    lock_seller(session, seller_id)
    seller = session.get(Staff, seller_id)
    if seller is None:
        return None
    touches = session.execute(
        select(TallyTouch.id, TallyTouch.category_code, TallyTouch.period).where(
            TallyTouch.seller_id == seller_id
        )
    ).all()
    keys = sorted({(category, period) for _, category, period in touches})
    tallies = {}
    for category, period in keys:
        count = count_for(session, seller_id, category, period)
        write_tally(session, seller_id, category, period, count)
        tallies[f"{category}/{period}"] = count
    if touches:
        # Delete exactly the touches read: one committed meanwhile waits for the next refresh.
        session.execute(delete(TallyTouch).where(TallyTouch.id.in_([t[0] for t in touches])))
    cards = seller_cards(session, seller, cards=ctx.settings.seller_cards)
    # Cards no longer configured (CRM_SELLER_CARDS changed) are not kept around.
    session.execute(
        delete(SellerCard).where(
            SellerCard.seller_id == seller_id,
            SellerCard.card.not_in([card["key"] for card in cards]),
        )
    )
    for card in cards:
        statement = upsert_insert(session, SellerCard.__table__).values(
            seller_id=seller_id, card=card["key"], payload=card, computed_at=utcnow()
        )
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["seller_id", "card"],
                set_={"payload": card, "computed_at": utcnow()},
            )
        )
    return {
        "seller": seller.username,
        "seller_id": seller.id,
        "tallies": tallies,
        "cards": {c["key"]: {"week": c["count_week"], "month": c["count_month"]} for c in cards},
    }


_notifiers: dict[tuple[int, str], Any] = {}


def publish_notification(ctx: StageContext, notification: dict[str, Any]) -> None:
    """Tell live screens on the Redis channels ``crm.seller.<seller_id>`` (DESIGN §5) and
    ``crm.seller.<username>``, in one round trip; no Redis, no live screens.

    One client (and its connection pool) per process and URL: a refresh runs for nearly every
    burst of events, and a new connection each time would be a TCP handshake on the hot path.
    """
    url = ctx.settings.effective_redis_url
    if not url:
        return
    import redis

    key = (os.getpid(), url)
    if key not in _notifiers:
        _notifiers[key] = redis.Redis.from_url(url, socket_timeout=5)
    document = json.dumps(notification)
    pipe = _notifiers[key].pipeline(transaction=False)
    pipe.publish(f"crm.seller.{notification['seller_id']}", document)
    pipe.publish(f"crm.seller.{notification['seller']}", document)
    pipe.execute()


#: Touched tallies older than this, with no refresh on its way, are requested by the sweep.
SWEEP_AFTER = timedelta(seconds=30)


def sellers_to_sweep(session: Session, now: datetime | None = None) -> list[int]:
    """Sellers with tally touches that have waited longer than ``SWEEP_AFTER``."""
    before = (now or utcnow()) - SWEEP_AFTER
    return list(
        session.scalars(
            select(TallyTouch.seller_id)
            .where(TallyTouch.created_at < before)
            .distinct()
            .order_by(TallyTouch.seller_id)
        )
    )
