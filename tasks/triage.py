"""Triage: the events that could not be linked to one customer, and linking them by hand.

``crm-events triage`` lists unlinked and ambiguous events with what was tried (the outside
numbers and addresses, the candidates, the match note); ``crm-events link`` resolves one. An
event linked by hand keeps that link: the automatic re-link never changes it again.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.events import CrmEvent
from models.ledger import InboundMessage
from models.limits import MAX_ROW_ID, row_id
from models.parties import Contact, ContactEmail, Customer, EventPartyKey, Lead
from tasks.ingest.visit import apply_visit_parties
from tasks.match import customer_by_number
from tasks.relink import OPEN_STATES, assign_seller
from tasks.store import lock_event_by_id, move_tallies, tally_keys
from tasks.views import events_json

#: Key kinds as shown to people.
TRIED_LABELS = {
    "phone": "numbers",
    "email": "addresses",
    "domain": "domains",
    "customer": "customer_numbers",
}


class LinkError(Exception):
    """The hand link cannot be made (no such event, customer or contact)."""


def party_keys_by_event(session: Session, event_ids: list[int]) -> dict[int, dict[str, list[str]]]:
    tried: dict[int, dict[str, list[str]]] = defaultdict(
        lambda: {label: [] for label in TRIED_LABELS.values()}
    )
    for event_id, kind, value in session.execute(
        select(EventPartyKey.event_id, EventPartyKey.kind, EventPartyKey.value)
        .where(EventPartyKey.event_id.in_(event_ids))
        .order_by(EventPartyKey.event_id, EventPartyKey.position, EventPartyKey.kind)
    ):
        tried[event_id][TRIED_LABELS.get(kind, kind)].append(value)
    return tried


def with_match_facts(
    session: Session, events: list[CrmEvent], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Add what matching tried, how the event is linked and whether it is a lead."""
    ids = [e.id for e in events]
    tried = party_keys_by_event(session, ids)
    leads = set(session.scalars(select(Lead.event_id).where(Lead.event_id.in_(ids))))
    by_id = {e.id: e for e in events}
    for row in rows:
        event = by_id[row["id"]]
        row["linked_by"] = event.linked_by
        row["lead"] = event.id in leads
        row["tried"] = tried[event.id]
    return rows


def triage_rows(
    session: Session, zone: ZoneInfo | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Unlinked and ambiguous events, newest first, with what was tried."""
    events = list(
        session.scalars(
            select(CrmEvent)
            .where(CrmEvent.link_state.in_(OPEN_STATES))
            .order_by(CrmEvent.occurred_at.desc(), CrmEvent.id.desc())
            .limit(limit)
        )
    )
    return with_match_facts(session, events, events_json(session, events, zone))


@dataclass
class HandLink:
    event: CrmEvent
    sellers: set[int] = field(default_factory=set)


def link_by_hand(
    session: Session,
    settings: Settings,
    event_id: int,
    customer_number: str,
    contact_reference: str | None = None,
) -> HandLink:
    """Link an event to a customer (and contact) by hand; seller re-derived, counts moved."""
    event = lock_event_by_id(session, event_id) if 0 < event_id <= MAX_ROW_ID else None
    if event is None:
        raise LinkError(f"no event {event_id}")
    customer = customer_by_number(session, customer_number)
    if customer is None:
        raise LinkError(f"no customer {customer_number}")
    contact = find_customer_contact(session, customer, contact_reference)
    before = tally_keys(session, event)
    previous = f"{event.link_state}: {event.match_note}"[:500]
    event.customer_id = customer.id
    event.contact_id = contact.id if contact else None
    event.link_state = "linked"
    event.linked_by = "hand"
    event.candidates = []
    linked = f"linked by hand to customer {customer.customer_number}" + (
        f", contact {contact.name}" if contact else ""
    )
    if event.source_kind == "visit":
        payload = session.scalar(
            select(InboundMessage.payload).where(
                InboundMessage.id == (event.details or {}).get("updated_by_message")
            )
        )
        apply_visit_parties(session, settings, event, payload if isinstance(payload, dict) else {})
        notes = [event.match_note]
    else:
        others = [
            c
            for c in (event.details or {}).get("contact_ids", [])
            if isinstance(c, int)
            and c != event.contact_id
            and session.scalar(select(Contact.customer_id).where(Contact.id == c)) == customer.id
        ]
        event.details = {
            **event.details,
            "contact_ids": ([event.contact_id] if event.contact_id else []) + others,
        }
        notes = assign_seller(session, settings, event)
    event.match_note = "; ".join(n for n in [linked, *notes, f"before: {previous}"] if n)
    session.flush()
    sellers = move_tallies(session, before, tally_keys(session, event))
    return HandLink(event, sellers)


def find_customer_contact(
    session: Session, customer: Customer, reference: str | None
) -> Contact | None:
    """A contact of ``customer`` by id (``12`` or ``#12``), any of their addresses, or name."""
    if not reference:
        return None
    text = reference.strip()
    query = select(Contact).where(Contact.customer_id == customer.id).order_by(Contact.id)
    digits = text.lstrip("#")
    if digits.isascii() and digits.isdigit():  # an id; one past any row's is no contact's
        number = row_id(digits)
        found = [] if number is None else session.scalars(query.where(Contact.id == number)).all()
    elif "@" in text:
        address = text.lower()
        found = session.scalars(
            query.where(
                or_(
                    Contact.id.in_(
                        select(ContactEmail.contact_id).where(ContactEmail.email == address)
                    ),
                    func.lower(Contact.email) == address,
                )
            )
        ).all()
    else:
        found = session.scalars(query.where(func.lower(Contact.name) == text.lower())).all()
    if len(found) == 1:
        return found[0]
    known = ", ".join(
        f"#{c.id} {c.name}" + (f" <{c.email}>" if c.email else "") for c in session.scalars(query)
    )
    if found:
        raise LinkError(
            f"{reference!r} fits {len(found)} contacts of {customer.customer_number}: "
            + ", ".join(f"#{c.id} {c.name}" for c in found)
            + " (give the id)"
        )
    raise LinkError(
        f"customer {customer.customer_number} has no contact {reference!r}"
        + (f"; its contacts: {known}" if known else "; it has no contacts")
    )
