"""Ingest of ``crm.visit/1`` customer visits: one event per visit id, updated by later messages.

A later message for the same visit replaces its time, subject, memo, people and classification
(so the tally moves when the time or the seller changed), unless its ``updated_at`` is older
than the version already applied: updates that overtake each other never roll a visit back.
``cancelled: true`` keeps the event, marked cancelled, and it stops counting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.base import utcnow
from models.documents import EventDocument
from models.events import ERP_REFERENCES, CrmEvent, EventParticipant
from models.ledger import InboundMessage
from models.parties import Contact, ContactEmail, Customer
from tasks.attach import attach
from tasks.classify import ClassificationRequest, classify
from tasks.context import StageContext
from tasks.erasure import refuse_erased
from tasks.match import customer_by_number, find_staff
from tasks.periods import aware
from tasks.store import (
    StageResult,
    link_inbound,
    lock_event,
    move_tallies,
    record_inbound,
    record_party_keys,
    responsible_seller_id,
    responsible_seller_notes,
    set_properties,
    tally_keys,
    upsert_key,
)


def ingest_visit(session: Session, ctx: StageContext, payload: Any) -> StageResult:
    # The schema is imported here, not with the module: the command line's listings read
    # through this module and start sooner without marshmallow (docs/design.md).
    from models.schemas.common import load_message, shared_schema
    from models.schemas.visit import SCHEMA, VisitMessageSchema

    message = load_message(shared_schema(VisitMessageSchema), payload, SCHEMA)
    settings = ctx.settings
    # A visit naming an erased person (a contact reference, an attendee) is refused.
    references = [*message["contacts"], *message["attendees"]]
    refuse_erased(
        session,
        settings,
        payload,
        emails=[r for r in references if "@" in r],
        contacts=[
            (message["customer_number"], r)
            for r in message["contacts"]
            if "@" not in r and message.get("customer_number")
        ],
        withheld={"attachments": "<not kept: the visit names an erased person>"},
    )
    ledger_payload = {
        **payload,
        "attachments": [
            {k: v for k, v in a.items() if k != "content_b64"}
            for a in payload.get("attachments", [])
        ],
    }
    inbound_id = record_inbound(
        session,
        idempotency_key=upsert_key("visit", ctx, payload),
        schema=SCHEMA,
        source_kind="visit",
        source_system=message["source_system"],
        source_id=message["visit_id"],
        payload=ledger_payload,
    )
    if inbound_id is None:
        return StageResult("duplicate", detail="this visit message was already accepted")

    notes: list[str] = []
    # The schema makes started_at a required datetime; ended_at may be missing or null.
    started_at: datetime = message["started_at"]
    ended_at: datetime | None = message.get("ended_at")
    started = aware(started_at, settings.zone, notes, "started_at")
    ended = aware(ended_at, settings.zone, notes, "ended_at")
    version = aware(message.get("updated_at"), settings.zone, notes, "updated_at")
    event, created = lock_event(
        session,
        source_system=message["source_system"],
        source_kind="visit",
        source_id=message["visit_id"],
        defaults={
            "category_code": "customer_visit",
            "class_code": "sales",
            "type_code": "customer_visit",
            "occurred_at": started,
        },
    )
    link_inbound(session, inbound_id, event.id)
    applied = applied_version(event)
    if version is not None and applied is not None and version < applied:
        # The event row is locked, so two updates of one visit are compared one after the other.
        return StageResult(
            "outdated",
            event.id,
            f"updated_at {version.isoformat()} is older than the applied version"
            f" {applied.isoformat()}: not applied",
        )
    before = tally_keys(session, event)

    classification = classify(
        session,
        ClassificationRequest(
            source_kind="visit",
            category=message.get("category"),
            class_code=message.get("class_"),
            type_code=message.get("type"),
            properties=tuple(message.get("properties") or ()),
        ),
    )
    event.occurred_at = started
    event.ended_at = ended
    event.duration_s = int((ended - started).total_seconds()) if ended else None
    event.subject = message.get("subject") or "Customer visit"
    event.body = message.get("memo") or ""
    # A visit is cancelled by either field; otherwise in the state its latest message gives.
    cancelled = message["cancelled"] or message.get("state") == "cancelled"
    # A visit has no status of its own beside the CRM status: the two are the same.
    event.state = event.status = "cancelled" if cancelled else message.get("state") or "done"
    for name in ERP_REFERENCES:  # the latest message is the visit's record
        setattr(event, name, message.get(name))
    event.cancelled = cancelled
    classification.apply_to(event)
    event.details = {
        **event.details,
        "location": message.get("location"),
        "updated_by_message": inbound_id,
        "updated_at": version.isoformat() if version else None,
        "time_notes": notes,
    }
    event.updated_at = utcnow()
    session.flush()
    set_properties(session, event, classification.properties)
    parties = apply_visit_parties(session, settings, event, message)
    record_party_keys(
        session,
        settings,
        event,
        addresses=parties.addresses,
        customer_numbers=[message.get("customer_number")],
    )
    if event.link_state != "linked" and event.linked_by != "hand":
        # Matched before the party keys' locks were taken: a customer or contact committed in
        # between is seen now (see tasks.store.record_party_keys).
        apply_visit_parties(session, settings, event, message)
    _store_documents(session, settings, event, message)
    session.flush()
    sellers = move_tallies(session, before, tally_keys(session, event))
    return StageResult(
        "stored", event.id, "created" if created else "updated", sellers_to_refresh=sellers
    )


def applied_version(event: CrmEvent) -> datetime | None:
    """The ``updated_at`` of the visit message the event shows, if that message had one."""
    text = (event.details or {}).get("updated_at")
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


@dataclass
class VisitParties:
    """Who a visit message names, as found in the master data now."""

    customer: Customer | None = None
    contact_ids: list[int] = field(default_factory=list)
    #: The staff member who made the visit (``seller``), when known.
    visitor_id: int | None = None
    #: Staff among the attendees and contacts: participants.
    staff_ids: set[int] = field(default_factory=set)
    #: Customer-side email addresses named (found or not): keys for the re-link.
    addresses: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def find_visit_parties(
    session: Session, settings: Settings, message: Mapping[str, Any]
) -> VisitParties:
    found = VisitParties()
    seller = find_staff(session, message["seller"], settings)
    if seller is None:
        found.notes.append(f"seller {message['seller']!r} is not a known staff member")
    else:
        found.visitor_id = seller.id
    found.customer = customer_by_number(session, message.get("customer_number"))
    if found.customer is None and message.get("customer_number"):
        found.notes.append(f"unknown customer_number {message['customer_number']!r}")
    for reference in [*message.get("contacts", []), *message.get("attendees", [])]:
        staff = find_staff(session, reference, settings)
        if staff is not None:
            found.staff_ids.add(staff.id)
            continue
        if "@" in reference and reference.lower() not in found.addresses:
            found.addresses.append(reference.lower())
        contact = find_contact(session, reference, found.customer.id if found.customer else None)
        if contact is None:
            found.notes.append(f"attendee {reference!r} not found")
            continue
        if found.customer is None:
            found.customer = session.get_one(Customer, contact.customer_id)
        if contact.id not in found.contact_ids:
            found.contact_ids.append(contact.id)
    return found


def apply_visit_parties(
    session: Session, settings: Settings, event: CrmEvent, message: Mapping[str, Any]
) -> VisitParties:
    """Customer, contacts, seller and participants of a visit event, from ``message``.

    An event linked by hand keeps its customer and contact; its seller still follows the
    message (who made the visit), else the hand-chosen customer's responsible seller.
    """
    parties = find_visit_parties(session, settings, event_message_view(message))
    notes = list(parties.notes)
    if event.linked_by != "hand":
        customer = parties.customer
        event.customer_id = customer.id if customer else None
        event.contact_id = parties.contact_ids[0] if parties.contact_ids else None
        event.link_state = "linked" if customer else "unlinked"
        event.candidates = []
        contact_ids = parties.contact_ids
    else:
        notes.append("linked by hand: customer and contact kept")
        contact_ids = [c for c in parties.contact_ids if c != event.contact_id]
        contact_ids = ([event.contact_id] if event.contact_id else []) + contact_ids
    seller_id = parties.visitor_id
    if seller_id is None:
        seller_id = responsible_seller_id(session, event.customer_id)
        notes.extend(responsible_seller_notes(session, event.customer_id, seller_id))
    event.seller_id = seller_id
    event.match_note = "; ".join(notes + list((event.details or {}).get("time_notes", [])))
    event.details = {**event.details, "contact_ids": contact_ids}
    session.flush()
    set_participants(session, event, [seller_id, parties.visitor_id, *parties.staff_ids])
    return parties


def event_message_view(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """The fields party matching reads, from a loaded message or a ledger payload alike."""
    return {
        "seller": message.get("seller") or "",
        "customer_number": message.get("customer_number"),
        "contacts": [r for r in message.get("contacts") or [] if isinstance(r, str)],
        "attendees": [r for r in message.get("attendees") or [] if isinstance(r, str)],
    }


def set_participants(session: Session, event: CrmEvent, staff_ids: Iterable[int | None]) -> None:
    """Make the event's participants exactly ``staff_ids``: a removed attendee stops being one."""
    wanted = {s for s in staff_ids if s is not None}
    current = set(
        session.scalars(
            select(EventParticipant.staff_id).where(EventParticipant.event_id == event.id)
        )
    )
    if current - wanted:
        session.execute(
            delete(EventParticipant).where(
                EventParticipant.event_id == event.id,
                EventParticipant.staff_id.in_(current - wanted),
            )
        )
    for staff_id in sorted(wanted - current):
        session.add(EventParticipant(event_id=event.id, staff_id=staff_id))


def relink_visit(session: Session, settings: Settings, event: CrmEvent) -> bool:
    """Match a visit event again from the message it shows; True when its link changed."""
    inbound_id = (event.details or {}).get("updated_by_message")
    payload = session.scalar(select(InboundMessage.payload).where(InboundMessage.id == inbound_id))
    if not isinstance(payload, dict):
        return False
    before = (event.customer_id, event.contact_id, event.link_state, event.seller_id)
    apply_visit_parties(session, settings, event, payload)
    return before != (event.customer_id, event.contact_id, event.link_state, event.seller_id)


def find_contact(session: Session, reference: str, customer_id: int | None) -> Contact | None:
    """A contact by any of their addresses, or by full name (within the customer when known)."""
    query = select(Contact).order_by(Contact.id)
    if "@" in reference:
        address = reference.lower()
        query = query.where(
            or_(
                Contact.id.in_(
                    select(ContactEmail.contact_id).where(ContactEmail.email == address)
                ),
                func.lower(Contact.email) == address,
            )
        )
    else:
        query = query.where(Contact.name == reference)
    if customer_id is not None:
        query = query.where(Contact.customer_id == customer_id)
    return session.scalars(query).first()


def _store_documents(
    session: Session, settings: Settings, event: CrmEvent, message: dict[str, Any]
) -> None:
    # The memo document is the visit's current memo: an updated visit replaces the earlier one.
    memo_digest = hashlib.sha256((message.get("memo") or "").encode("utf-8")).hexdigest()
    session.execute(
        delete(EventDocument).where(
            EventDocument.event_id == event.id,
            EventDocument.role == "memo",
            or_(EventDocument.sha256.is_(None), EventDocument.sha256 != memo_digest),
        )
    )
    if message.get("memo"):
        attach(
            session,
            settings,
            event.id,
            content=message["memo"].encode("utf-8"),
            filename="memo.txt",
            declared_type="text/plain",
            role="memo",
        )
    # Photos and files already attached are kept; new ones are added (attach is idempotent).
    for attachment in message.get("attachments", []):
        attach(
            session,
            settings,
            event.id,
            content=attachment["content_b64"],
            filename=attachment["filename"],
            declared_type=attachment.get("media_type"),
            role="photo" if attachment.get("media_type", "").startswith("image/") else "attachment",
        )
