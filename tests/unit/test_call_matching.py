"""Matching a call's outside number: contacts, customers, our own side, unknown numbers."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.events import CrmEvent, FollowUp
from models.parties import Lead
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.ingest.party import ingest_party
from tasks.match import find_staff, find_staff_many
from tasks.views import events_json

SWITCHBOARD = "+358 9 111 000"


def call(call_id: str, **fields: Any) -> dict[str, Any]:
    return {"schema": "crm.call/1", "source_system": "pbx-test", "call_id": call_id, **fields}


def event_of(db: Session, call_id: str) -> dict[str, Any]:
    events = db.scalars(select(CrmEvent).where(CrmEvent.source_id == call_id)).all()
    assert len(events) == 1
    return events_json(db, list(events))[0]


def party(db: Session, ctx: StageContext, **fields: Any) -> None:
    ingest_party(db, ctx, {"schema": "crm.party/1", "source_system": "erp", **fields})


def test_a_switchboard_number_shared_by_three_contacts_is_one_ambiguous_event(
    world: Session, ctx: StageContext
) -> None:
    party(
        world,
        ctx,
        kind="customer",
        customer_number="20001",
        name="Savon Sellu Oy",
        phones=["017 555 1000"],
        seller="mikko",
    )
    for name in ("Aino Aalto", "Eero Eskola", "Outi Oja"):
        party(
            world,
            ctx,
            kind="contact",
            customer_number="20001",
            name=name,
            email=f"{name.split()[0].lower()}@savonsellu.fi",
            phones=["+358 17 555 1000"],
        )
    ingest_call(
        world,
        ctx,
        call(
            "three",
            status="missed",
            direction="inbound",
            **{"from": "017 5551000", "to": SWITCHBOARD},
        ),
    )
    assert world.scalar(select(func.count()).where(CrmEvent.source_id == "three")) == 1
    event = event_of(world, "three")
    assert event["customer_number"] == "20001"
    assert event["contact"] is None
    assert event["link_state"] == "ambiguous"
    assert sorted(c["name"] for c in event["candidates"]) == [
        "Aino Aalto",
        "Eero Eskola",
        "Outi Oja",
    ]
    assert "shared by 3 contacts" in event["match_note"]
    # Nobody answered at the switchboard: the customer's responsible seller gets the call and
    # the follow-up.
    assert event["seller"] == "mikko"
    assert world.scalar(select(FollowUp.state).where(FollowUp.event_id == event["id"])) == "open"


def test_a_customer_number_of_no_contact_links_the_customer(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(
        world,
        ctx,
        call("company", status="completed", direction="inbound", **{"from": "+358142601000"}),
    )
    event = event_of(world, "company")
    assert (event["customer_number"], event["contact"], event["link_state"]) == (
        "10001",
        None,
        "linked",
    )
    assert event["seller"] == "anna"  # the customer's responsible seller


def test_numbers_match_in_any_notation_and_the_raw_string_is_kept(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(
        world,
        ctx,
        call("notation", status="ringing", direction="inbound", **{"from": "+35840-1234567"}),
    )
    event = event_of(world, "notation")
    assert event["contact"] == "Matti Virtanen"
    assert event["subject"] == "Inbound call from +35840-1234567 (ringing)"
    details = world.scalar(select(CrmEvent.details).where(CrmEvent.source_id == "notation"))
    assert details is not None
    assert details["from"] == "+35840-1234567"
    assert details["outside_number"] == "+358401234567"


def test_our_own_number_as_the_caller_is_never_a_customer_nor_a_lead(
    world: Session, ctx: StageContext
) -> None:
    leads_on = dataclasses.replace(
        ctx, settings=dataclasses.replace(ctx.settings, lead_from_unknown_calls=True)
    )
    ingest_call(
        world,
        leads_on,
        call(
            "own",
            status="missed",
            direction="inbound",
            agent="202",
            **{"from": SWITCHBOARD, "to": "202"},
        ),
    )
    event = event_of(world, "own")
    assert event["customer_number"] is None
    assert event["link_state"] == "internal"
    assert event["category"] == "crm_event"
    assert event["subject"].startswith("Internal call")
    assert "our own number" in event["match_note"]
    assert world.scalar(select(func.count()).select_from(Lead)) == 0
    assert world.scalar(select(func.count()).where(FollowUp.event_id == event["id"])) == 0


def test_an_extension_only_number_is_staff_side(world: Session, ctx: StageContext) -> None:
    ingest_call(
        world,
        ctx,
        call("ext", status="completed", direction="inbound", **{"from": "202", "to": "201"}),
    )
    event = event_of(world, "ext")
    assert event["link_state"] == "internal"
    assert event["customer_number"] is None
    assert event["seller"] == "anna"  # the extension that took the call
    assert event["staff"] == ["anna", "mikko"]
    # An unknown extension is still our side, never a customer.
    ingest_call(
        world,
        ctx,
        call("ext2", status="missed", direction="inbound", **{"from": "299", "to": SWITCHBOARD}),
    )
    assert event_of(world, "ext2")["link_state"] == "internal"


def test_a_staff_members_mobile_is_our_side(world: Session, ctx: StageContext) -> None:
    ingest_call(
        world,
        ctx,
        call("mobile", status="completed", direction="inbound", **{"from": "+358503334444"}),
    )
    event = event_of(world, "mobile")
    assert event["link_state"] == "internal"
    assert event["seller"] == "mikko"


def test_an_unknown_number_goes_to_triage(world: Session, ctx: StageContext) -> None:
    ingest_call(
        world,
        ctx,
        call("unknown", status="completed", direction="inbound", **{"from": "+358 40 999 8888"}),
    )
    event = event_of(world, "unknown")
    assert (event["customer_number"], event["link_state"]) == (None, "unlinked")
    assert "matches no contact or customer" in event["match_note"]


def test_a_number_of_contacts_at_two_customers_names_no_customer(
    world: Session, ctx: StageContext
) -> None:
    party(
        world,
        ctx,
        kind="contact",
        customer_number="10002",
        name="Matti Virtanen (JS)",
        email="matti@jsahko.fi",
        phones=["040 123 4567"],
    )
    ingest_call(
        world, ctx, call("two", status="completed", direction="inbound", **{"from": "0401234567"})
    )
    event = event_of(world, "two")
    assert event["link_state"] == "ambiguous"
    assert event["customer_number"] is None
    assert len(event["candidates"]) == 2


def test_without_a_direction_the_call_goes_from_our_side_out(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(
        world,
        ctx,
        call("nodir", status="completed", **{"from": "201", "to": "+358 44 765 4321"}),
    )
    event = event_of(world, "nodir")
    assert (event["direction"], event["contact"], event["seller"]) == (
        "outbound",
        "Liisa Korhonen",
        "anna",
    )
    assert "no direction given: outbound" in event["match_note"]


def test_customer_number_from_the_message_wins(world: Session, ctx: StageContext) -> None:
    ingest_call(
        world,
        ctx,
        call(
            "given",
            status="completed",
            direction="inbound",
            customer_number="10002",
            **{"from": "+358 40 999 7777"},
        ),
    )
    event = event_of(world, "given")
    assert (event["customer_number"], event["link_state"], event["seller"]) == (
        "10002",
        "linked",
        "mikko",
    )


def test_staff_looked_up_together_are_those_found_one_by_one(
    world: Session, ctx: StageContext
) -> None:
    """A call asks for its agent and its inside number in one query: the same answers, by the
    same precedence (username, email, extension, phone; the lowest id), as one at a time."""
    # Someone whose username is another's extension, and an address in capitals.
    party(world, ctx, kind="staff", username="202", name="Extension Named", extension="299")
    party(world, ctx, kind="staff", username="pia", name="Pia P", email="Pia.P@Myyntitalo.fi")
    references = [
        "anna",
        "201",
        "202",
        "299",
        "+358 50 111 2222",
        "050 333 4444",
        "0505556666",
        "ANNA.LAHTINEN@myyntitalo.fi",
        "pia.p@myyntitalo.fi",
        " mikko ",
        SWITCHBOARD,
        "nobody",
        "",
        "999",
    ]
    settings = ctx.settings
    together = find_staff_many(world, references, settings)
    one_by_one = {r: find_staff(world, r, settings) for r in references if r}
    assert together == one_by_one
    assert together["202"] is not None and together["202"].name == "Extension Named"
    assert together["050 333 4444"] is not None and together["050 333 4444"].username == "mikko"
    assert together["nobody"] is None
