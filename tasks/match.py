"""Match stage: phone numbers and email addresses to staff, contacts and customers.

Our own numbers and extensions are staff, never customers. A number or address that fits several
contacts gives one ambiguous match with every candidate, never a copy per contact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import phonenumbers
from sqlalchemy import BindParameter, Row, bindparam, case, func, or_, select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.parties import Contact, ContactEmail, Customer, CustomerDomain, PartyPhone, Staff


@dataclass
class PartyMatch:
    """Who on the customer side an event concerns, and how sure we are."""

    customer_id: int | None = None
    contact_id: int | None = None
    #: Further contacts involved (an email to two people of the same customer).
    other_contact_ids: list[int] = field(default_factory=list)
    #: linked | unlinked | ambiguous
    state: str = "unlinked"
    candidates: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def copy(self) -> PartyMatch:
        """A copy whose lists are its own (``dataclasses.replace`` costs three times more)."""
        return PartyMatch(
            customer_id=self.customer_id,
            contact_id=self.contact_id,
            other_contact_ids=list(self.other_contact_ids),
            state=self.state,
            candidates=list(self.candidates),
            notes=list(self.notes),
        )


def normalise_phone(raw: str | None, region: str) -> str | None:
    """E.164 for a real phone number; None for extensions, junk and empty values."""
    if not raw:
        return None
    return _normalised(raw, region)


@lru_cache(maxsize=8192)
def _normalised(raw: str, region: str) -> str | None:
    """Parsing a number costs more than the rest of matching a call: a backfill's numbers and
    our own repeat, so each is parsed once per process (a pure function of its arguments)."""
    digits = "".join(ch for ch in raw if ch.isdigit())
    if len(digits) < 6:  # an extension such as "201" is never a public number
        return None
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def own_numbers(settings: Settings) -> frozenset[str]:
    return _own_numbers(tuple(settings.own_numbers), settings.phone_region)


@lru_cache(maxsize=64)
def _own_numbers(raw: tuple[str, ...], region: str) -> frozenset[str]:
    return frozenset(n for number in raw if (n := normalise_phone(number, region)))


def find_staff(session: Session, reference: str | None, settings: Settings) -> Staff | None:
    """Staff by username, email, extension or phone number (in that order), in one query."""
    if not reference:
        return None
    ref = reference.strip()
    e164 = normalise_phone(ref, settings.phone_region)
    query = _staff_query("@" in ref, ref.isdigit() and len(ref) < 6, e164 is not None)
    found = session.scalar(query, {"ref": ref, "lowered": ref.lower(), "e164": e164})
    if found is not None:
        # The session's identity map holds objects weakly: kept here, the seller's zone and name
        # are read later in the transaction (tallies, participants) without querying again.
        session.info.setdefault(_STAFF_SEEN, []).append(found)
    return found


def find_staff_many(
    session: Session, references: Iterable[str | None], settings: Settings
) -> dict[str, Staff | None]:
    """``find_staff`` of several references in one query: each reference as given to what
    ``find_staff`` would find for it (username, email, extension, phone; the lowest id)."""
    refs = {reference: reference.strip() for reference in references if reference}
    if not refs:
        return {}
    ways: dict[str, tuple[str | None, str | None, str | None]] = {}
    for reference, ref in refs.items():
        e164 = normalise_phone(ref, settings.phone_region)
        ways[reference] = (
            ref.lower() if "@" in ref else None,
            ref if ref.isdigit() and len(ref) < 6 else None,
            e164,
        )
    values = {
        "usernames": sorted(set(refs.values())),
        "emails": sorted({w[0] for w in ways.values() if w[0]}) or [""],
        "extensions": sorted({w[1] for w in ways.values() if w[1]}) or [""],
        "phones": sorted({w[2] for w in ways.values() if w[2]}) or [""],
    }
    phones: dict[int, set[str]] = {}
    staff: dict[int, Staff] = {}
    for member, e164 in session.execute(_STAFF_MANY, values):
        staff[member.id] = member
        if e164:
            phones.setdefault(member.id, set()).add(e164)
    found: dict[str, Staff | None] = {}
    for reference, ref in refs.items():
        email, extension, e164 = ways[reference]
        ranked = []
        for member in staff.values():
            if member.username == ref:
                rank = 0
            elif email and member.email and member.email.lower() == email:
                rank = 1
            elif extension and member.extension == extension:
                rank = 2
            elif e164 and e164 in phones.get(member.id, ()):
                rank = 3
            else:
                continue
            ranked.append((rank, member.id, member))
        found[reference] = min(ranked)[2] if ranked else None
    kept = [member for member in found.values() if member is not None]
    session.info.setdefault(_STAFF_SEEN, []).extend(kept)  # as find_staff does
    return found


_STAFF_MANY = (
    select(Staff, PartyPhone.e164)
    .outerjoin(
        PartyPhone,
        (PartyPhone.staff_id == Staff.id)
        & PartyPhone.e164.in_(bindparam("phones", expanding=True)),
    )
    .where(
        or_(
            Staff.username.in_(bindparam("usernames", expanding=True)),
            func.lower(Staff.email).in_(bindparam("emails", expanding=True)),
            Staff.extension.in_(bindparam("extensions", expanding=True)),
            Staff.id.in_(
                select(PartyPhone.staff_id).where(
                    PartyPhone.e164.in_(bindparam("phones", expanding=True)),
                    PartyPhone.staff_id.is_not(None),
                )
            ),
        )
    )
)


@lru_cache(maxsize=8)
def _staff_query(by_email: bool, by_extension: bool, by_phone: bool) -> Any:
    """``find_staff``'s query for a reference of this shape, built once: building it cost
    more than running it."""
    ref: BindParameter[str] = bindparam("ref")
    ways: list[Any] = [Staff.username == ref]
    if by_email:
        ways.append(func.lower(Staff.email) == bindparam("lowered"))
    if by_extension:
        ways.append(Staff.extension == ref)
    if by_phone:
        ways.append(
            Staff.id.in_(
                select(PartyPhone.staff_id).where(
                    PartyPhone.e164 == bindparam("e164"), PartyPhone.staff_id.is_not(None)
                )
            )
        )
    priority = case(*[(way, rank) for rank, way in enumerate(ways)], else_=len(ways))
    return select(Staff).where(or_(*ways)).order_by(priority, Staff.id).limit(1)


_STAFF_SEEN = "crm.staff_seen"


def find_staff_by_addresses(session: Session, addresses: Iterable[str]) -> dict[str, Staff | None]:
    """Staff for each email address in one query: by username, else by email (any case).

    The order is ``find_staff``'s for references with an ``@``; an email address is never
    read as a phone number or an extension here. Keys are the addresses as given.
    """
    refs = {address: address.strip() for address in addresses if address and address.strip()}
    if not refs:
        return {}
    values = {
        "usernames": sorted(set(refs.values())),
        "emails": sorted({r.lower() for r in refs.values()}),
    }
    rows = session.scalars(_STAFF_BY_ADDRESS, values).all()
    by_username: dict[str, Staff] = {}
    by_email: dict[str, Staff] = {}
    for staff in rows:  # lowest id first: setdefault keeps it
        by_username.setdefault(staff.username, staff)
        if staff.email:
            by_email.setdefault(staff.email.lower(), staff)
    return {
        address: by_username.get(ref) or by_email.get(ref.lower()) for address, ref in refs.items()
    }


_STAFF_BY_ADDRESS = (
    select(Staff)
    .where(
        or_(
            Staff.username.in_(bindparam("usernames", expanding=True)),
            func.lower(Staff.email).in_(bindparam("emails", expanding=True)),
        )
    )
    .order_by(Staff.id)
)


#: Reads a number's ``party_phone`` rows (``phone_owners``), for a caller that asks twice.
PhoneOwners = Callable[[str], Sequence[tuple[Any, ...]]]


def is_internal_number(
    session: Session,
    raw: str | None,
    settings: Settings,
    owners: PhoneOwners | None = None,
) -> bool:
    """Our switchboard, an extension or a staff phone: never a customer, never a lead.

    ``owners``: where to read the number's rows of ``party_phone`` (by default
    ``phone_owners``), for a caller that remembers them to match the number next.
    """
    if not raw:
        return False
    e164 = normalise_phone(raw, settings.phone_region)
    if e164 is None:
        digits = "".join(ch for ch in raw if ch.isdigit())
        return bool(digits) and len(digits) < 6
    if e164 in own_numbers(settings):
        return True
    known: dict[str, bool] = session.info.setdefault(INTERNAL_NUMBERS, {})
    if e164 not in known:
        rows = owners(e164) if owners is not None else phone_owners(session, e164)
        known[e164] = any(row[0] is not None for row in rows)
    return known[e164]


def phone_owners(session: Session, e164: str) -> list[tuple[Any, ...]]:
    """Every ``party_phone`` row of the number: (staff, contact, customer, the contact's
    customer, the contact's name); whether it is a staff phone and whom it matches, at once."""
    return [tuple(row) for row in session.execute(_PHONE_OWNERS, {"e164": e164})]


#: ``session.info`` key of the numbers found to be staff phones or not, in this session; whatever
#: changes phones forgets them (``forget_internal_numbers``).
INTERNAL_NUMBERS = "crm.internal_numbers"


def forget_internal_numbers(session: Session) -> None:
    session.info.pop(INTERNAL_NUMBERS, None)


def match_phone(
    session: Session,
    raw: str | None,
    settings: Settings,
    owners: PhoneOwners | None = None,
) -> PartyMatch:
    """Contacts and customers by a phone number (``owners``: as in ``is_internal_number``)."""
    result = PartyMatch()
    e164 = normalise_phone(raw, settings.phone_region)
    if e164 is None:
        result.notes.append(f"number {raw!r} is not a public phone number")
        return result
    found = owners(e164) if owners is not None else phone_owners(session, e164)
    rows = [row[1:] for row in found if row[0] is None]  # a staff phone matches no customer
    contacts = sorted({(row[0], row[2], row[3]) for row in rows if row[0] is not None})
    customers = {row[1] for row in rows if row[1] is not None} | {c[1] for c in contacts}
    if len(contacts) == 1:
        result.contact_id, result.customer_id = contacts[0][0], contacts[0][1]
        result.state = "linked"
        result.notes.append(f"number {e164} is contact {contacts[0][2]}")
    elif len(contacts) > 1:
        result.state = "ambiguous"
        result.candidates = [{"contact_id": c[0], "name": c[2]} for c in contacts]
        if len(customers) == 1:
            result.customer_id = next(iter(customers))
        names = ", ".join(c[2] for c in contacts)
        result.notes.append(f"number {e164} is shared by {len(contacts)} contacts: {names}")
    elif len(customers) == 1:
        result.customer_id = next(iter(customers))
        result.state = "linked"
        result.notes.append(f"number {e164} is a customer's number (no contact)")
    elif len(customers) > 1:
        result.state = "ambiguous"
        result.candidates = [{"customer_id": c} for c in sorted(customers)]
        result.notes.append(f"number {e164} belongs to {len(customers)} customers")
    else:
        result.notes.append(f"number {e164} matches no contact or customer")
    return result


_PHONE_OWNERS = (
    select(
        PartyPhone.staff_id,
        PartyPhone.contact_id,
        PartyPhone.customer_id,
        Contact.customer_id,
        Contact.name,
    )
    .outerjoin(Contact, Contact.id == PartyPhone.contact_id)
    .where(PartyPhone.e164 == bindparam("e164"))
)


def email_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def match_addresses(session: Session, addresses: Iterable[str], settings: Settings) -> PartyMatch:
    """Contacts by any of their addresses (case-insensitive), then customers by domain; the
    first wins."""
    result = PartyMatch()
    contacts: list[Row[int, int, str]] = []
    domain_customers: list[int] = []
    for address in addresses:
        lowered = address.lower()
        found = session.execute(
            select(Contact.id, Contact.customer_id, Contact.name)
            .where(
                # A contact's further addresses (contact_email) match as well as the primary one.
                or_(
                    func.lower(Contact.email) == lowered,
                    Contact.id.in_(
                        select(ContactEmail.contact_id).where(ContactEmail.email == lowered)
                    ),
                )
            )
            .order_by(Contact.id)
        ).all()
        if len(found) > 1:
            result.candidates.extend({"contact_id": c.id, "name": c.name} for c in found)
            result.notes.append(f"{lowered} is the address of {len(found)} contacts")
        if found:
            if found[0].id not in {c.id for c in contacts}:
                contacts.append(found[0])
            continue
        domain = email_domain(lowered)
        if domain in settings.free_mail_domains:
            result.notes.append(f"{domain} is a free-mail domain: never matched to a company")
            continue
        for customer_id in session.scalars(
            select(CustomerDomain.customer_id).where(CustomerDomain.domain == domain)
        ):
            if customer_id not in domain_customers:
                domain_customers.append(customer_id)
    if contacts:
        primary = contacts[0]
        result.contact_id, result.customer_id = primary.id, primary.customer_id
        result.other_contact_ids = [
            c.id for c in contacts[1:] if c.customer_id == primary.customer_id
        ]
        result.state = "ambiguous" if result.candidates else "linked"
        result.notes.append(f"address of contact {primary.name}")
    elif domain_customers:
        result.customer_id = domain_customers[0]
        result.state = "linked"
        if len(domain_customers) > 1:
            result.state = "ambiguous"
            result.candidates = [{"customer_id": c} for c in domain_customers]
        result.notes.append("matched by the customer's email domain")
    else:
        result.notes.append("no contact or customer domain matches")
    return result


def customer_by_number(session: Session, number: str | None) -> Customer | None:
    if not number:
        return None
    return session.scalar(select(Customer).where(Customer.customer_number == number))
