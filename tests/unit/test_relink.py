"""The automatic re-link: master data that arrives later explains earlier events."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent, FollowUp
from models.parties import EventPartyKey
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.ingest.email import ingest_email
from tasks.ingest.party import ingest_party
from tasks.ingest.visit import ingest_visit
from tasks.refresh import refresh_seller
from tasks.triage import link_by_hand
from tests.conftest import load_example
from tests.master_data import (
    contact,
    email_message,
    event_by_source,
    event_json,
    inbound_call,
    party,
    raw_email,
    staff_id,
    tally,
)

NEW_NUMBER = "040 999 8888"
NEW_E164 = "+358409998888"


def three_unknown_calls(db: Session, ctx: StageContext) -> list[int]:
    ids = []
    for n, day in enumerate(("23", "24", "25"), start=1):
        result = ingest_call(
            db, ctx, inbound_call(f"unknown-{n}", NEW_NUMBER, f"2026-11-{day}T09:00:00+02:00")
        )
        assert result.outcome == "stored" and result.event_id is not None
        ids.append(result.event_id)
    return ids


def test_contact_gaining_the_number_of_three_unlinked_calls_links_and_counts_them(
    world: Session, ctx: StageContext
) -> None:
    anna = staff_id(world, "anna")
    ids = three_unknown_calls(world, ctx)
    for event_id in ids:
        event = event_json(world, event_id)
        assert (event["link_state"], event["customer_number"], event["seller"]) == (
            "unlinked",
            None,
            None,
        )
    refresh_seller(world, ctx, anna)
    assert tally(world, anna, "crm_event", "2026-W48") == 0

    # The ERP adds the number to a contact of 10001, whose responsible seller is anna.
    result = ingest_party(
        world,
        ctx,
        contact("10001", "Pekka Pohjola", email="pekka@pohjolankone.fi", phones=[NEW_NUMBER]),
    )
    assert result.outcome == "done"
    assert f"re-linked 3 event(s): {', '.join(map(str, ids))}" in result.detail
    assert result.sellers_to_refresh == {anna}
    for event_id in ids:
        event = event_json(world, event_id)
        assert event["link_state"] == "linked"
        assert event["customer_number"] == "10001"
        assert event["contact"] == "Pekka Pohjola"
        assert event["seller"] == "anna"
        assert event["category"] == "crm_event"
        assert "re-linked automatically" in event["match_note"]
    # They count: the refresh the party task requests after its commit recomputes the keys.
    refresh_seller(world, ctx, anna)
    assert tally(world, anna, "crm_event", "2026-W48") == 3
    assert tally(world, anna, "crm_event", "2026-11") == 3

    # Nothing left to re-link: the same message again changes nothing.
    again = ingest_party(
        world,
        StageContext(ctx.settings, task_id="another", task_name="test"),
        contact("10001", "Pekka Pohjola", email="pekka@pohjolankone.fi", phones=[NEW_NUMBER]),
    )
    assert "re-linked" not in again.detail


def test_an_agent_keeps_the_call_and_a_missed_call_gets_its_follow_up(
    world: Session, ctx: StageContext
) -> None:
    answered = ingest_call(
        world,
        ctx,
        inbound_call("agent-call", NEW_NUMBER, "2026-11-24T10:00:00+02:00", agent="mikko"),
    )
    missed = ingest_call(
        world,
        ctx,
        inbound_call(
            "missed-call", NEW_NUMBER, "2026-11-24T11:00:00+02:00", status="missed", duration_s=0
        ),
    )
    assert event_json(world, answered.event_id)["seller"] == "mikko"
    ingest_party(world, ctx, customer_with_phone("20001", NEW_NUMBER))
    linked = event_json(world, answered.event_id)
    # The seller is who handled the call, whoever the customer's responsible seller is.
    assert (linked["customer_number"], linked["seller"]) == ("20001", "mikko")
    assert linked["contact"] is None  # the customer's own number: no contact
    missed_event = event_json(world, missed.event_id)
    assert (missed_event["customer_number"], missed_event["seller"]) == ("20001", "anna")
    follow_up = world.scalar(select(FollowUp).where(FollowUp.event_id == missed.event_id))
    assert follow_up is not None and follow_up.state == "open"


def customer_with_phone(number: str, phone: str, seller: str = "anna") -> dict:
    return party(
        "customer",
        customer_number=number,
        name="Savon Puu Oy",
        email_domains=["savonpuu.fi"],
        phones=[phone],
        seller=seller,
    )


def test_hand_linked_events_are_never_changed_automatically(
    world: Session, ctx: StageContext
) -> None:
    first, second, _ = three_unknown_calls(world, ctx)
    link_by_hand(world, ctx.settings, first, "10002")
    ingest_party(world, ctx, contact("10001", "Pekka Pohjola", phones=[NEW_NUMBER]))
    by_hand = event_json(world, first)
    assert (by_hand["customer_number"], by_hand["seller"], by_hand["link_state"]) == (
        "10002",
        "mikko",
        "linked",
    )
    assert event_json(world, second)["customer_number"] == "10001"
    # A later update of the hand-linked call keeps the hand-made link too.
    ingest_call(
        world,
        StageContext(ctx.settings, task_id="update", task_name="test"),
        inbound_call("unknown-1", NEW_NUMBER, "2026-11-23T09:00:00+02:00", note="Soitto"),
    )
    assert event_json(world, first)["customer_number"] == "10002"


def test_a_number_shared_by_two_contacts_is_ambiguous_until_one_loses_it(
    world: Session, ctx: StageContext
) -> None:
    (event_id, *_) = three_unknown_calls(world, ctx)
    ingest_party(world, ctx, contact("10001", "Pekka Pohjola", phones=[NEW_NUMBER]))
    ingest_party(world, ctx, contact("10001", "Paula Pohjola", phones=[NEW_NUMBER]))
    # Linked events stay linked: a second contact gaining the number does not unsettle them.
    assert event_json(world, event_id)["link_state"] == "linked"

    later = ingest_call(
        world, ctx, inbound_call("shared-later", NEW_NUMBER, "2026-11-26T09:00:00+02:00")
    )
    ambiguous = event_json(world, later.event_id)
    assert ambiguous["link_state"] == "ambiguous"
    assert {c["name"] for c in ambiguous["candidates"]} == {"Pekka Pohjola", "Paula Pohjola"}
    ingest_party(world, ctx, contact("10001", "Paula Pohjola", phones=[]))
    resolved = event_json(world, later.event_id)
    assert (resolved["link_state"], resolved["contact"]) == ("linked", "Pekka Pohjola")


def test_an_email_links_when_its_customer_gains_the_domain(
    world: Session, ctx: StageContext
) -> None:
    raw = raw_email(
        "Olli Ostaja <olli@savonpuu.fi>", "crm@myyntitalo.fi", "Tarjouspyyntö", "q-1@savonpuu.fi"
    )
    stored = ingest_email(world, ctx, email_message(raw))
    assert event_json(world, stored.event_id)["link_state"] == "unlinked"
    keys = set(
        tuple(row)
        for row in world.execute(
            select(EventPartyKey.kind, EventPartyKey.value).where(
                EventPartyKey.event_id == stored.event_id
            )
        ).all()
    )
    assert keys == {("email", "olli@savonpuu.fi"), ("domain", "savonpuu.fi")}

    ingest_party(world, ctx, customer_with_phone("20001", "+358 17 555 0000", seller="mikko"))
    event = event_json(world, stored.event_id)
    assert (event["customer_number"], event["seller"], event["link_state"]) == (
        "20001",
        "mikko",
        "linked",
    )
    assert "mikko" in event["staff"]

    # A contact with that address, later: the event is linked already and stays as it is.
    ingest_party(world, ctx, contact("20001", "Olli Ostaja", email="olli@savonpuu.fi"))
    assert event_json(world, stored.event_id)["contact"] is None


def test_a_contacts_further_address_matches_and_relinks(world: Session, ctx: StageContext) -> None:
    raw = raw_email(
        "Matti <matti@virtanen.example>", "crm@myyntitalo.fi", "Kotiosoitteesta", "m-1@virtanen"
    )
    stored = ingest_email(world, ctx, email_message(raw))
    assert event_json(world, stored.event_id)["link_state"] == "unlinked"
    ingest_party(
        world,
        ctx,
        contact(
            "10001",
            "Matti Virtanen",
            email="matti.virtanen@pohjolankone.fi",
            emails=["Matti@Virtanen.example"],
            phones=["040 123 4567"],
        ),
    )
    event = event_json(world, stored.event_id)
    assert (event["customer_number"], event["contact"], event["seller"]) == (
        "10001",
        "Matti Virtanen",
        "anna",
    )
    # And a new email from that address matches at once.
    fresh = ingest_email(
        world,
        ctx,
        email_message(
            raw_email("matti@virtanen.example", "crm@myyntitalo.fi", "Toinen", "m-2@virtanen")
        ),
    )
    assert event_json(world, fresh.event_id)["contact"] == "Matti Virtanen"


def test_a_visit_links_when_its_customer_arrives(world: Session, ctx: StageContext) -> None:
    visit = {
        **load_example("visits/visit-with-memo.json"),
        "visit_id": "v-new-customer",
        "customer_number": "20001",
        "contacts": ["olli@savonpuu.fi"],
        "attendees": [],
        "seller": "mikko",
    }
    stored = ingest_visit(world, ctx, visit)
    before = event_json(world, stored.event_id)
    assert before["link_state"] == "unlinked"
    assert "unknown customer_number '20001'" in before["match_note"]
    mikko = staff_id(world, "mikko")
    refresh_seller(world, ctx, mikko)
    # An unlinked visit still counts for the seller who made it.
    assert tally(world, mikko, "customer_visit", "2026-W48") == 1

    result = ingest_party(world, ctx, contact("20001", "Olli Ostaja", email="olli@savonpuu.fi"))
    assert f"re-linked 1 event(s): {stored.event_id}" in result.detail
    event = event_json(world, stored.event_id)
    assert (event["customer_number"], event["contact"], event["seller"]) == (
        "20001",
        "Olli Ostaja",
        "mikko",
    )


def test_relinked_events_equal_events_ingested_after_the_master_data(
    world: Session, ctx: StageContext
) -> None:
    """The re-link applies the stages' own rules: the same result as if the party was known."""
    call = inbound_call("late", NEW_NUMBER, "2026-11-24T09:00:00+02:00", status="missed")
    raw = raw_email("olli@savonpuu.fi", "crm@myyntitalo.fi", "Kysely", "late@savonpuu.fi")
    relinked_call = ingest_call(world, ctx, call).event_id
    relinked_email = ingest_email(world, ctx, email_message(raw)).event_id
    ingest_party(world, ctx, customer_with_phone("20001", NEW_NUMBER, seller="mikko"))

    fresh_call = ingest_call(world, ctx, {**call, "call_id": "known"}).event_id
    raw2 = raw.replace(b"late@savonpuu.fi", b"known@savonpuu.fi")
    fresh_email = ingest_email(world, ctx, email_message(raw2)).event_id
    facts = ("customer_number", "contact", "link_state", "seller", "staff", "category", "class")
    for relinked, fresh in ((relinked_call, fresh_call), (relinked_email, fresh_email)):
        a, b = event_json(world, relinked), event_json(world, fresh)
        assert {k: a[k] for k in facts} == {k: b[k] for k in facts}
    follow_ups = world.scalars(
        select(FollowUp.event_id).where(FollowUp.event_id.in_([relinked_call, fresh_call]))
    ).all()
    assert relinked_call is not None and fresh_call is not None
    assert sorted(follow_ups) == sorted([relinked_call, fresh_call])


def test_deactivated_responsible_seller_gets_no_relinked_events(
    world: Session, ctx: StageContext
) -> None:
    anna = staff_id(world, "anna")
    (event_id, *_) = three_unknown_calls(world, ctx)
    ingest_party(
        world,
        ctx,
        party(
            "staff",
            username="anna",
            name="Anna Lahtinen",
            email="anna.lahtinen@myyntitalo.fi",
            phones=["+358 50 111 2222"],
            extension="201",
            manager="helena",
            active=False,
        ),
    )
    ingest_party(world, ctx, contact("10001", "Pekka Pohjola", phones=[NEW_NUMBER]))
    event = event_json(world, event_id)
    assert (event["customer_number"], event["seller"]) == ("10001", None)
    assert "responsible seller anna is deactivated" in event["match_note"]
    refresh_seller(world, ctx, anna)
    assert tally(world, anna, "crm_event", "2026-W48") == 0


def test_the_outside_number_is_a_key_and_our_own_numbers_are_not(
    world: Session, ctx: StageContext
) -> None:
    result = ingest_call(world, ctx, inbound_call("keys", NEW_NUMBER, "2026-11-24T09:00:00+02:00"))
    keys = world.execute(
        select(EventPartyKey.kind, EventPartyKey.value).where(
            EventPartyKey.event_id == result.event_id
        )
    ).all()
    assert [tuple(k) for k in keys] == [("phone", NEW_E164)]
    assert event_by_source(world, "call", "keys")["link_state"] == "unlinked"
    assert world.get_one(CrmEvent, result.event_id).linked_by == "auto"
