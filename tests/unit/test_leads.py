"""Leads: an unknown party's inbound call or email becomes a lead, never twice for one party."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.parties import Lead
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.ingest.email import ingest_email
from tasks.ingest.party import ingest_party
from tests.master_data import (
    another_delivery,
    contact,
    email_message,
    event_json,
    inbound_call,
    raw_email,
)

UNKNOWN = "+358 40 777 6655"
UNKNOWN_E164 = "+358407776655"


def leads(db: Session) -> list[tuple[str, str, int | None]]:
    return [
        (lead.kind, lead.value, lead.event_id)
        for lead in db.scalars(select(Lead).order_by(Lead.id))
    ]


def test_two_unknown_calls_from_the_same_number_give_one_lead(
    world: Session, ctx: StageContext
) -> None:
    on = another_delivery(ctx, lead_from_unknown_calls=True)
    first = ingest_call(world, on, inbound_call("lead-1", UNKNOWN, "2026-11-24T09:00:00+02:00"))
    second = ingest_call(
        world, on, inbound_call("lead-2", "040 777 6655", "2026-11-25T09:00:00+02:00")
    )
    lead = event_json(world, first.event_id)
    assert (lead["category"], lead["class"], lead["type"]) == ("lead", "marketing", "lead")
    assert f"unknown party {UNKNOWN_E164}: first contact" in lead["classification_note"]
    again = event_json(world, second.event_id)
    assert again["category"] == "crm_event"
    assert (
        f"not a second lead: {UNKNOWN_E164} is already lead event #{first.event_id}"
        in (again["classification_note"])
    )
    assert leads(world) == [("phone", UNKNOWN_E164, first.event_id)]


def test_later_updates_of_the_lead_call_keep_it_a_lead(world: Session, ctx: StageContext) -> None:
    on = another_delivery(ctx, lead_from_unknown_calls=True)
    ringing = inbound_call("lead-call", UNKNOWN, "2026-11-24T09:00:00+02:00", status="ringing")
    first = ingest_call(world, on, ringing)
    ingest_call(world, on, {**ringing, "status": "completed", "note": "Kysyi hintoja."})
    event = event_json(world, first.event_id)
    assert (event["category"], event["status"]) == ("lead", "completed")
    assert len(leads(world)) == 1
    # The agent classifies the call afterwards: the message's own category wins.
    ingest_call(world, on, {**ringing, "status": "completed", "category": "sales_action"})
    assert event_json(world, first.event_id)["category"] == "sales_action"


def test_unknown_calls_are_no_leads_by_default(world: Session, ctx: StageContext) -> None:
    result = ingest_call(world, ctx, inbound_call("plain", UNKNOWN, "2026-11-24T09:00:00+02:00"))
    assert event_json(world, result.event_id)["category"] == "crm_event"
    assert leads(world) == []


def test_known_parties_outbound_calls_and_the_messages_own_category_make_no_lead(
    world: Session, ctx: StageContext
) -> None:
    on = another_delivery(ctx, lead_from_unknown_calls=True)
    known = ingest_call(
        world, on, inbound_call("known", "040 123 4567", "2026-11-24T09:00:00+02:00")
    )
    outbound = ingest_call(
        world,
        on,
        inbound_call(
            "out",
            "201",
            "2026-11-24T10:00:00+02:00",
            direction="outbound",
            to=UNKNOWN,
            agent="anna",
        ),
    )
    chosen = ingest_call(
        world,
        on,
        inbound_call("chosen", UNKNOWN, "2026-11-24T11:00:00+02:00", category="sales_action"),
    )
    assert event_json(world, known.event_id)["category"] == "crm_event"
    assert event_json(world, outbound.event_id)["category"] == "crm_event"
    assert event_json(world, chosen.event_id)["category"] == "sales_action"
    assert leads(world) == []


def test_emails_to_the_lead_address_give_one_lead_per_sender(
    world: Session, ctx: StageContext
) -> None:
    def to_lead_address(message_id: str, sender: str = "Oona <oona@gmail.com>") -> int:
        raw = raw_email(sender, "crm+lead@myyntitalo.fi", "Tarjouspyyntö", message_id)
        result = ingest_email(world, ctx, email_message(raw, ["crm+lead@myyntitalo.fi"]))
        assert result.outcome == "stored" and result.event_id is not None
        return result.event_id

    first = to_lead_address("lead-1@gmail.com")
    second = to_lead_address("lead-2@gmail.com", "OONA@gmail.com")
    other = to_lead_address("lead-3@example.fi", "pertti@example.fi")
    assert event_json(world, first)["category"] == "lead"
    repeat = event_json(world, second)
    assert repeat["category"] == "crm_event"
    assert (
        f"not a second lead: oona@gmail.com is already lead event #{first}"
        in (repeat["classification_note"])
    )
    assert event_json(world, other)["category"] == "lead"
    assert leads(world) == [
        ("email", "oona@gmail.com", first),
        ("email", "pertti@example.fi", other),
    ]


def test_a_known_contact_writing_to_the_lead_address_is_classified_but_no_party_lead(
    world: Session, ctx: StageContext
) -> None:
    raw = raw_email(
        "matti.virtanen@pohjolankone.fi", "crm+lead@myyntitalo.fi", "Uusi hanke", "hanke@pk.fi"
    )
    result = ingest_email(world, ctx, email_message(raw, ["crm+lead@myyntitalo.fi"]))
    event = event_json(world, result.event_id)
    assert (event["category"], event["customer_number"]) == ("lead", "10001")
    assert leads(world) == []


def test_unknown_senders_to_the_crm_address_become_leads_when_configured(
    world: Session, ctx: StageContext
) -> None:
    raw = raw_email("pertti@example.fi", "crm@myyntitalo.fi", "Kysely", "kysely@example.fi")
    off = ingest_email(world, ctx, email_message(raw))
    assert event_json(world, off.event_id)["category"] == "crm_event"
    on = another_delivery(ctx, lead_from_unknown_emails=True)
    raw2 = raw_email("pertti@example.fi", "crm@myyntitalo.fi", "Kysely 2", "kysely2@example.fi")
    lead = ingest_email(world, on, email_message(raw2))
    assert event_json(world, lead.event_id)["category"] == "lead"
    assert leads(world) == [("email", "pertti@example.fi", lead.event_id)]


def test_a_lead_whose_party_becomes_a_contact_is_linked_and_stays_a_lead(
    world: Session, ctx: StageContext
) -> None:
    on = another_delivery(ctx, lead_from_unknown_calls=True)
    first = ingest_call(world, on, inbound_call("convert", UNKNOWN, "2026-11-24T09:00:00+02:00"))
    result = ingest_party(world, on, contact("10002", "Uusi Asiakas", phones=[UNKNOWN]))
    assert f"re-linked 1 event(s): {first.event_id}" in result.detail
    event = event_json(world, first.event_id)
    assert (event["category"], event["customer_number"], event["seller"]) == (
        "lead",
        "10002",
        "mikko",
    )
    # Now known: a further call from the number is an ordinary event, not a lead.
    later = ingest_call(world, on, inbound_call("after", UNKNOWN, "2026-11-26T09:00:00+02:00"))
    assert event_json(world, later.event_id)["category"] == "crm_event"
