"""Visits updated, reordered and cancelled: one event per visit id whose counts follow it."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.ledger import InboundMessage
from tasks.context import StageContext
from tasks.ingest.party import ingest_party
from tasks.ingest.visit import ingest_visit
from tasks.refresh import refresh_seller
from tests.conftest import load_example
from tests.master_data import another_delivery, contact, event_by_source, staff_id, tally

VISIT_ID = "v-2026-11-24-anna-01"
#: A 1x1 PNG: the second photo of the visit.
SECOND_PHOTO = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAE"
    "hQGAhKmMIQAAAABJRU5ErkJggg=="
)


def visit(**changes: Any) -> dict[str, Any]:
    return {**load_example("visits/visit-with-memo.json"), **changes}


def current(db: Session) -> dict[str, Any]:
    db.expire_all()
    return event_by_source(db, "visit", VISIT_ID)


def counts(db: Session, ctx: StageContext, username: str) -> dict[str, int]:
    seller = staff_id(db, username)
    refresh_seller(db, ctx, seller)
    periods = ("2026-W48", "2026-W49", "2026-11", "2026-12")
    return {p: n for p in periods if (n := tally(db, seller, "customer_visit", p))}


def test_a_visit_updated_twice_and_cancelled(world: Session, ctx: StageContext) -> None:
    first = ingest_visit(world, ctx, visit(updated_at="2026-11-24T11:30:00+02:00"))
    assert first.outcome == "stored"
    assert counts(world, ctx, "anna") == {"2026-W48": 1, "2026-11": 1}

    # Update 1: a new memo, one more photo, a corrected time (next week and month).
    original = visit()
    second = ingest_visit(
        world,
        another_delivery(ctx),
        visit(
            started_at="2026-12-01T09:00:00+02:00",
            ended_at="2026-12-01T10:00:00+02:00",
            memo="Korjattu: käynti oli tiistaina. Tarjous lähtee perjantaina.",
            attachments=[
                *original["attachments"],
                {"filename": "kilpi.png", "media_type": "image/png", "content_b64": SECOND_PHOTO},
            ],
            updated_at="2026-11-30T08:00:00+02:00",
        ),
    )
    assert (second.outcome, second.event_id) == ("stored", first.event_id)
    event = current(world)
    assert event["occurred_at"] == "2026-12-01T07:00:00+00:00"
    assert event["body"].startswith("Korjattu")
    photos = sorted(d["filename"] for d in event["documents"] if d["role"] == "photo")
    assert photos == ["kilpi.png", "konehalli.png"]
    memos = [d for d in event["documents"] if d["role"] == "memo"]
    assert [m["sha256"] for m in memos] == [
        hashlib.sha256(event["body"].encode("utf-8")).hexdigest()
    ]
    assert counts(world, ctx, "anna") == {"2026-W49": 1, "2026-12": 1}

    # Update 2: another seller made the visit, and mikko is no longer among the attendees.
    third = ingest_visit(
        world,
        another_delivery(ctx),
        visit(
            seller="mikko",
            attendees=["mikko", "Liisa Korhonen"],
            started_at="2026-12-01T09:00:00+02:00",
            ended_at=None,
            updated_at="2026-11-30T09:00:00+02:00",
        ),
    )
    assert third.sellers_to_refresh == {staff_id(world, "anna"), staff_id(world, "mikko")}
    event = current(world)
    assert event["seller"] == "mikko"
    assert event["staff"] == ["mikko"]  # anna no longer made it, and no longer attended
    assert event["contacts"] == ["Matti Virtanen", "Liisa Korhonen"]
    assert counts(world, ctx, "anna") == {}
    assert counts(world, ctx, "mikko") == {"2026-W49": 1, "2026-12": 1}

    # The cancellation: the event stays, marked cancelled, and no longer counts.
    cancelled = ingest_visit(
        world,
        another_delivery(ctx),
        visit(
            seller="mikko",
            started_at="2026-12-01T09:00:00+02:00",
            ended_at=None,
            cancelled=True,
            updated_at="2026-11-30T10:00:00+02:00",
        ),
    )
    assert cancelled.outcome == "stored"
    event = current(world)
    assert (event["status"], event["cancelled"]) == ("cancelled", True)
    assert counts(world, ctx, "mikko") == {}
    assert counts(world, ctx, "anna") == {}


def test_an_older_update_never_overwrites_a_newer_one(world: Session, ctx: StageContext) -> None:
    newer = visit(memo="Uusin muistio.", updated_at="2026-11-24T15:00:00+02:00")
    older = visit(
        memo="Vanha muistio.",
        started_at="2026-11-20T10:00:00+02:00",
        ended_at=None,
        updated_at="2026-11-24T12:00:00+02:00",
    )
    assert ingest_visit(world, ctx, newer).outcome == "stored"
    late = ingest_visit(world, another_delivery(ctx), older)
    assert late.outcome == "outdated"
    assert "older than the applied version" in late.detail
    assert late.sellers_to_refresh == set()
    event = current(world)
    assert event["body"] == "Uusin muistio."
    assert event["occurred_at"] == "2026-11-24T08:00:00+00:00"
    # The outdated message is still kept in the ledger, tied to the visit's event.
    kept = world.scalars(
        select(InboundMessage.payload).where(InboundMessage.event_id == late.event_id)
    ).all()
    assert any(p.get("memo") == "Vanha muistio." for p in kept)

    # A cancellation older than the version shown does not cancel it either.
    stale_cancel = visit(cancelled=True, updated_at="2026-11-24T14:00:00+02:00")
    assert ingest_visit(world, another_delivery(ctx), stale_cancel).outcome == "outdated"
    assert current(world)["cancelled"] is False
    # A later one does; the same time as the applied version is applied too (last one wins).
    same_time = visit(memo="Sama versio, korjattu.", updated_at="2026-11-24T15:00:00+02:00")
    assert ingest_visit(world, another_delivery(ctx), same_time).outcome == "stored"
    assert current(world)["body"] == "Sama versio, korjattu."


def test_updates_without_updated_at_apply_in_arrival_order(
    world: Session, ctx: StageContext
) -> None:
    ingest_visit(world, ctx, visit(memo="Ensimmäinen.", updated_at="2026-11-24T15:00:00+02:00"))
    # No version: the app does not say, so the message that arrives last wins.
    assert ingest_visit(world, another_delivery(ctx), visit(memo="Toinen.")).outcome == "stored"
    assert current(world)["body"] == "Toinen."


def test_attendees_staff_are_participants_and_customer_people_are_contacts(
    world: Session, ctx: StageContext
) -> None:
    ingest_party(
        world,
        ctx,
        contact(
            "10001",
            "Pekka Pohjola",
            email="pekka.pohjola@pohjolankone.fi",
            emails=["pekka@pohjola.example"],
        ),
    )
    result = ingest_visit(
        world,
        ctx,
        visit(
            contacts=[],
            attendees=[
                "mikko.nieminen@myyntitalo.fi",  # staff by address
                "PEKKA@pohjola.example",  # a contact's further address
                "Liisa Korhonen",  # a contact by name
                "tuntematon@example.com",
            ],
        ),
    )
    event = current(world)
    assert event["staff"] == ["anna", "mikko"]
    assert event["contacts"] == ["Pekka Pohjola", "Liisa Korhonen"]
    assert event["contact"] == "Pekka Pohjola"
    assert "attendee 'tuntematon@example.com' not found" in event["match_note"]
    assert result.outcome == "stored"


def test_visit_without_a_known_seller_goes_to_the_customers_responsible_seller(
    world: Session, ctx: StageContext
) -> None:
    ingest_visit(world, ctx, visit(seller="kesäharjoittelija"))
    event = current(world)
    assert event["seller"] == "anna"
    assert "seller 'kesäharjoittelija' is not a known staff member" in event["match_note"]


@pytest.mark.parametrize("updated_at", ["2026-11-24T15:00:00", "2026-11-24T13:00:00Z"])
def test_updated_at_without_offset_is_read_in_the_configured_zone(
    world: Session, ctx: StageContext, updated_at: str
) -> None:
    # 15:00 in Helsinki is 13:00 UTC: both say the same moment, so the second applies.
    ingest_visit(world, ctx, visit(memo="A", updated_at="2026-11-24T15:00:00+02:00"))
    assert ingest_visit(
        world, another_delivery(ctx), visit(memo="B", updated_at=updated_at)
    ).outcome == ("stored")
    assert current(world)["body"] == "B"


def test_second_photo_is_a_real_png() -> None:
    assert base64.b64decode(SECOND_PHOTO).startswith(b"\x89PNG")


def test_where_a_visit_took_place_is_shown(world: Session, ctx: StageContext) -> None:
    """The visit's location is in the event's JSON (events, history, the API, the screens) and
    beside its subject in the command line's tables; an update that moves it moves it there."""
    from models.events import CrmEvent
    from tasks.views import events_json
    from workers.render import subject_cell

    ingest_visit(world, ctx, visit(updated_at="2026-11-24T11:30:00+02:00"))
    ingest_visit(
        world,
        ctx,
        visit(updated_at="2026-11-24T12:30:00+02:00", location="Pohjolan Kone Oy, Tampere"),
    )
    event = world.scalar(select(CrmEvent).where(CrmEvent.source_id == VISIT_ID))
    assert event is not None
    [shown] = events_json(world, [event])
    assert shown["location"] == "Pohjolan Kone Oy, Tampere"
    assert subject_cell(shown).endswith(" · Pohjolan Kone Oy, Tampere")
