"""Ingest of ``crm.party/1`` master data: customers, contacts and staff, upserted by natural key.

References to parties that have not arrived yet (a customer's seller, a staff member's manager,
a contact's customer) create placeholders that the party's own message later fills in, so the
order in which the ERP sends its messages does not matter.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.parties import Contact, Customer, CustomerDomain, PartyPhone, Staff
from models.schemas.party import SCHEMA, load_party_message
from tasks.context import StageContext
from tasks.match import normalise_phone
from tasks.store import StageResult, record_inbound, upsert_key
from workers.base import CrmTask


def ingest_party(session: Session, ctx: StageContext, payload: Any) -> StageResult:
    message = load_party_message(payload)
    kind = message["kind"]
    natural = {
        "staff": lambda m: m["username"],
        "customer": lambda m: m["customer_number"],
        "contact": lambda m: f"{m['customer_number']}/{(m.get('email') or m['name']).lower()}",
    }[kind](message)
    inbound = record_inbound(
        session,
        idempotency_key=upsert_key("party", ctx, payload),
        schema=SCHEMA,
        source_kind=f"party.{kind}",
        source_system=message["source_system"],
        source_id=natural,
        payload=payload,
    )
    if inbound is None:
        return StageResult("duplicate", detail="this party message was already accepted")
    upsert = {"staff": upsert_staff, "customer": upsert_customer, "contact": upsert_contact}[kind]
    detail = upsert(session, ctx.settings, message)
    return StageResult("done", detail=detail)


def ensure_staff(session: Session, username: str) -> Staff:
    staff = session.scalar(select(Staff).where(Staff.username == username))
    if staff is None:
        staff = Staff(username=username, name=username, placeholder=True)
        session.add(staff)
        session.flush()
    return staff


def ensure_customer(session: Session, number: str) -> Customer:
    customer = session.scalar(select(Customer).where(Customer.customer_number == number))
    if customer is None:
        customer = Customer(customer_number=number, name=number, placeholder=True)
        session.add(customer)
        session.flush()
    return customer


def replace_phones(
    session: Session, settings: Settings, phones: list[str], **owner: int
) -> list[str]:
    """Make the owner's phone rows exactly ``phones``; returns the numbers that did not parse."""
    ((column, owner_id),) = owner.items()
    session.execute(delete(PartyPhone).where(getattr(PartyPhone, column) == owner_id))
    unparsed = []
    for raw in phones:
        e164 = normalise_phone(raw, settings.phone_region)
        if e164 is None:
            unparsed.append(raw)
            continue
        session.add(PartyPhone(e164=e164, raw=raw, **owner))
    return unparsed


def upsert_staff(session: Session, settings: Settings, message: dict[str, Any]) -> str:
    staff = ensure_staff(session, message["username"])
    staff.name = message["name"]
    staff.email = (message.get("email") or "").lower() or None
    staff.extension = message.get("extension")
    staff.role = message["role"]
    staff.time_zone = message["time_zone"]
    staff.active = message["active"]
    staff.placeholder = False
    staff.manager_id = (
        ensure_staff(session, message["manager"]).id if message.get("manager") else None
    )
    unparsed = replace_phones(session, settings, message["phones"], staff_id=staff.id)
    return _detail(f"staff {staff.username}", unparsed)


def upsert_customer(session: Session, settings: Settings, message: dict[str, Any]) -> str:
    customer = ensure_customer(session, message["customer_number"])
    customer.name = message["name"]
    customer.placeholder = False
    customer.seller_id = (
        ensure_staff(session, message["seller"]).id if message.get("seller") else None
    )
    session.execute(delete(CustomerDomain).where(CustomerDomain.customer_id == customer.id))
    skipped = []
    for domain in sorted({d.strip().lower() for d in message["email_domains"]}):
        if domain in settings.free_mail_domains:
            skipped.append(domain)  # a free-mail domain never identifies a company
            continue
        session.add(CustomerDomain(domain=domain, customer_id=customer.id))
    unparsed = replace_phones(session, settings, message["phones"], customer_id=customer.id)
    detail = _detail(f"customer {customer.customer_number}", unparsed)
    if skipped:
        detail += f"; free-mail domains not used for matching: {', '.join(skipped)}"
    return detail


def upsert_contact(session: Session, settings: Settings, message: dict[str, Any]) -> str:
    customer = ensure_customer(session, message["customer_number"])
    email = (message.get("email") or "").lower() or None
    key = email or f"name:{message['name']}"
    contact = session.scalar(
        select(Contact).where(Contact.customer_id == customer.id, Contact.contact_key == key)
    )
    if contact is None:
        contact = Contact(customer_id=customer.id, contact_key=key, name=message["name"])
        session.add(contact)
    contact.name = message["name"]
    contact.email = email
    session.flush()
    unparsed = replace_phones(session, settings, message["phones"], contact_id=contact.id)
    return _detail(f"contact {contact.name} of {customer.customer_number}", unparsed)


def _detail(what: str, unparsed: list[str]) -> str:
    if unparsed:
        return f"{what}; phone numbers that are not public numbers were ignored: {unparsed}"
    return what


@shared_task(name="crm.ingest.party", base=CrmTask, bind=True)
def ingest_party_task(self: CrmTask, message: Any) -> str:
    """crm.ingest.party: one customer, contact or staff upsert (DESIGN §5)."""
    return self.run_ingest(ingest_party, message)
