"""Re-link: link the events a change of master data now explains, automatically or by hand.

When a contact or customer gains (or loses) a phone number, an address or a domain, or a
customer that a visit or a meeting named appears, the unlinked and ambiguous events recorded
with that key (``event_party_key``, filled by the call, email, visit and meeting stages) are
derived again by their stage's own rules: a call is folded again from its updates, a visit
matched again from its latest message, a meeting from its invitation's attendees (its category
following, ``CRM_MEETING_CATEGORY``), an email matched again by its outside addresses with the
seller re-derived by the attribution rule (the staff member who handled it, else the customer's
responsible seller when active). Their counts move from the keys before to the keys after, in
the same transaction. Events linked by hand are never changed automatically. See
docs/master-data.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.events import CrmEvent, EventParticipant
from models.parties import EventPartyKey
from tasks.context import StageContext
from tasks.ingest.call_state import refold_call
from tasks.ingest.visit import relink_visit
from tasks.leads import apply_lead_rule
from tasks.match import PartyMatch, customer_by_number, find_staff, match_addresses, match_phone
from tasks.store import (
    PartyKey,
    add_participants,
    lock_event_by_id,
    lock_party_keys,
    move_tallies,
    responsible_seller_id,
    responsible_seller_notes,
    tally_keys,
)

#: Events the automatic re-link may change.
OPEN_STATES = ("unlinked", "ambiguous")


@dataclass
class RelinkResult:
    event_ids: list[int] = field(default_factory=list)
    sellers: set[int] = field(default_factory=set)


def relink_for_keys(session: Session, ctx: StageContext, keys: Iterable[PartyKey]) -> RelinkResult:
    """Re-link the open events recorded with any of ``keys``; moves their counts."""
    result = RelinkResult()
    keys = sorted(set(keys))
    if not keys:
        return result
    # Wait for stages that are storing an event under one of these keys (tasks.store).
    lock_party_keys(session, keys)
    wanted = [and_(EventPartyKey.kind == k.kind, EventPartyKey.value == k.value) for k in keys]
    candidates = session.scalars(
        select(EventPartyKey.event_id)
        .join(CrmEvent, CrmEvent.id == EventPartyKey.event_id)
        .where(
            or_(*wanted),
            CrmEvent.link_state.in_(OPEN_STATES),
            CrmEvent.linked_by == "auto",
        )
        .distinct()
        .order_by(EventPartyKey.event_id)
    ).all()
    for event_id in candidates:
        event = lock_event_by_id(session, event_id)
        # Re-read under the lock: a concurrent stage or hand link may have changed it.
        if event is None or event.link_state not in OPEN_STATES or event.linked_by != "auto":
            continue
        before = tally_keys(session, event)
        changed = rederive_link(session, ctx, event)
        if changed:
            result.event_ids.append(event.id)
            result.sellers |= move_tallies(session, before, tally_keys(session, event))
    return result


def event_keys(session: Session, event: CrmEvent) -> list[PartyKey]:
    return [
        PartyKey(kind, value)
        for kind, value in session.execute(
            select(EventPartyKey.kind, EventPartyKey.value)
            .where(EventPartyKey.event_id == event.id)
            .order_by(EventPartyKey.position, EventPartyKey.kind)
        )
    ]


def match_from_keys(session: Session, settings: Settings, event: CrmEvent) -> PartyMatch | None:
    """The match the event's own stage would make now, from its recorded party keys."""
    keys = event_keys(session, event)
    phones = [k.value for k in keys if k.kind == "phone"]
    addresses = [k.value for k in keys if k.kind == "email"]
    numbers = [k.value for k in keys if k.kind == "customer"]
    if event.source_kind == "call":
        match = match_phone(session, phones[0], settings) if phones else PartyMatch()
        # As in the call stage: a customer_number from the message wins over the number match.
        customer = customer_by_number(session, numbers[0]) if numbers else None
        if customer is not None:
            if match.customer_id not in (None, customer.id):
                match.notes.append("customer_number given by the message overrides the match")
                match.contact_id, match.candidates = None, []
            match.customer_id = customer.id
            match.state = "ambiguous" if match.candidates else "linked"
        return match
    if event.source_kind == "email":
        return match_addresses(session, addresses, settings)
    return None


def handling_staff_id(session: Session, settings: Settings, event: CrmEvent) -> int | None:
    """The staff member who handled a call or email, as its stage identifies them.

    A call's agent, else the staff member on our side of the call; an email's staff sender or
    forwarder, else a staff member among its recipients (the lowest id, as the email stage).
    """
    details = event.details or {}
    if event.source_kind == "call":
        inside = details.get("from") if event.direction == "outbound" else details.get("to")
        for reference in (details.get("agent"), inside):
            staff = find_staff(session, reference, settings) if isinstance(reference, str) else None
            if staff is not None:
                return staff.id
        return None
    if event.source_kind == "email":
        sender = details.get("from")
        staff = find_staff(session, sender, settings) if isinstance(sender, str) else None
        if staff is not None:
            return staff.id
        others = {
            found.id
            for address in details.get("to") or []
            if isinstance(address, str) and (found := find_staff(session, address, settings))
        }
        return min(others) if others else None
    return None


def link_facts(event: CrmEvent) -> tuple[object, ...]:
    return (
        event.customer_id,
        event.contact_id,
        event.link_state,
        event.seller_id,
        event.candidates,
    )


def rederive_link(session: Session, ctx: StageContext, event: CrmEvent) -> bool:
    """Derive an automatically linked event's party and seller again; True if they changed.

    The category is left as its stage gives it: the classification rules do not depend on who
    the outside party is, except the unknown-party lead rule, which keeps a lead a lead when its
    party becomes known (a converted lead, not a lost one; tasks.leads).
    """
    if event.linked_by == "hand":
        return False
    before = link_facts(event)
    if event.source_kind == "call":
        previous = f"{before[2]}: {event.match_note}"[:500]
        derived = refold_call(session, ctx, event)
        # A lead stays its party's lead when the party becomes known (a converted lead).
        apply_lead_rule(session, ctx, event, requested_category=derived.requested_category)
        if link_facts(event) == before:
            return False
        notes = [event.match_note]
        if event.seller_id is None:
            notes += responsible_seller_notes(session, event.customer_id, None)
        notes.append(f"re-linked automatically after a master data change (was {previous})")
        event.match_note = "; ".join(n for n in notes if n)
        return True
    if event.source_kind == "visit":
        return relink_visit(session, ctx.settings, event)
    if event.source_kind == "meeting":
        # Imported here: the meeting stage loads the email schemas, which listings never need.
        from tasks.ingest.meeting import relink_meeting

        category = event.category_code
        relink_meeting(session, ctx.settings, event)
        return link_facts(event) != before or event.category_code != category
    match = match_from_keys(session, ctx.settings, event)
    if match is None:
        return False
    if (match.customer_id, match.contact_id, match.state, match.candidates) == (
        event.customer_id,
        event.contact_id,
        event.link_state,
        event.candidates,
    ):
        return False
    previous = f"{event.link_state}: {event.match_note}"[:500]
    event.customer_id = match.customer_id
    event.contact_id = match.contact_id
    event.link_state = match.state
    event.candidates = match.candidates
    contact_ids = [c for c in [match.contact_id, *match.other_contact_ids] if c]
    event.details = {**event.details, "contact_ids": contact_ids}
    notes = [*match.notes, *assign_seller(session, ctx.settings, event)]
    notes.append(f"re-linked automatically after a master data change (was {previous})")
    event.match_note = "; ".join(notes)
    session.flush()
    return link_facts(event) != before


def assign_seller(session: Session, settings: Settings, event: CrmEvent) -> list[str]:
    """Re-derive the seller of a call or email by the attribution rule; returns notes."""
    previous = event.seller_id
    handler = handling_staff_id(session, settings, event)
    notes: list[str] = []
    if handler is not None:
        event.seller_id = handler
    else:
        event.seller_id = responsible_seller_id(session, event.customer_id)
        notes = responsible_seller_notes(session, event.customer_id, event.seller_id)
        if previous is not None and previous != event.seller_id:
            # The previous seller came from the previous customer's responsible seller: they
            # were never involved, so they stop being a participant.
            session.execute(
                delete(EventParticipant).where(
                    EventParticipant.event_id == event.id, EventParticipant.staff_id == previous
                )
            )
    session.flush()
    add_participants(session, event, [event.seller_id])
    return notes


def recheck_open_event(session: Session, ctx: StageContext, event: CrmEvent) -> bool:
    """Called by a stage after it recorded the event's party keys (and took their locks).

    The stage matched before taking the locks; a party change committed in between is seen
    now, so the event does not stay unlinked while its party is already known.
    """
    if event.link_state not in OPEN_STATES or event.linked_by != "auto":
        return False
    if event.source_kind == "visit":
        return False  # visits re-check themselves (tasks.ingest.visit)
    expected = match_from_keys(session, ctx.settings, event)
    if expected is None or (expected.customer_id, expected.contact_id, expected.state) == (
        event.customer_id,
        event.contact_id,
        event.link_state,
    ):
        return False
    return rederive_link(session, ctx, event)
