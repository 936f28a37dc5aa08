"""Master data: contacts with several addresses and numbers, deactivated staff."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.parties import Contact, ContactEmail, PartyPhone
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.ingest.email import ingest_email
from tasks.ingest.party import ingest_party
from tasks.ingest.visit import ingest_visit
from tasks.match import match_addresses, match_phone
from tasks.refresh import refresh_seller
from tests.conftest import load_example
from tests.master_data import (
    contact,
    email_message,
    event_json,
    inbound_call,
    party,
    raw_email,
    staff_id,
    tally,
)

ANNA = {
    "username": "anna",
    "name": "Anna Lahtinen",
    "email": "anna.lahtinen@myyntitalo.fi",
    "phones": ["+358 50 111 2222"],
    "extension": "201",
    "manager": "helena",
}


def addresses_of(db: Session, name: str) -> list[str]:
    found = db.scalar(select(Contact).where(Contact.name == name))
    assert found is not None
    return list(
        db.scalars(
            select(ContactEmail.email)
            .where(ContactEmail.contact_id == found.id)
            .order_by(ContactEmail.email)
        )
    )


def test_a_contact_has_several_addresses_and_numbers(world: Session, ctx: StageContext) -> None:
    ingest_party(
        world,
        ctx,
        contact(
            "10001",
            "Matti Virtanen",
            email="Matti.Virtanen@pohjolankone.fi",
            emails=["matti@virtanen.example", "huolto@pohjolankone.fi"],
            phones=["040 123 4567", "+358 14 260 1011"],
        ),
    )
    assert addresses_of(world, "Matti Virtanen") == [
        "huolto@pohjolankone.fi",
        "matti.virtanen@pohjolankone.fi",
        "matti@virtanen.example",
    ]
    matti = world.scalar(select(Contact).where(Contact.name == "Matti Virtanen"))
    assert matti is not None and matti.email == "matti.virtanen@pohjolankone.fi"  # the primary
    for address in ("MATTI@virtanen.example", "huolto@pohjolankone.fi"):
        found = match_addresses(world, [address], ctx.settings)
        assert (found.contact_id, found.state) == (matti.id, "linked")
    for number in ("040 123 4567", "014 260 1011"):
        assert match_phone(world, number, ctx.settings).contact_id == matti.id
    # The whole record: an address left out no longer matches.
    ingest_party(
        world,
        ctx,
        contact("10001", "Matti Virtanen", email="matti.virtanen@pohjolankone.fi"),
    )
    assert addresses_of(world, "Matti Virtanen") == ["matti.virtanen@pohjolankone.fi"]
    dropped = match_addresses(world, ["matti@virtanen.example"], ctx.settings)
    assert dropped.contact_id is None
    assert world.scalars(select(PartyPhone).where(PartyPhone.contact_id == matti.id)).all() == []


def test_an_email_from_a_further_address_is_the_contacts(world: Session, ctx: StageContext) -> None:
    ingest_party(
        world,
        ctx,
        contact(
            "10002",
            "Sanna Heikkinen",
            email="sanna.heikkinen@jsahko.fi",
            emails=["sanna@heikkinen.example"],
        ),
    )
    raw = raw_email("sanna@heikkinen.example", "crm@myyntitalo.fi", "Lomalta", "loma@x.example")
    event = event_json(world, ingest_email(world, ctx, email_message(raw)).event_id)
    assert (event["customer_number"], event["contact"], event["seller"]) == (
        "10002",
        "Sanna Heikkinen",
        "mikko",
    )


def test_a_deactivated_staff_member_keeps_their_history(world: Session, ctx: StageContext) -> None:
    anna = staff_id(world, "anna")
    ingest_visit(world, ctx, load_example("visits/visit-with-memo.json"))
    answered = ingest_call(
        world, ctx, inbound_call("before", "040 123 4567", "2026-11-24T12:00:00+02:00")
    )
    assert event_json(world, answered.event_id)["seller"] == "anna"  # responsible seller

    result = ingest_party(world, ctx, party("staff", **ANNA, active=False))
    assert result.detail == "staff anna (deactivated)"
    # Her events stay hers and keep counting in their periods.
    refresh_seller(world, ctx, anna)
    assert tally(world, anna, "customer_visit", "2026-W48") == 1
    assert tally(world, anna, "crm_event", "2026-W48") == 1
    assert event_json(world, answered.event_id)["seller"] == "anna"

    # New events of her customer that no one on the staff handled are not assigned to her.
    later = ingest_call(
        world, ctx, inbound_call("after", "040 123 4567", "2026-11-25T12:00:00+02:00")
    )
    event = event_json(world, later.event_id)
    assert (event["customer_number"], event["seller"]) == ("10001", None)
    raw = raw_email("matti.virtanen@pohjolankone.fi", "crm@myyntitalo.fi", "Kysely", "k@pk.fi")
    mail = event_json(world, ingest_email(world, ctx, email_message(raw)).event_id)
    assert (mail["customer_number"], mail["seller"]) == ("10001", None)
    visit = {
        **load_example("visits/visit-with-memo.json"),
        "visit_id": "v-after",
        "seller": "kesäharjoittelija",
    }
    visited = event_json(world, ingest_visit(world, ctx, visit).event_id)
    assert visited["seller"] is None
    assert "responsible seller anna is deactivated: unassigned" in visited["match_note"]
    # But what she did herself is still hers: a late visit report of her own.
    own = {**load_example("visits/visit-with-memo.json"), "visit_id": "v-own"}
    assert event_json(world, ingest_visit(world, ctx, own).event_id)["seller"] == "anna"

    # Back at work: the rule assigns to her again.
    ingest_party(world, ctx, party("staff", **ANNA))
    again = ingest_call(world, ctx, inbound_call("back", "040 123 4567", "2026-11-26T12:00+02:00"))
    assert event_json(world, again.event_id)["seller"] == "anna"


def test_a_contact_of_an_unknown_customer_creates_a_placeholder_that_visits_link_to(
    world: Session, ctx: StageContext
) -> None:
    visit = {
        **load_example("visits/visit-with-memo.json"),
        "visit_id": "v-placeholder",
        "customer_number": "30003",
        "contacts": [],
        "attendees": [],
    }
    stored = ingest_visit(world, ctx, visit)
    assert event_json(world, stored.event_id)["link_state"] == "unlinked"
    # The ERP sends the contact before its customer: the placeholder customer appears.
    result = ingest_party(world, ctx, contact("30003", "Outi Uusi", email="outi@uusi.example"))
    assert f"re-linked 1 event(s): {stored.event_id}" in result.detail
    assert event_json(world, stored.event_id)["customer_number"] == "30003"
    ingest_party(world, ctx, party("customer", customer_number="30003", name="Uusi Oy"))
    assert event_json(world, stored.event_id)["seller"] == "anna"  # made the visit herself
