"""Follow-ups: a missed call from a customer waits for a call back, in whatever order updates
arrive."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent, FollowUp
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.views import seller_cards, staff_by_username

SWITCHBOARD = "+358 9 111 000"
MATTI = "040 123 4567"


def missed(call_id: str, at: str, number: str = MATTI) -> dict[str, Any]:
    return {
        "schema": "crm.call/1",
        "source_system": "pbx-test",
        "call_id": call_id,
        "status": "missed",
        "direction": "inbound",
        "from": number,
        "to": SWITCHBOARD,
        "started_at": at,
    }


def callback(call_id: str, at: str, **fields: Any) -> dict[str, Any]:
    return {
        "schema": "crm.call/1",
        "source_system": "pbx-test",
        "call_id": call_id,
        "status": "completed",
        "direction": "outbound",
        "from": "201",
        "to": "+358 44 765 4321",  # Liisa Korhonen, also of customer 10001
        "agent": "anna",
        "started_at": at,
        **fields,
    }


def follow_up(db: Session, call_id: str) -> FollowUp | None:
    event_id = db.scalar(select(CrmEvent.id).where(CrmEvent.source_id == call_id))
    return db.scalar(select(FollowUp).where(FollowUp.event_id == event_id))


def event_id(db: Session, call_id: str) -> int | None:
    return db.scalar(select(CrmEvent.id).where(CrmEvent.source_id == call_id))


def test_a_missed_call_opens_a_follow_up_on_the_sellers_view(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(world, ctx, missed("m1", "2026-11-23T10:00:00+02:00"))
    opened = follow_up(world, "m1")
    assert opened is not None and opened.state == "open"
    anna = staff_by_username(world, "anna")  # the responsible seller of customer 10001
    assert anna is not None and opened.seller_id == anna.id
    cards = seller_cards(world, anna)
    listed = [f for card in cards for f in card["follow_ups"]]
    assert [f["event_id"] for f in listed] == [event_id(world, "m1")]
    assert listed[0]["reason"].startswith("missed call: call back")


def test_a_later_outbound_call_to_the_customer_closes_it(world: Session, ctx: StageContext) -> None:
    ingest_call(world, ctx, missed("m2", "2026-11-23T10:00:00+02:00"))
    ingest_call(world, ctx, callback("cb2", "2026-11-23T11:30:00+02:00"))
    closed = follow_up(world, "m2")
    assert closed is not None
    assert (closed.state, closed.closed_by_event_id) == ("closed", event_id(world, "cb2"))
    anna = staff_by_username(world, "anna")
    assert anna is not None
    assert not [f for card in seller_cards(world, anna) for f in card["follow_ups"]]


def test_a_later_answered_inbound_call_closes_it(world: Session, ctx: StageContext) -> None:
    ingest_call(world, ctx, missed("m3", "2026-11-23T10:00:00+02:00"))
    answered = {**missed("in3", "2026-11-23T12:00:00+02:00"), "status": "answered"}
    ingest_call(world, ctx, answered)
    closed = follow_up(world, "m3")
    assert closed is not None and closed.state == "closed"
    assert closed.closed_by_event_id == event_id(world, "in3")


def test_a_callback_made_before_the_missed_call_does_not_close_it_in_either_arrival_order(
    world: Session, ctx: StageContext
) -> None:
    # Arrives first, happened first.
    ingest_call(world, ctx, callback("cb4", "2026-11-23T09:00:00+02:00"))
    ingest_call(world, ctx, missed("m4", "2026-11-23T10:00:00+02:00"))
    opened = follow_up(world, "m4")
    assert opened is not None and opened.state == "open"
    # A callback that happened before, arriving after the missed call.
    ingest_call(world, ctx, missed("m5", "2026-11-24T10:00:00+02:00"))
    ingest_call(world, ctx, callback("cb5", "2026-11-24T08:00:00+02:00"))
    opened = follow_up(world, "m5")
    assert opened is not None and opened.state == "open"


def test_a_callback_that_arrives_before_the_missed_call_still_closes_it(
    world: Session, ctx: StageContext
) -> None:
    # The PBX delivered the missed call's record late: the follow-up is born closed.
    ingest_call(world, ctx, callback("cb6", "2026-11-23T14:00:00+02:00"))
    ingest_call(world, ctx, missed("m6", "2026-11-23T13:00:00+02:00"))
    closed = follow_up(world, "m6")
    assert closed is not None
    assert (closed.state, closed.closed_by_event_id) == ("closed", event_id(world, "cb6"))


def test_the_first_callback_after_the_miss_is_the_one_that_closed_it(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(world, ctx, missed("m7", "2026-11-23T10:00:00+02:00"))
    ingest_call(world, ctx, callback("cb7-late", "2026-11-23T16:00:00+02:00"))
    ingest_call(world, ctx, callback("cb7-early", "2026-11-23T11:00:00+02:00"))
    closed = follow_up(world, "m7")
    assert closed is not None
    assert closed.closed_by_event_id == event_id(world, "cb7-early")


def test_a_missed_call_from_an_unknown_number_has_no_follow_up(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(world, ctx, missed("m8", "2026-11-23T10:00:00+02:00", number="+358 40 999 1111"))
    assert follow_up(world, "m8") is None


def test_a_callback_to_another_customer_does_not_close_it(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(world, ctx, missed("m9", "2026-11-23T10:00:00+02:00"))
    ingest_call(world, ctx, callback("cb9", "2026-11-23T11:00:00+02:00", to="+358 45 222 3333"))
    opened = follow_up(world, "m9")
    assert opened is not None and opened.state == "open"
