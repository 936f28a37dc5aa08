"""The shared Twilio and Asterisk samples through their adapters and the call stage, with the
outcomes of examples/SAMPLES.md."""

from __future__ import annotations

import itertools
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent, FollowUp
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.telephony.adapters import CdrContext, asterisk_cdr_to_call, read_cdr_csv, twilio_to_call
from tasks.views import events_json
from tests.conftest import EXAMPLES


def events_of(db: Session, call_id: str) -> list[dict[str, Any]]:
    events = db.scalars(select(CrmEvent).where(CrmEvent.source_id == call_id)).all()
    return events_json(db, list(events))


def test_twilio_callbacks_in_every_order_give_one_completed_event(
    world: Session, ctx: StageContext
) -> None:
    callbacks = json.loads((EXAMPLES / "calls/twilio-status-callbacks.json").read_text())
    seen = set()
    for order in itertools.permutations(callbacks):
        savepoint = world.begin_nested()
        for callback in order:
            assert ingest_call(world, ctx, twilio_to_call(callback)).outcome == "stored"
        [event] = events_of(world, "CA1f0d2c3b4a5968778695a4b3c2d1e0f9")
        seen.add(json.dumps({k: v for k, v in event.items() if k != "id"}, sort_keys=True))
        savepoint.rollback()
    assert len(seen) == 1
    event = json.loads(seen.pop())
    assert event["status"] == "completed"
    assert event["duration_s"] == 398
    assert event["contact"] == "Liisa Korhonen"
    assert event["customer_number"] == "10001"
    assert event["seller"] == "anna"  # no agent: the customer's responsible seller
    assert event["occurred_at"] == "2026-11-25T08:30:01+00:00"


def test_asterisk_cdrs(world: Session, ctx: StageContext) -> None:
    context = CdrContext(own_numbers=ctx.settings.own_numbers)
    text = (EXAMPLES / "calls/asterisk-cdr.csv").read_text()
    for row in read_cdr_csv(text):
        assert row.fields is not None
        assert (
            ingest_call(world, ctx, asterisk_cdr_to_call(row.fields, context)).outcome == "stored"
        )
    [answered] = events_of(world, "1764144300.161")
    assert answered["status"] == "completed"
    assert answered["contact"] == "Matti Virtanen"
    assert answered["customer_number"] == "10001"
    assert answered["seller"] == "mikko"  # extension 202 took it
    assert answered["duration_s"] == 280
    # The PBX writes local times without an offset: read in the configured zone, and noted.
    assert answered["occurred_at"] == "2026-11-26T08:05:00+00:00"
    assert "started_at had no UTC offset; read as Europe/Helsinki" in answered["match_note"]
    [unanswered] = events_of(world, "1764148800.170")
    assert unanswered["status"] == "missed"
    assert (unanswered["customer_number"], unanswered["link_state"]) == (None, "unlinked")
    assert world.scalar(select(FollowUp).where(FollowUp.event_id == unanswered["id"])) is None
