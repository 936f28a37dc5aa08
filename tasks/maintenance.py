"""Maintenance: recompute every tally from the stored events and record any drift (should be 0)."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.db import transaction
from models.events import CrmEvent
from models.targets import ReconcileRun, Tally
from tasks.context import StageContext
from tasks.errors import TRANSIENT_ERRORS
from tasks.periods import period_keys
from tasks.refresh import write_tally
from tasks.store import seller_zone
from workers.base import CrmTask


def expected_tallies(session: Session) -> dict[tuple[int, str, str], int]:
    counts: dict[tuple[int, str, str], int] = {}
    zones: dict[int, Any] = {}
    for seller_id, category, occurred in session.execute(
        select(CrmEvent.seller_id, CrmEvent.category_code, CrmEvent.occurred_at).where(
            CrmEvent.seller_id.is_not(None), CrmEvent.cancelled.is_(False)
        )
    ):
        if seller_id is None:  # excluded by the query; this tells the type checker
            continue
        zone = zones.setdefault(seller_id, seller_zone(session, seller_id))
        for period in period_keys(occurred, zone):
            key = (seller_id, category, period)
            counts[key] = counts.get(key, 0) + 1
    return counts


def reconcile(session: Session, ctx: StageContext | None = None) -> ReconcileRun:
    """Compare stored tallies with a recomputation from scratch, repair, and record the drift."""
    expected = expected_tallies(session)
    stored = {
        (t.seller_id, t.category_code, t.period): t.count for t in session.scalars(select(Tally))
    }
    drift = []
    for key in sorted(set(expected) | set(stored)):
        want, have = expected.get(key, 0), stored.get(key, 0)
        if want != have:
            drift.append(
                {
                    "seller_id": key[0],
                    "category": key[1],
                    "period": key[2],
                    "stored": have,
                    "expected": want,
                }
            )
            write_tally(session, *key, want)
    run = ReconcileRun(
        keys_checked=len(set(expected) | set(stored)), drift=len(drift), details=drift
    )
    session.add(run)
    session.flush()
    return run


@shared_task(name="crm.maintenance.reconcile", base=CrmTask, bind=True)
def reconcile_task(self: CrmTask) -> str:
    """crm.maintenance.reconcile: nightly proof that the tallies have not drifted."""
    try:
        with transaction(self.sessions) as session:
            run = reconcile(session, self.context())
    except TRANSIENT_ERRORS as exc:
        self.retry_or_record({}, exc)
        return "failed"
    return f"checked {run.keys_checked} keys, drift {run.drift}"
