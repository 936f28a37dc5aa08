"""The visit samples and visit updates through the visit stage, on a real PostgreSQL session."""

from __future__ import annotations

import base64
import hashlib
import uuid
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session

from models.events import CrmEvent
from models.parties import Staff
from models.targets import Tally
from tasks.attach import read_blob
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.visit import ingest_visit
from tasks.refresh import refresh_seller
from tasks.store import tally_keys
from tasks.views import events_json
from tests.conftest import load_example


def other_delivery(ctx: StageContext) -> StageContext:
    """A later, separate task execution (a new message, not a redelivery)."""
    return StageContext(ctx.settings, task_id=str(uuid.uuid4()), task_name=ctx.task_name)


def visit_events(db: Session, visit_id: str) -> list[CrmEvent]:
    return list(
        db.scalars(
            select(CrmEvent).where(CrmEvent.source_kind == "visit", CrmEvent.source_id == visit_id)
        )
    )


def only_visit(db: Session, ctx: StageContext, visit_id: str) -> dict[str, Any]:
    events = visit_events(db, visit_id)
    assert len(events) == 1
    return events_json(db, events, ctx.settings.zone)[0]


def staff_id(db: Session, username: str) -> int:
    found = db.scalar(select(Staff.id).where(Staff.username == username))
    assert found is not None
    return found


def tally(db: Session, seller: int, category: str, period: str) -> int | None:
    return db.scalar(
        select(Tally.count).where(
            Tally.seller_id == seller, Tally.category_code == category, Tally.period == period
        )
    )


def test_visit_with_memo(world: Session, ctx: StageContext) -> None:
    message = load_example("visits/visit-with-memo.json")
    result = ingest_visit(world, ctx, message)
    assert result.outcome == "stored"
    event = only_visit(world, ctx, "v-2026-11-24-anna-01")
    assert (event["category"], event["class"], event["type"]) == (
        "customer_visit",
        "sales",
        "customer_visit",
    )
    assert event["seller"] == "anna"
    assert event["customer_number"] == "10001"
    assert event["contact"] == "Matti Virtanen"
    assert event["properties"] == ["commercial", "customer_feedback"]
    assert "mikko" in event["staff"]
    assert "anna" in event["staff"]
    assert event["occurred_at"] == "2026-11-24T10:00:00+02:00"
    assert event["duration_s"] == 75 * 60
    assert event["body"] == message["memo"]

    photos = [d for d in event["documents"] if d["filename"] == "konehalli.png"]
    assert len(photos) == 1
    assert photos[0]["media_type"] == "image/png"
    assert photos[0]["role"] == "photo"
    png = base64.b64decode(message["attachments"][0]["content_b64"])
    assert photos[0]["sha256"] == hashlib.sha256(png).hexdigest()

    memos = [d for d in event["documents"] if d["role"] == "memo"]
    assert len(memos) == 1
    stored = read_blob(world, ctx.settings, memos[0]["sha256"])
    assert stored is not None and stored.decode("utf-8") == message["memo"]


def test_class_override_refused_for_customer_visit(world: Session, ctx: StageContext) -> None:
    ingest_visit(world, ctx, load_example("visits/visit-class-override-refused.json"))
    event = only_visit(world, ctx, "v-2026-11-26-mikko-01")
    assert event["category"] == "customer_visit"
    assert event["class"] == "sales"
    assert event["type"] == "customer_visit"
    assert event["seller"] == "mikko"
    assert event["contact"] == "Sanna Heikkinen"
    note = event["classification_note"]
    assert "marketing" in note
    assert "refused" in note


def test_redelivered_visit_is_a_duplicate(world: Session, ctx: StageContext) -> None:
    message = load_example("visits/visit-with-memo.json")
    assert ingest_visit(world, ctx, message).outcome == "stored"
    assert ingest_visit(world, ctx, message).outcome == "duplicate"
    assert len(visit_events(world, "v-2026-11-24-anna-01")) == 1


def test_updated_visit_stays_one_event_with_the_new_values(
    world: Session, ctx: StageContext
) -> None:
    message = load_example("visits/visit-with-memo.json")
    first = ingest_visit(world, ctx, message)
    updated = {
        **message,
        "started_at": "2026-11-24T14:00:00+02:00",
        "ended_at": "2026-11-24T15:30:00+02:00",
        "memo": "Päivitetty muistio: tarjous lähtee maanantaina.",
    }
    second = ingest_visit(world, other_delivery(ctx), updated)
    assert second.outcome == "stored"
    assert second.event_id == first.event_id
    event = only_visit(world, ctx, "v-2026-11-24-anna-01")
    assert event["occurred_at"] == "2026-11-24T14:00:00+02:00"
    assert event["duration_s"] == 90 * 60
    assert event["body"] == updated["memo"]
    # The memo document is the current memo: the outdated one is not shown beside it.
    memos = [d for d in event["documents"] if d["role"] == "memo"]
    assert [d["sha256"] for d in memos] == [
        hashlib.sha256(updated["memo"].encode("utf-8")).hexdigest()
    ]
    # Still exactly one photo: the unchanged attachment is not added twice.
    assert len([d for d in event["documents"] if d["filename"] == "konehalli.png"]) == 1


def test_visit_moved_to_another_week_moves_its_count(world: Session, ctx: StageContext) -> None:
    message = load_example("visits/visit-with-memo.json")
    anna = staff_id(world, "anna")
    ingest_visit(world, ctx, message)
    refresh_seller(world, ctx, anna)
    assert tally(world, anna, "customer_visit", "2026-W48") == 1
    moved = {**message, "started_at": "2026-12-01T10:00:00+02:00", "ended_at": None}
    ingest_visit(world, other_delivery(ctx), moved)
    refresh_seller(world, ctx, anna)
    assert tally(world, anna, "customer_visit", "2026-W48") == 0
    assert tally(world, anna, "customer_visit", "2026-11") == 0
    assert tally(world, anna, "customer_visit", "2026-W49") == 1
    assert tally(world, anna, "customer_visit", "2026-12") == 1


def test_cancelled_visit_stops_counting(world: Session, ctx: StageContext) -> None:
    message = load_example("visits/visit-with-memo.json")
    anna = staff_id(world, "anna")
    ingest_visit(world, ctx, message)
    refresh_seller(world, ctx, anna)
    assert tally(world, anna, "customer_visit", "2026-W48") == 1
    result = ingest_visit(world, other_delivery(ctx), {**message, "cancelled": True})
    assert anna in result.sellers_to_refresh
    (event,) = visit_events(world, "v-2026-11-24-anna-01")
    assert event.cancelled is True
    assert tally_keys(world, event) == set()
    refresh_seller(world, ctx, anna)
    assert tally(world, anna, "customer_visit", "2026-W48") == 0
    assert tally(world, anna, "customer_visit", "2026-11") == 0
    assert only_visit(world, ctx, "v-2026-11-24-anna-01")["status"] == "cancelled"


def test_nul_in_a_visit_memo_is_not_a_database_error(world: Session, ctx: StageContext) -> None:
    # Either refused as bad input (recorded, replayable) or stored without the NUL; never a
    # DataError, which the task wrapper treats as a bug and records as a failed message.
    message = {**load_example("visits/visit-with-memo.json"), "memo": "Muistio\u0000 rikki"}
    try:
        with world.begin_nested():
            ingest_visit(world, ctx, message)
    except BadInput as exc:
        assert "memo" in exc.errors
        return
    except DataError as exc:
        pytest.fail(
            "BUG outside tasks/ingest/visit.py: a NUL character in a visit message reaches "
            "PostgreSQL (jsonb ledger payload in tasks/store.record_inbound) and fails with "
            f"{type(exc.orig).__name__} instead of BadInput; reject NUL in models/schemas "
            "common.Text (or strip it) before the ledger insert"
        )
    assert "\x00" not in only_visit(world, ctx, "v-2026-11-24-anna-01")["body"]
