"""Maintenance: recompute every tally from the stored events and record any drift (should be 0);
delete an event by hand, moving its counts.

``crm.maintenance.reconcile`` runs nightly (beat) and on demand (``crm-events reconcile``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from models.base import utcnow
from models.db import chunked, is_postgresql, upsert_insert
from models.events import CrmEvent, counted
from models.invalid import BadInput
from models.parties import Staff
from models.targets import ReconcileRun, Tally
from tasks.context import StageContext
from tasks.periods import day_keys
from tasks.store import (
    DEFERRED_TALLIES,
    TALLY_LOCK_NAMESPACE,
    lock_event_by_id,
    move_tallies,
    tally_keys,
)
from tasks.views import zone_of

log = logging.getLogger(__name__)

TallyKeyTuple = tuple[int, str, str]


def expected_tallies(
    session: Session, sellers: list[int] | None = None
) -> dict[TallyKeyTuple, int]:
    """Every tally recomputed from the events: (seller, category, period) -> count.

    Sellers are taken zone by zone. On PostgreSQL the database counts the events per seller,
    category and local day (``timezone(zone, occurred_at)``), so a million events become a few
    hundred thousand day counts; elsewhere (SQLite) the local days are computed here.
    """
    by_zone: dict[str, list[int]] = defaultdict(list)
    staff_query = select(Staff) if sellers is None else select(Staff).where(Staff.id.in_(sellers))
    for staff in session.scalars(staff_query):
        by_zone[zone_of(staff).key].append(staff.id)
    counts: dict[TallyKeyTuple, int] = {}
    for zone_name, seller_ids in by_zone.items():
        zone = ZoneInfo(zone_name)
        keys_of_day: dict[date, tuple[str, str]] = {}
        for chunk in chunked(seller_ids):
            for seller_id, category, day, number in _day_counts(session, zone, chunk):
                periods = keys_of_day.get(day)
                if periods is None:
                    periods = keys_of_day[day] = day_keys(day)
                for period in periods:
                    key = (seller_id, category, period)
                    counts[key] = counts.get(key, 0) + number
    return counts


def _day_counts(
    session: Session, zone: ZoneInfo, seller_ids: Sequence[int]
) -> Iterator[tuple[int, str, date, int]]:
    """(seller, category, local day, events) of these sellers, whose zone is ``zone``."""
    of_day = (CrmEvent.seller_id.in_(seller_ids), *counted(session))
    if is_postgresql(session) and session.scalar(
        select(func.count()).select_from(text("pg_timezone_names")).where(text("name = :zone")),
        {"zone": zone.key},
    ):
        day = func.date(func.timezone(zone.key, CrmEvent.occurred_at))
        rows = session.execute(
            select(CrmEvent.seller_id, CrmEvent.category_code, day, func.count())
            .where(*of_day)
            .group_by(CrmEvent.seller_id, CrmEvent.category_code, day)
        )
        for seller_id, category, local_day, number in rows:
            yield seller_id, category, local_day, number
        return
    for seller_id, category, occurred in session.execute(
        select(CrmEvent.seller_id, CrmEvent.category_code, CrmEvent.occurred_at)
        .where(*of_day)
        .execution_options(yield_per=20_000)
    ):
        if seller_id is not None:  # excluded by the query; this tells the type checker
            yield seller_id, category, occurred.astimezone(zone).date(), 1


def reconcile(
    session: Session, ctx: StageContext | None = None, now: datetime | None = None
) -> ReconcileRun:
    """Compare stored tallies with a recomputation from scratch, repair, and record the drift.

    Run it in one snapshot (:func:`snapshot`) so the events and tallies agree.
    """
    now = now or utcnow()
    expected = expected_tallies(session)
    stored: dict[TallyKeyTuple, int] = {
        (seller_id, category, period): count
        for seller_id, category, period, count in session.execute(
            select(Tally.seller_id, Tally.category_code, Tally.period, Tally.count)
        )
    }
    usernames: dict[int, str] = {i: u for i, u in session.execute(select(Staff.id, Staff.username))}
    drift: list[dict[str, Any]] = []
    keys = sorted(set(expected) | set(stored))
    for key in keys:
        want, have = expected.get(key, 0), stored.get(key, 0)
        if want != have:
            drift.append(
                {
                    "seller_id": key[0],
                    "seller": usernames.get(key[0]),
                    "category": key[1],
                    "period": key[2],
                    "stored": have,
                    "expected": want,
                }
            )
    write_tallies(
        session, [(d["seller_id"], d["category"], d["period"], d["expected"]) for d in drift]
    )
    run = ReconcileRun(keys_checked=len(keys), drift=len(drift), details=drift)
    session.add(run)
    session.flush()
    if drift:
        log.warning(
            "reconcile: %d tally keys had drifted and were repaired, e.g. %s",
            len(drift),
            drift[:10],
        )
    else:
        log.info("reconcile: %d tally keys checked, no drift", len(keys))
    return run


def write_tallies(session: Session, rows: list[tuple[int, str, str, int]]) -> None:
    """Set tally rows (seller, category, period, count), in one statement per batch."""
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


def recount_seller(session: Session, seller_id: int) -> int:
    """Recount every tally of one seller from the events (after their time zone changed, every
    event may belong to other periods). It takes the seller's tally lock exclusively, so every
    change in flight commits first and is counted, and every later one moves the recounted rows.
    Returns the number of tally rows it replaced or wrote (0: the seller counts nothing).
    """
    if is_postgresql(session):
        session.execute(
            text("SELECT pg_advisory_xact_lock(:ns, :seller)"),
            {"ns": TALLY_LOCK_NAMESPACE, "seller": seller_id},
        )
    deferred = session.info.get(DEFERRED_TALLIES)
    if deferred is not None:  # counted here already: a batch must not move them again
        deferred[:] = [(key, delta) for key, delta in deferred if key.seller_id != seller_id]
    expected = expected_tallies(session, [seller_id])
    stored = session.scalar(
        select(func.count()).select_from(Tally).where(Tally.seller_id == seller_id)
    )
    session.execute(delete(Tally).where(Tally.seller_id == seller_id))
    write_tallies(session, [(s, c, p, n) for (s, c, p), n in sorted(expected.items())])
    return max(stored or 0, len(expected))


def delete_event(session: Session, event_id: int) -> tuple[dict[str, Any], set[int]]:
    """Delete an event (its properties, participants, documents and follow-up go with it).

    Its counts move in the same transaction. Returns what was deleted and the sellers to
    refresh.
    """
    event = lock_event_by_id(session, event_id)
    if event is None:
        raise BadInput(f"no event {event_id}")
    summary = {
        "id": event.id,
        "source": event.source_system,
        "source_kind": event.source_kind,
        "source_id": event.source_id,
        "category": event.category_code,
        "occurred_at": event.occurred_at.isoformat(),
        "subject": event.subject,
    }
    keys = tally_keys(session, event)
    session.execute(delete(CrmEvent).where(CrmEvent.id == event_id))
    session.expunge(event)
    sellers = move_tallies(session, keys, ())
    return summary, sellers
