"""Refresh stage: tell the live screens that a seller's view changed.

Tallies move with each change in its own transaction (``tasks.store.move_tallies``) and cards are
read from the events and tallies when asked for (``tasks.views``), so a refresh recomputes
nothing: it records and publishes the seller's current tallies. ``crm.refresh.seller`` is
coalesced: producers enqueue it only when no refresh of that seller is pending
(``tasks.store.claim_refresh``), so a burst of changes gives one notification.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.db import prepared_upsert, table_of
from models.parties import Staff
from models.targets import RefreshRequest, SellerView, Tally
from tasks.context import StageContext
from tasks.periods import period_keys
from tasks.store import STALE_REFRESH_REQUEST, seller_zone

log = logging.getLogger(__name__)


def refresh_seller(
    session: Session, ctx: StageContext, seller_id: int, now: datetime | None = None
) -> dict[str, Any] | None:
    """Record the seller's current tallies as their view's latest state; returns the
    notification to publish (None when the seller is gone). ``now`` picks the periods."""
    seller = session.get(Staff, seller_id)
    if seller is None:
        return None
    refreshed = utcnow()
    week, month = period_keys(now or refreshed, seller_zone(session, seller_id))
    tallies = {
        f"{category}/{period}": count
        for category, period, count in session.execute(
            select(Tally.category_code, Tally.period, Tally.count)
            .where(Tally.seller_id == seller_id, Tally.period.in_((week, month)))
            .order_by(Tally.category_code, Tally.period)
        )
    }
    session.execute(
        prepared_upsert(session, table_of(SellerView), _view_upsert),
        {"seller_id": seller_id, "refreshed_at": refreshed, "tallies": tallies},
    )
    return {
        "seller": seller.username,
        "seller_id": seller.id,
        "week": week,
        "month": month,
        "tallies": tallies,
        "refreshed_at": refreshed.isoformat(),
    }


def _view_upsert(upsert: Any) -> Any:
    return upsert.on_conflict_do_update(
        index_elements=["seller_id"],
        set_={"refreshed_at": upsert.excluded.refreshed_at, "tallies": upsert.excluded.tallies},
    )


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


def sellers_to_sweep(session: Session, now: datetime | None = None) -> list[int]:
    """Sellers whose refresh was requested and never ran (its task lost with a process that
    died between the claim and the publish): their claim has gone stale."""
    before = (now or utcnow()) - STALE_REFRESH_REQUEST
    return list(
        session.scalars(
            select(RefreshRequest.seller_id)
            .where(RefreshRequest.requested_at < before)
            .order_by(RefreshRequest.seller_id)
        )
    )
