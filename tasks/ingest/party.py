"""Ingest of ``crm.party/1`` master data: customers, contacts and staff, upserted by natural key.

References to parties that have not arrived yet (a customer's seller, a staff member's manager,
a contact's customer) create placeholders that the party's own message later fills in, so the
order in which the ERP sends its messages does not matter. When a contact or customer gains (or
loses) a phone number, address or domain, the unlinked and ambiguous events that this explains
are re-linked in the same transaction (``tasks.relink``); the task refreshes their sellers after
the commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.parties import Contact, ContactEmail, Customer, CustomerDomain, PartyPhone, Staff
from models.schemas.party import SCHEMA, load_party_message
from tasks.context import StageContext
from tasks.erasure import refuse_erased
from tasks.maintenance import recount_seller
from tasks.match import forget_internal_numbers, normalise_phone
from tasks.relink import relink_for_keys
from tasks.store import PartyKey, StageResult, record_inbound, upsert_key


@dataclass
class PartyStageResult(StageResult):
    """The stage's result plus the events the change re-linked."""

    relinked: list[int] = field(default_factory=list)


@dataclass
class PartyChange:
    """What an upsert did: its summary and the party keys it added or removed."""

    detail: str
    keys: set[PartyKey] = field(default_factory=set)
    #: Sellers whose tallies were recounted (their time zone changed).
    recounted: set[int] = field(default_factory=set)


def ingest_party(session: Session, ctx: StageContext, payload: Any) -> PartyStageResult:
    message = load_party_message(payload)
    kind = message["kind"]
    inbound = record_inbound(
        session,
        idempotency_key=upsert_key("party", ctx, payload),
        schema=SCHEMA,
        source_kind=f"party.{kind}",
        source_system=message["source_system"],
        source_id=natural_key(message),
        payload=payload,
    )
    if inbound is None:
        return PartyStageResult("duplicate", detail="this party message was already accepted")
    return apply_party(session, ctx, message)


def natural_key(message: dict[str, Any]) -> str:
    if message["kind"] == "staff":
        return str(message["username"])
    if message["kind"] == "customer":
        return str(message["customer_number"])
    return f"{message['customer_number']}/{(message.get('email') or message['name']).lower()}"


def apply_party(session: Session, ctx: StageContext, message: dict[str, Any]) -> PartyStageResult:
    """Upsert one validated party, then re-link the events its new numbers or addresses explain."""
    upsert = {"staff": upsert_staff, "customer": upsert_customer, "contact": upsert_contact}
    change = upsert[message["kind"]](session, ctx.settings, message)
    relinked = relink_for_keys(session, ctx, change.keys)
    detail = change.detail
    if relinked.event_ids:
        ids = ", ".join(str(i) for i in relinked.event_ids)
        detail += f"; re-linked {len(relinked.event_ids)} event(s): {ids}"
    return PartyStageResult(
        "done",
        detail=detail,
        sellers_to_refresh=relinked.sellers | change.recounted,
        relinked=relinked.event_ids,
    )


def ensure_staff(session: Session, username: str) -> Staff:
    staff = session.scalar(select(Staff).where(Staff.username == username))
    if staff is None:
        staff = Staff(username=username, name=username, placeholder=True)
        session.add(staff)
        session.flush()
    return staff


def ensure_customer(
    session: Session, number: str, created: set[PartyKey] | None = None
) -> Customer:
    """The customer with this number; a placeholder when unknown (its key noted in ``created``)."""
    customer = session.scalar(select(Customer).where(Customer.customer_number == number))
    if customer is None:
        customer = Customer(customer_number=number, name=number, placeholder=True)
        session.add(customer)
        session.flush()
        if created is not None:
            # A visit that named this number before the customer existed can now be linked.
            created.add(PartyKey("customer", number))
    return customer


def replace_phones(
    session: Session, settings: Settings, phones: list[str], **owner: int
) -> tuple[list[str], set[PartyKey]]:
    """Make the owner's phone rows exactly ``phones``.

    Returns the numbers that did not parse and the E.164 numbers gained or lost.
    """
    ((column, owner_id),) = owner.items()
    forget_internal_numbers(session)  # a staff phone may come or go
    before = set(
        session.scalars(select(PartyPhone.e164).where(getattr(PartyPhone, column) == owner_id))
    )
    session.execute(delete(PartyPhone).where(getattr(PartyPhone, column) == owner_id))
    unparsed = []
    after: set[str] = set()
    for raw in phones:
        e164 = normalise_phone(raw, settings.phone_region)
        if e164 is None:
            unparsed.append(raw)
            continue
        session.add(PartyPhone(e164=e164, raw=raw, **owner))
        after.add(e164)
    return unparsed, {PartyKey("phone", n) for n in before ^ after}


def upsert_staff(session: Session, settings: Settings, message: dict[str, Any]) -> PartyChange:
    staff = ensure_staff(session, message["username"])
    staff.name = message["name"]
    staff.email = (message.get("email") or "").lower() or None
    staff.extension = message.get("extension")
    staff.role = message["role"]
    rezoned = staff.time_zone != message["time_zone"]
    staff.time_zone = message["time_zone"]
    # Deactivated: the history stays theirs, new events are no longer assigned to them by the
    # responsible-seller rule (tasks.store.responsible_seller_id).
    staff.active = message["active"]
    staff.placeholder = False
    staff.manager_id = (
        ensure_staff(session, message["manager"]).id if message.get("manager") else None
    )
    unparsed, _ = replace_phones(session, settings, message["phones"], staff_id=staff.id)
    what = f"staff {staff.username}" + ("" if staff.active else " (deactivated)")
    if rezoned:
        # Every event of theirs counts in the periods of their new zone now.
        session.flush()
        if recount_seller(session, staff.id):
            what += f"; tallies recounted in {staff.time_zone}"
            return PartyChange(_detail(what, unparsed), recounted={staff.id})
    return PartyChange(_detail(what, unparsed))


def upsert_customer(session: Session, settings: Settings, message: dict[str, Any]) -> PartyChange:
    refuse_erased(
        session, settings, message, phones=message["phones"], customer=message["customer_number"]
    )
    keys: set[PartyKey] = set()
    customer = ensure_customer(session, message["customer_number"], keys)
    customer.name = message["name"]
    customer.placeholder = False
    customer.seller_id = (
        ensure_staff(session, message["seller"]).id if message.get("seller") else None
    )
    before = set(
        session.scalars(
            select(CustomerDomain.domain).where(CustomerDomain.customer_id == customer.id)
        )
    )
    session.execute(delete(CustomerDomain).where(CustomerDomain.customer_id == customer.id))
    skipped = []
    after: set[str] = set()
    for domain in sorted({d.strip().lower() for d in message["email_domains"]}):
        if domain in settings.free_mail_domains:
            skipped.append(domain)  # a free-mail domain never identifies a company
            continue
        session.add(CustomerDomain(domain=domain, customer_id=customer.id))
        after.add(domain)
    keys |= {PartyKey("domain", d) for d in before ^ after}
    unparsed, phone_keys = replace_phones(
        session, settings, message["phones"], customer_id=customer.id
    )
    detail = _detail(f"customer {customer.customer_number}", unparsed)
    if skipped:
        detail += f"; free-mail domains not used for matching: {', '.join(skipped)}"
    return PartyChange(detail, keys | phone_keys)


def upsert_contact(session: Session, settings: Settings, message: dict[str, Any]) -> PartyChange:
    refuse_erased(
        session,
        settings,
        message,
        phones=message["phones"],
        emails=[message.get("email"), *message["emails"]],
        contacts=[(message["customer_number"], message["name"])],
    )
    keys: set[PartyKey] = set()
    customer = ensure_customer(session, message["customer_number"], keys)
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
    keys |= replace_emails(session, contact, [email, *message["emails"]])
    unparsed, phone_keys = replace_phones(
        session, settings, message["phones"], contact_id=contact.id
    )
    return PartyChange(
        _detail(f"contact {contact.name} of {customer.customer_number}", unparsed),
        keys | phone_keys,
    )


def replace_emails(
    session: Session, contact: Contact, addresses: list[str | None]
) -> set[PartyKey]:
    """Make the contact's addresses exactly ``addresses`` (the primary first); returns the
    addresses gained or lost."""
    before = set(
        session.scalars(select(ContactEmail.email).where(ContactEmail.contact_id == contact.id))
    )
    after = {a.strip().lower() for a in addresses if a and a.strip()}
    for address in before - after:
        session.execute(
            delete(ContactEmail).where(
                ContactEmail.contact_id == contact.id, ContactEmail.email == address
            )
        )
    for address in sorted(after - before):
        session.add(ContactEmail(contact_id=contact.id, email=address))
    session.flush()
    return {PartyKey("email", a) for a in before ^ after}


def _detail(what: str, unparsed: list[str]) -> str:
    if unparsed:
        return f"{what}; phone numbers that are not public numbers were ignored: {unparsed}"
    return what
