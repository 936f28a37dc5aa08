"""The call samples through the call stage, on a real PostgreSQL session."""

from __future__ import annotations

import itertools
import random

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent, FollowUp
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.views import events_json
from tests.conftest import load_example


def ingest_all(db: Session, ctx: StageContext, messages: list[dict]) -> list[str]:
    return [ingest_call(db, ctx, m).outcome for m in messages]


def only_event(db: Session, call_id: str) -> dict:
    events = db.scalars(select(CrmEvent).where(CrmEvent.source_id == call_id)).all()
    assert len(events) == 1
    return events_json(db, list(events))[0]


def test_inbound_answered_is_one_merged_event(world: Session, ctx: StageContext) -> None:
    outcomes = ingest_all(world, ctx, load_example("calls/inbound-answered.json"))
    assert outcomes == ["stored", "stored", "stored"]
    event = only_event(world, "c-2026-11-23-0001")
    assert event["customer_number"] == "10001"
    assert event["contact"] == "Matti Virtanen"
    assert event["seller"] == "anna"
    assert event["category"] == "crm_event"
    assert event["status"] == "completed"
    assert event["duration_s"] == 448
    assert event["body"] == "Kysyi huoltosopimuksen jatkamisesta, lähetetään tarjous."


def test_every_order_and_duplicate_gives_the_same_event(world: Session, ctx: StageContext) -> None:
    updates = load_example("calls/inbound-answered.json")
    seen = set()
    for n, order in enumerate(itertools.permutations(updates)):
        call_id = f"perm-{n}"
        shuffled = [{**m, "call_id": call_id} for m in order]
        deliveries = shuffled + random.Random(n).sample(shuffled, 2)  # some arrive twice
        ingest_all(world, ctx, deliveries)
        event = only_event(world, call_id)
        seen.add(
            (
                event["status"],
                event["duration_s"],
                event["occurred_at"],
                event["body"],
                event["contact"],
            )
        )
    assert len(seen) == 1


def test_redelivery_is_a_duplicate(world: Session, ctx: StageContext) -> None:
    message = load_example("calls/inbound-answered.json")[0]
    assert ingest_call(world, ctx, message).outcome == "stored"
    assert ingest_call(world, ctx, message).outcome == "duplicate"


def test_missed_call_on_shared_number_is_ambiguous_with_a_follow_up(
    world: Session, ctx: StageContext
) -> None:
    ingest_all(world, ctx, load_example("calls/missed-from-switchboard.json"))
    event = only_event(world, "c-2026-11-24-0042")
    assert event["customer_number"] == "10002"
    assert event["link_state"] == "ambiguous"
    assert {c["name"] for c in event["candidates"]} == {"Jussi Mäkinen", "Sanna Heikkinen"}
    assert event["contact"] is None
    follow_up = world.scalar(select(FollowUp).where(FollowUp.event_id == event["id"]))
    assert follow_up is not None and follow_up.state == "open"


def test_outbound_sales_action(world: Session, ctx: StageContext) -> None:
    ingest_all(world, ctx, load_example("calls/outbound-sales-action.json"))
    event = only_event(world, "c-2026-11-25-0107")
    assert (event["category"], event["class"], event["type"]) == (
        "sales_action",
        "sales",
        "sales_action",
    )
    assert event["properties"] == ["commercial"]
    assert event["contact"] == "Liisa Korhonen"
    assert event["seller"] == "anna"


def test_late_ringing_never_overwrites_completed_and_empty_never_wipes(
    world: Session, ctx: StageContext
) -> None:
    base = {
        "schema": "crm.call/1",
        "source_system": "pbx",
        "call_id": "late-1",
        "direction": "inbound",
    }
    ingest_call(
        world,
        ctx,
        {**base, "status": "completed", "from": "040 123 4567", "duration_s": 30, "agent": "201"},
    )
    ingest_call(
        world, ctx, {**base, "status": "ringing", "started_at": "2026-11-23T10:00:00+02:00"}
    )
    ingest_call(world, ctx, {**base, "status": "weird-provider-status"})
    event = only_event(world, "late-1")
    assert event["status"] == "completed"
    assert event["contact"] == "Matti Virtanen"  # the number from the first update survives
    assert event["duration_s"] == 30
    assert "weird-provider-status" in event["match_note"] or "weird-provider-status" in str(
        world.scalar(select(CrmEvent.details).where(CrmEvent.source_id == "late-1"))
    )
