"""Ingest of ``crm.email/1``: a forwarded memo, a BCC'd email or a customer's mail as an event.

Who is who: a staff member forwarding a customer's email is the seller and the original sender
is the customer side (the original's date is the event time, the forwarder's text the memo); a
staff sender (BCC, the CRM address only in the envelope) is the seller and the recipients are
the customer side; otherwise the sender is the customer side.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from celery import shared_task
from sqlalchemy import select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.base import utcnow
from models.events import CrmEvent
from models.parties import Customer
from models.schemas.common import load_message
from models.schemas.email import SCHEMA, EmailMessageSchema
from tasks.attach import attach, read_blob
from tasks.classify import ClassificationRequest, classify
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.email_parse import ParsedEmail, parse_email, raw_hash
from tasks.match import customer_by_number, find_staff, match_addresses
from tasks.periods import aware
from tasks.store import (
    StageResult,
    add_participants,
    lock_event,
    record_inbound,
    set_properties,
    tally_keys,
    touch_tallies,
)
from workers.base import CrmTask

#: "Asiakas: 10001", "Asiakasnumero 10001", "Customer #10001", "Customer no. 10001".
CUSTOMER_NUMBER = re.compile(
    r"\b(?:asiakas(?:numero|nro)?|customer(?:\s+(?:no\.?|number))?)\s*[:#]?\s*(\d{3,12})\b",
    re.IGNORECASE,
)

#: Emails are one event per Message-ID whichever gateway or mailbox delivered them.
EMAIL_SOURCE_SYSTEM = "email"


def crm_tag(address: str, settings: Settings) -> str | None:
    """``crm+visit@x`` -> ``visit`` when ``crm@x`` is a CRM address; ``""`` for ``crm@x``."""
    local, _, domain = address.lower().partition("@")
    base, plus, tag = local.partition("+")
    if f"{base}@{domain}" not in settings.crm_addresses:
        return None
    return tag if plus else ""


def ingest_email(session: Session, ctx: StageContext, payload: Any) -> StageResult:
    message = load_message(EmailMessageSchema(), payload, SCHEMA)
    settings = ctx.settings
    if message.get("raw_ref"):
        raw = read_blob(session, settings, message["raw_ref"])
        if raw is None:
            raise BadInput(f"raw_ref {message['raw_ref']} is not a stored document")
    else:
        raw = message["raw_b64"]
    if len(raw) > settings.max_email_bytes:
        raise BadInput(
            f"email of {len(raw)} bytes is over the {settings.max_email_bytes}-byte limit"
        )
    digest = raw_hash(raw)
    parsed = parse_email(raw, settings.zone)
    message["received_at"] = aware(
        message.get("received_at"), settings.zone, parsed.notes, "received_at"
    )
    if parsed.auto_reply:
        raise BadInput(parsed.auto_reply, {"headers": [parsed.auto_reply]})
    message_id = parsed.message_id or f"sha256:{digest}"

    ledger_payload = {k: v for k, v in payload.items() if k != "raw_b64"} | {"raw_sha256": digest}
    inbound = record_inbound(
        session,
        idempotency_key=f"email:{digest}",
        schema=SCHEMA,
        source_kind="email",
        source_system=message["source_system"],
        source_id=message_id,
        payload=ledger_payload,
    )
    if inbound is None:
        return StageResult("duplicate", detail="these exact bytes were already accepted")

    event, created = lock_event(
        session,
        source_system=EMAIL_SOURCE_SYSTEM,
        source_kind="email",
        source_id=message_id,
        defaults={
            "category_code": "crm_event",
            "class_code": "events",
            "type_code": "crm_event",
            "occurred_at": parsed.date or message.get("received_at") or utcnow(),
        },
    )
    inbound.event_id = event.id
    if not created:
        # The same email through a second mailbox or gateway: one event, nothing counted twice.
        return StageResult("duplicate", event.id, "an event for this Message-ID exists")

    notes = list(parsed.notes)
    if not parsed.message_id:
        notes.append("no Message-ID: identified by the SHA-256 of the raw bytes")
    apply_email(session, ctx, event, parsed, message, notes)
    attach(
        session,
        settings,
        event.id,
        content=raw,
        filename="message.eml",
        declared_type="message/rfc822",
        role="raw_message",
        # Already within max_email_bytes: the source of truth is kept whatever the attachment cap.
        max_bytes=max(settings.max_email_bytes, settings.max_attachment_bytes),
    )
    for item in _all_attachments(parsed):
        attach(
            session,
            settings,
            event.id,
            content=item.content,
            filename=item.filename,
            declared_type=item.content_type,
            role="attachment",
        )
    session.flush()
    return StageResult(
        "stored",
        event.id,
        "created",
        sellers_to_refresh=touch_tallies(session, tally_keys(session, event)),
    )


def _all_attachments(parsed: ParsedEmail) -> Iterable[Any]:
    yield from parsed.attachments
    if parsed.forwarded is not None:
        yield from _all_attachments(parsed.forwarded)


def apply_email(
    session: Session,
    ctx: StageContext,
    event: CrmEvent,
    parsed: ParsedEmail,
    message: dict[str, Any],
    notes: list[str],
) -> None:
    settings = ctx.settings
    sender = parsed.from_[1] if parsed.from_ else (message.get("mail_from") or "").lower()
    recipients = [a for _, a in parsed.to + parsed.cc]
    envelope = [a.lower() for a in message.get("rcpt_to", [])]

    tags = [t for a in recipients + envelope if (t := crm_tag(a, settings))]
    rule_category = dict(settings.plus_address_categories).get(tags[0]) if tags else None

    sender_staff = find_staff(session, sender, settings) if sender else None
    original = parsed.forwarded
    staff_ids = {sender_staff.id} if sender_staff else set()
    if original is not None and sender_staff is not None:
        outside = [original.from_[1]] if original.from_ else []
        outside += [a for _, a in original.to + original.cc]
        occurred = original.date or parsed.date
        subject = original.subject or parsed.subject
        memo = parsed.forward_memo
        body = "\n\n".join(p for p in (memo, original.text) if p)
        thread = original.thread_root or parsed.thread_root
        how = f"forwarded by {sender_staff.username}"
    else:
        outside = recipients if sender_staff is not None else [sender]
        outside += [] if sender_staff is not None else recipients
        occurred = parsed.date
        subject = parsed.subject
        memo = ""
        body = parsed.text
        thread = parsed.thread_root
        how = "sent by staff" if sender_staff is not None else "sent by the customer side"

    customer_side = []
    for address in outside:
        if crm_tag(address, settings) is not None:
            continue
        staff = find_staff(session, address, settings)
        if staff is not None:
            staff_ids.add(staff.id)
        elif address not in customer_side:
            customer_side.append(address)
    match = match_addresses(session, customer_side, settings)
    if match.customer_id is None:
        # A staff memo to the CRM address names the customer in its text ("Asiakas: 10001").
        for number in CUSTOMER_NUMBER.findall(f"{subject}\n{memo or body}"):
            customer = customer_by_number(session, number)
            if customer is not None:
                match.customer_id, match.state = customer.id, "linked"
                match.notes.append(f"customer number {number} named in the text")
                break

    seller_id = sender_staff.id if sender_staff else None
    if seller_id is None:
        others = [s for s in staff_ids if s is not None]
        seller_id = min(others) if others else None
    if seller_id is None and match.customer_id is not None:
        seller_id = session.scalar(
            select(Customer.seller_id).where(Customer.id == match.customer_id)
        )
        match.notes.append("no staff member involved: assigned to the customer's seller")

    classification = classify(
        session,
        ClassificationRequest(
            source_kind="email",
            rule_category=rule_category,
            rule_reason=f"recipient plus-address +{tags[0]}" if tags else "",
        ),
    )
    if occurred is None:
        occurred = message.get("received_at") or event.occurred_at
        notes.append("no readable date: the time received is used")
    event.occurred_at = occurred
    event.subject = subject[:2000]
    event.body = body
    event.direction = "outbound" if sender_staff is not None and original is None else "inbound"
    event.status = "received"
    event.thread_key = thread
    event.category_code = classification.category
    event.class_code = classification.class_code
    event.type_code = classification.type_code
    event.classification_note = classification.note
    event.customer_id = match.customer_id
    event.contact_id = match.contact_id
    event.link_state = match.state
    event.candidates = match.candidates
    event.seller_id = seller_id
    event.match_note = "; ".join([how, *match.notes, *notes])
    event.details = {
        "gateway": message["source_system"],
        "from": sender,
        "to": recipients,
        "rcpt_to": envelope,
        "contact_ids": [c for c in [match.contact_id, *match.other_contact_ids] if c],
        "message_id": parsed.message_id,
        "original_message_id": original.message_id if original else None,
    }
    session.flush()
    set_properties(session, event, classification.properties)
    add_participants(session, event, [*staff_ids, seller_id])
    if memo:
        attach(
            session,
            settings,
            event.id,
            content=memo.encode("utf-8"),
            filename="memo.txt",
            declared_type="text/plain",
            role="memo",
        )


@shared_task(name="crm.ingest.email", base=CrmTask, bind=True)
def ingest_email_task(self: CrmTask, message: Any) -> str:
    """crm.ingest.email: one raw email with its envelope (DESIGN §5)."""
    return self.run_ingest(ingest_email, message)
