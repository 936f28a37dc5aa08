"""Triage, linking by hand and the customer history, on the shared samples."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent
from models.parties import Contact
from tasks.context import StageContext
from tasks.history import customer_history
from tasks.ingest.call import ingest_call
from tasks.ingest.email import ingest_email
from tasks.ingest.visit import ingest_visit
from tasks.match import customer_by_number
from tasks.refresh import refresh_seller
from tasks.telephony.adapters import CdrContext, asterisk_cdr_to_call, read_cdr_csv
from tasks.triage import LinkError, link_by_hand, triage_rows
from tests.conftest import EXAMPLES, load_example
from tests.master_data import another_delivery, event_json, inbound_call, staff_id, tally
from workers.publish import email_message_from_raw


def load_samples(db: Session, ctx: StageContext) -> None:
    """Every sample message of examples/ (the shared samples) on top of the parties."""
    for name in sorted((EXAMPLES / "calls").glob("*.json")):
        if name.stem == "twilio-status-callbacks":
            continue  # the Twilio provider's own format, not crm.call/1
        for message in load_example(f"calls/{name.name}"):
            ingest_call(db, ctx, message)
    context = CdrContext(own_numbers=ctx.settings.own_numbers)
    for row in read_cdr_csv((EXAMPLES / "calls/asterisk-cdr.csv").read_text(encoding="utf-8")):
        assert row.fields is not None, row.error
        ingest_call(db, ctx, asterisk_cdr_to_call(row.fields, context))
    for name in sorted((EXAMPLES / "emails").glob("*.eml")):
        if name.stem != "auto-reply":
            ingest_email(db, ctx, email_message_from_raw(name.read_bytes(), ctx.settings))
    for name in sorted((EXAMPLES / "visits").glob("*.json")):
        sample = load_example(f"visits/{name.name}")
        for message in sample if isinstance(sample, list) else [sample]:
            ingest_visit(db, ctx, message)


def by_source_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["source_id"]: r for r in rows}


def test_triage_of_the_shared_samples_lists_what_could_not_be_linked(
    world: Session, ctx: StageContext
) -> None:
    load_samples(world, ctx)
    rows = triage_rows(world, ctx.settings.zone)
    assert {r["link_state"] for r in rows} <= {"unlinked", "ambiguous"}
    shared = by_source_id(rows)["c-2026-11-24-0042"]
    assert shared["link_state"] == "ambiguous"
    assert shared["customer_number"] == "10002"
    assert shared["tried"]["numbers"] == ["+35894321000"]
    assert {c["name"] for c in shared["candidates"]} == {"Jussi Mäkinen", "Sanna Heikkinen"}
    assert "shared by 2 contacts" in shared["match_note"]
    unknown = next(r for r in rows if r["tried"]["numbers"] == ["+358944443333"])
    assert (unknown["link_state"], unknown["source"], unknown["customer_number"]) == (
        "unlinked",
        "asterisk",
        None,
    )
    assert "matches no contact or customer" in unknown["match_note"]
    assert unknown["lead"] is False and unknown["linked_by"] == "auto"
    # Everything else in the samples is linked, so not in triage.
    assert len(rows) == 2
    # Newest first.
    assert [r["occurred_at"] for r in rows] == sorted(
        (r["occurred_at"] for r in rows), reverse=True
    )


def test_history_of_a_sample_customer(world: Session, ctx: StageContext) -> None:
    load_samples(world, ctx)
    customer = customer_by_number(world, "10001")
    assert customer is not None
    history = customer_history(world, customer, ctx.settings.zone)
    assert (history["customer_number"], history["name"], history["seller"]) == (
        "10001",
        "Pohjolan Kone Oy",
        "anna",
    )
    events = history["events"]
    assert [e["occurred_at"] for e in events] == sorted(
        (e["occurred_at"] for e in events), reverse=True
    )
    assert {e["customer_number"] for e in events} == {"10001"}
    # Who has been in touch: anna above all, mikko (the visit, Matti's call to his extension).
    staff = {s["username"]: s for s in history["staff"]}
    assert {"anna", "mikko"} <= set(staff)
    assert staff["anna"]["name"] == "Anna Lahtinen"
    assert history["staff"][0]["username"] == "anna"
    # What about, with the documents.
    visit = next(e for e in events if e["source_id"] == "v-2026-11-24-anna-01")
    assert visit["subject"] == "Huoltosopimuksen uusiminen"
    assert {d["filename"] for d in visit["documents"]} == {"memo.txt", "konehalli.png"}
    assert visit["staff"] == ["anna", "mikko"]
    assert visit["contacts"] == ["Matti Virtanen"]
    forwarded = next(e for e in events if "Laiteluettelo_kevät_2027.pdf" in _files(e))
    offer = next(e for e in events if e["source_kind"] == "email" and len(e["contacts"]) == 2)
    assert set(offer["contacts"]) == {"Matti Virtanen", "Liisa Korhonen"}
    assert offer["thread_key"] is not None and offer["thread_key"] == forwarded["thread_key"]
    contacts = {c["name"]: c for c in history["contacts"]}
    assert contacts["Matti Virtanen"]["emails"] == ["matti.virtanen@pohjolankone.fi"]
    assert contacts["Matti Virtanen"]["phones"] == ["+358401234567"]


def _files(event: dict[str, Any]) -> set[str]:
    return {d["filename"] for d in event["documents"]}


def test_history_shows_follow_ups(world: Session, ctx: StageContext) -> None:
    for message in load_example("calls/missed-from-switchboard.json"):
        ingest_call(world, ctx, message)
    customer = customer_by_number(world, "10002")
    assert customer is not None
    (missed,) = customer_history(world, customer)["events"]
    assert missed["follow_up"]["state"] == "open"
    assert missed["follow_up"]["seller"] == "mikko"
    assert missed["follow_up"]["reason"].startswith("missed call")


def test_linking_the_ambiguous_sample_call_by_hand(world: Session, ctx: StageContext) -> None:
    for message in load_example("calls/missed-from-switchboard.json"):
        ingest_call(world, ctx, message)
    event = world.scalar(select(CrmEvent).where(CrmEvent.source_id == "c-2026-11-24-0042"))
    assert event is not None
    linked = link_by_hand(world, ctx.settings, event.id, "10002", "sanna.heikkinen@jsahko.fi")
    row = event_json(world, event.id)
    assert (row["link_state"], row["contact"], row["customer_number"], row["seller"]) == (
        "linked",
        "Sanna Heikkinen",
        "10002",
        "mikko",  # the call's agent (extension 202) handled it
    )
    assert row["candidates"] == []
    assert row["match_note"].startswith("linked by hand to customer 10002, contact Sanna")
    assert "before: ambiguous" in row["match_note"]
    assert world.get_one(CrmEvent, event.id).linked_by == "hand"
    assert linked.sellers == {staff_id(world, "mikko")}
    assert triage_rows(world) == []
    # A later update of the call keeps the hand-made link.
    (_ringing, missed) = load_example("calls/missed-from-switchboard.json")
    ingest_call(world, another_delivery(ctx), {**missed, "sequence": 3, "note": "Soitetaan."})
    assert event_json(world, event.id)["contact"] == "Sanna Heikkinen"


def test_hand_link_rederives_the_seller_and_moves_the_count(
    world: Session, ctx: StageContext
) -> None:
    anna, mikko = staff_id(world, "anna"), staff_id(world, "mikko")
    result = ingest_call(
        world, ctx, inbound_call("by-hand", "040 555 1234", "2026-11-24T09:00:00+02:00")
    )
    assert result.event_id is not None
    assert event_json(world, result.event_id)["seller"] is None
    # By id: the customer's own number, no contact; the responsible seller gets it.
    first = link_by_hand(world, ctx.settings, result.event_id, "10001")
    assert first.sellers == {anna}
    refresh_seller(world, ctx, anna)
    assert tally(world, anna, "crm_event", "2026-W48") == 1
    # Corrected: it was the other customer. The count moves from anna to mikko.
    sanna = world.scalar(select(Contact.id).where(Contact.name == "Sanna Heikkinen"))
    second = link_by_hand(world, ctx.settings, result.event_id, "10002", f"#{sanna}")
    assert second.sellers == {anna, mikko}
    refresh_seller(world, ctx, anna)
    refresh_seller(world, ctx, mikko)
    assert tally(world, anna, "crm_event", "2026-W48") == 0
    assert tally(world, mikko, "crm_event", "2026-W48") == 1
    row = event_json(world, result.event_id)
    assert (row["seller"], row["staff"], row["contact"]) == ("mikko", ["mikko"], "Sanna Heikkinen")


@pytest.mark.parametrize(
    ("customer", "contact", "message"),
    [
        ("99999", None, "no customer 99999"),
        ("10001", "Kalle Tuntematon", "customer 10001 has no contact 'Kalle Tuntematon'"),
        ("10001", "sanna.heikkinen@jsahko.fi", "its contacts: #"),
    ],
)
def test_hand_link_refuses_what_does_not_exist(
    world: Session, ctx: StageContext, customer: str, contact: str | None, message: str
) -> None:
    result = ingest_call(world, ctx, inbound_call("nope", "040 555 1234", "2026-11-24T09:00+02:00"))
    assert result.event_id is not None
    with pytest.raises(LinkError) as refused:
        link_by_hand(world, ctx.settings, result.event_id, customer, contact)
    assert message in str(refused.value)
    assert event_json(world, result.event_id)["link_state"] == "unlinked"


def test_hand_link_of_a_missing_event(world: Session, ctx: StageContext) -> None:
    with pytest.raises(LinkError, match="no event 987654"):
        link_by_hand(world, ctx.settings, 987654, "10001")


def test_hand_link_of_a_visit_keeps_its_seller(world: Session, ctx: StageContext) -> None:
    visit = {**load_example("visits/visit-with-memo.json"), "customer_number": None}
    visit.update(contacts=[], attendees=["mikko"], visit_id="v-hand")
    stored = ingest_visit(world, ctx, visit)
    assert event_json(world, stored.event_id)["link_state"] == "unlinked"
    assert stored.event_id is not None
    link_by_hand(world, ctx.settings, stored.event_id, "10002", "Jussi Mäkinen")
    row = event_json(world, stored.event_id)
    assert (row["customer_number"], row["contact"], row["seller"], row["staff"]) == (
        "10002",
        "Jussi Mäkinen",
        "anna",
        ["anna", "mikko"],
    )
    # The app sends the visit again: the hand-made link stays, the message's people follow.
    ingest_visit(world, another_delivery(ctx), {**visit, "attendees": []})
    row = event_json(world, stored.event_id)
    assert (row["customer_number"], row["contact"], row["staff"]) == (
        "10002",
        "Jussi Mäkinen",
        ["anna"],
    )


def test_hand_link_keeps_the_agent_who_took_the_call(world: Session, ctx: StageContext) -> None:
    result = ingest_call(
        world,
        ctx,
        inbound_call("agent-anna", "040 555 1234", "2026-11-24T09:00+02:00", agent="anna"),
    )
    assert result.event_id is not None
    # 10002's responsible seller is mikko, but anna handled the call.
    link_by_hand(world, ctx.settings, result.event_id, "10002", "Jussi Mäkinen")
    row = event_json(world, result.event_id)
    assert (row["customer_number"], row["contact"], row["seller"]) == (
        "10002",
        "Jussi Mäkinen",
        "anna",
    )
