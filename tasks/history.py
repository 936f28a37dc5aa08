"""A customer's history: who on the staff has been in touch, when, what about, the documents.

The seed's promise: anyone can see who has been in touch with the customer and what it
concerned. Events newest first, each with the staff involved, its contacts, thread, follow-up
and documents; plus the customer's contacts and a summary per staff member.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent, FollowUp
from models.parties import Contact, ContactEmail, Customer, PartyPhone, Staff
from tasks.triage import with_match_facts
from tasks.views import events_json


def customer_history(
    session: Session, customer: Customer, zone: ZoneInfo | None = None
) -> dict[str, Any]:
    zone = zone or ZoneInfo("UTC")
    events = list(
        session.scalars(
            select(CrmEvent)
            .where(CrmEvent.customer_id == customer.id)
            .order_by(CrmEvent.occurred_at.desc(), CrmEvent.id.desc())
        )
    )
    rows = with_match_facts(session, events, events_json(session, events, zone))
    usernames = {s.id: s.username for s in session.scalars(select(Staff))}
    follow_ups = {
        f.event_id: {
            "state": f.state,
            "reason": f.reason,
            "seller": usernames.get(f.seller_id) if f.seller_id else None,
            "created_at": f.created_at.astimezone(zone).isoformat(),
            "closed_at": f.closed_at.astimezone(zone).isoformat() if f.closed_at else None,
            "closed_by_event": f.closed_by_event_id,
        }
        for f in session.scalars(
            select(FollowUp).where(FollowUp.event_id.in_([e.id for e in events]))
        )
    }
    involved: dict[str, dict[str, Any]] = {}
    for row in rows:
        row["follow_up"] = follow_ups.get(row["id"])
        for username in row["staff"]:
            entry = involved.setdefault(
                username, {"username": username, "events": 0, "last": row["occurred_at"]}
            )
            entry["events"] += 1  # rows are newest first: "last" is the first seen
    names = dict(session.execute(select(Staff.username, Staff.name)).all())
    for entry in involved.values():
        entry["name"] = names.get(entry["username"])
    seller = session.get(Staff, customer.seller_id) if customer.seller_id else None
    return {
        "customer_number": customer.customer_number,
        "name": customer.name,
        "seller": seller.username if seller else None,
        "contacts": customer_contacts(session, customer),
        "staff": sorted(involved.values(), key=lambda e: (-e["events"], e["username"])),
        "events": rows,
    }


def customer_contacts(session: Session, customer: Customer) -> list[dict[str, Any]]:
    contacts = list(
        session.scalars(
            select(Contact).where(Contact.customer_id == customer.id).order_by(Contact.name)
        )
    )
    ids = [c.id for c in contacts]
    emails: dict[int, list[str]] = defaultdict(list)
    for contact_id, address in session.execute(
        select(ContactEmail.contact_id, ContactEmail.email)
        .where(ContactEmail.contact_id.in_(ids))
        .order_by(ContactEmail.email)
    ):
        emails[contact_id].append(address)
    phones: dict[int, list[str]] = defaultdict(list)
    for owner, e164 in session.execute(
        select(PartyPhone.contact_id, PartyPhone.e164)
        .where(PartyPhone.contact_id.in_(ids))
        .order_by(PartyPhone.id)
    ):
        if owner is not None:
            phones[owner].append(e164)
    return [
        {
            "id": c.id,
            "name": c.name,
            "email": c.email,
            "emails": [c.email] * bool(c.email) + [a for a in emails[c.id] if a != c.email],
            "phones": phones[c.id],
        }
        for c in contacts
    ]
