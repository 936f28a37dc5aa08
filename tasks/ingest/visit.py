"""Ingest of ``crm.visit/1`` customer visits: one event per visit id, updated by later messages."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from celery import shared_task
from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.documents import EventDocument
from models.parties import Contact, Customer
from models.schemas.common import load_message
from models.schemas.visit import SCHEMA, VisitMessageSchema
from tasks.attach import attach
from tasks.classify import ClassificationRequest, classify
from tasks.context import StageContext
from tasks.match import customer_by_number, find_staff
from tasks.periods import aware
from tasks.store import (
    StageResult,
    add_participants,
    lock_event,
    record_inbound,
    set_properties,
    tally_keys,
    touch_tallies,
    upsert_key,
)
from workers.base import CrmTask


def ingest_visit(session: Session, ctx: StageContext, payload: Any) -> StageResult:
    message = load_message(VisitMessageSchema(), payload, SCHEMA)
    settings = ctx.settings
    ledger_payload = {
        **payload,
        "attachments": [
            {k: v for k, v in a.items() if k != "content_b64"}
            for a in payload.get("attachments", [])
        ],
    }
    inbound = record_inbound(
        session,
        idempotency_key=upsert_key("visit", ctx, payload),
        schema=SCHEMA,
        source_kind="visit",
        source_system=message["source_system"],
        source_id=message["visit_id"],
        payload=ledger_payload,
    )
    if inbound is None:
        return StageResult("duplicate", detail="this visit message was already accepted")

    notes: list[str] = []
    # The schema makes started_at a required datetime; ended_at may be missing or null.
    started_at: datetime = message["started_at"]
    ended_at: datetime | None = message.get("ended_at")
    started = aware(started_at, settings.zone, notes, "started_at")
    ended = aware(ended_at, settings.zone, notes, "ended_at")
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
    before = tally_keys(session, event)

    match_notes: list[str] = []
    seller = find_staff(session, message["seller"], settings)
    if seller is None:
        match_notes.append(f"seller {message['seller']!r} is not a known staff member")
    customer = customer_by_number(session, message.get("customer_number"))
    if customer is None and message.get("customer_number"):
        match_notes.append(f"unknown customer_number {message['customer_number']!r}")
    contact_ids: list[int] = []
    participants = [seller.id if seller else None]
    for reference in [*message.get("contacts", []), *message.get("attendees", [])]:
        staff = find_staff(session, reference, settings)
        if staff is not None:
            participants.append(staff.id)
            continue
        contact = _find_contact(session, reference, customer.id if customer else None)
        if contact is None:
            match_notes.append(f"attendee {reference!r} not found")
            continue
        if customer is None:
            customer = session.get_one(Customer, contact.customer_id)
        if contact.id not in contact_ids:
            contact_ids.append(contact.id)

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
    event.status = "cancelled" if message["cancelled"] else "done"
    event.cancelled = message["cancelled"]
    event.category_code = classification.category
    event.class_code = classification.class_code
    event.type_code = classification.type_code
    event.classification_note = classification.note
    if event.linked_by != "hand":
        event.customer_id = customer.id if customer else None
        event.contact_id = contact_ids[0] if contact_ids else None
        event.link_state = "linked" if customer else "unlinked"
        event.seller_id = seller.id if seller else (customer.seller_id if customer else None)
    event.match_note = "; ".join(match_notes + notes)
    event.details = {
        **event.details,
        "location": message.get("location"),
        "contact_ids": contact_ids,
        "updated_by_message": inbound.id,
    }
    event.updated_at = utcnow()
    inbound.event_id = event.id
    session.flush()
    set_properties(session, event, classification.properties)
    add_participants(session, event, participants)
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
    session.flush()
    sellers = touch_tallies(session, before | tally_keys(session, event))
    return StageResult(
        "stored", event.id, "created" if created else "updated", sellers_to_refresh=sellers
    )


def _find_contact(session: Session, reference: str, customer_id: int | None) -> Contact | None:
    query = select(Contact).order_by(Contact.id)
    if "@" in reference:
        query = query.where(func.lower(Contact.email) == reference.lower())
    else:
        query = query.where(Contact.name == reference)
    if customer_id is not None:
        query = query.where(Contact.customer_id == customer_id)
    return session.scalars(query).first()


@shared_task(name="crm.ingest.visit", base=CrmTask, bind=True)
def ingest_visit_task(self: CrmTask, message: Any) -> str:
    """crm.ingest.visit: one customer visit report (DESIGN §5)."""
    return self.run_ingest(ingest_visit, message)
