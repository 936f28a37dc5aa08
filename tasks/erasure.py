"""Erasure of a person's personal data (GDPR article 17): ``crm-events erase``.

A person is found as a contact (customer number and name), a customer (a sole trader, with all
of its contacts), a phone number or an email address. What is known of them (names, addresses,
numbers) becomes a set of patterns, each matching every form the data arrives in: a number with
or without its country code, with spaces, dashes or brackets; a name in either order; an address
in any case. Then, in one transaction:

1. the master data goes: the contact is renamed ``erased contact #N`` (its events keep their
   link, so counts, tallies and reports do not change), its addresses and numbers are deleted,
   as are the events' party keys and the leads under those numbers and addresses;
2. the documents that are theirs go: the raw emails, recordings and attachments of the calls,
   emails and meeting invitations in which they are the other party, and the text documents (an
   email, a memo, a calendar file) of events naming them that name them too. Each stays listed
   on its event as a stub with a note; the bytes go once nothing refers to them;
3. every text and JSON column of every table (subjects, bodies, notes, the ledger's payloads,
   rejected and failed messages, seller views, delivery details) is searched with the patterns
   and each match replaced with ``[erased name]``, ``[erased address]`` or ``[erased number]``;
   payloads kept by reference in the document store are rewritten likewise;
4. the erasure is recorded (when, by whom, the kinds of data, the rows changed per table: no
   personal data), with keyed hashes of the identifiers, so that a later message naming them is
   refused instead of bringing them back (``refusal``).

``dry_run`` does all of this in the caller's transaction, which the caller rolls back: the report
then lists what would go, per table and document.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import hmac
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import phonenumbers
from sqlalchemy import JSON, String, Table, Text, cast, delete, or_, select, update
from sqlalchemy.orm import Session

from config.settings import Settings
from models.access import ServiceKey
from models.base import Base, utcnow
from models.db import is_postgresql
from models.documents import EventDocument
from models.events import CrmEvent
from models.invalid import BadInput
from models.ledger import FailedMessage, RejectedMessage
from models.mail import EmailSenderWindow
from models.parties import Contact, ContactEmail, Customer, EventPartyKey, Lead, PartyPhone
from models.privacy import ErasedIdentifier, Erasure
from tasks.access import service_key
from tasks.attach import delete_unreferenced_blobs, read_blob
from tasks.match import normalise_phone

SUBJECTS = ("contact", "customer", "number", "address")
#: What a match is replaced with, by kind of data.
REPLACEMENTS = {"name": "[erased name]", "email": "[erased address]", "phone": "[erased number]"}
#: Tables never searched: secrets, the erasures themselves, the catalogue's codes, the blobs
#: (searched as documents), the staff (the person erased is never one of ours), the numbers and
#: addresses (deleted whole by the master-data step).
SKIPPED_TABLES = frozenset(
    {
        "alembic_version",
        "api_token",
        "service_key",
        "erasure",
        "erased_identifier",
        "document_blob",
        "staff",
        # Numbers and addresses are deleted whole above; a staff member's stay theirs.
        "party_phone",
        "contact_email",
        "category",
        "event_class",
        "event_type",
        "event_property",
    }
)
#: Document roles of a call, an email or an invitation in which the person is the other party.
THEIR_KINDS = ("call", "email", "meeting")
#: Media types whose bytes are searched for the person (as text, or as a parsed email).
TEXT_TYPES = ("text/", "message/", "application/json", "application/ics")
#: Between the digits of a phone number, as written: spaces, dots, dashes, slashes, brackets.
DIGIT_GAP = "[ ./()-]*"


class ErasureError(Exception):
    """The person was not found, or not uniquely."""


@dataclass
class Person:
    """Who is erased, and everything that identifies them."""

    subject: str
    names: list[str] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    contacts: list[Contact] = field(default_factory=list)
    customer: Customer | None = None

    @property
    def data_kinds(self) -> list[str]:
        kinds = [("name", self.names), ("email", self.emails), ("phone", self.phones)]
        return [kind for kind, values in kinds if values]


@dataclass
class ErasureReport:
    dry_run: bool
    subject: str
    data_kinds: list[str]
    counts: Counter[str] = field(default_factory=Counter)
    #: Each document deleted: its id, event and role (not its name, which may name them).
    documents: list[dict[str, Any]] = field(default_factory=list)
    erasure_id: int | None = None
    #: Files of the filesystem store to remove once the transaction has committed.
    files: list[Path] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "erasure": self.erasure_id,
            "subject": self.subject,
            "data_kinds": self.data_kinds,
            "counts": dict(sorted(self.counts.items())),
            "documents": self.documents,
        }


# -- finding the person ----------------------------------------------------------------------


def find_person(session: Session, settings: Settings, subject: str, values: list[str]) -> Person:
    """The person ``crm-events erase SUBJECT VALUES…`` names; ErasureError if there is none."""
    if subject == "contact":
        number, name = values
        return _contact_person(session, number, name)
    if subject == "customer":
        return _customer_person(session, values[0])
    if subject == "number":
        e164 = normalise_phone(values[0], settings.phone_region)
        if e164 is None:
            raise ErasureError(f"{values[0]!r} is not a phone number")
        return Person("number", phones=[e164])
    if subject == "address":
        address = values[0].strip().lower()
        if "@" not in address:
            raise ErasureError(f"{values[0]!r} is not an email address")
        return Person("address", emails=[address])
    raise ErasureError(f"erase what? one of {', '.join(SUBJECTS)}")


def _contact_person(session: Session, number: str, name: str) -> Person:
    customer = session.scalar(select(Customer).where(Customer.customer_number == number.strip()))
    if customer is None:
        raise ErasureError(f"no customer {number}")
    wanted = " ".join(name.split()).casefold()
    contacts = [
        c
        for c in session.scalars(select(Contact).where(Contact.customer_id == customer.id))
        if " ".join(c.name.split()).casefold() == wanted
    ]
    if not contacts:
        raise ErasureError(f"customer {number} has no contact named {name!r}")
    person = Person("contact", contacts=contacts)
    _add_contacts(session, person, contacts)
    return person


def _customer_person(session: Session, number: str) -> Person:
    customer = session.scalar(select(Customer).where(Customer.customer_number == number.strip()))
    if customer is None:
        raise ErasureError(f"no customer {number}")
    contacts = list(session.scalars(select(Contact).where(Contact.customer_id == customer.id)))
    person = Person("customer", contacts=contacts, customer=customer, names=[customer.name])
    person.phones += session.scalars(
        select(PartyPhone.e164).where(PartyPhone.customer_id == customer.id)
    ).all()
    _add_contacts(session, person, contacts)
    return person


def _add_contacts(session: Session, person: Person, contacts: list[Contact]) -> None:
    ids = [c.id for c in contacts]
    person.names += [c.name for c in contacts]
    person.emails += [c.email.lower() for c in contacts if c.email]
    person.emails += session.scalars(
        select(ContactEmail.email).where(ContactEmail.contact_id.in_(ids))
    ).all()
    person.phones += session.scalars(
        select(PartyPhone.e164).where(PartyPhone.contact_id.in_(ids))
    ).all()
    person.names = sorted(set(person.names))
    person.emails = sorted({e.lower() for e in person.emails})
    person.phones = sorted(set(person.phones))


# -- the patterns -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    kind: str
    python: re.Pattern[str]
    #: The same, for PostgreSQL's ``~*`` (no look-around): finds the rows to look at.
    sql: str


def patterns(person: Person) -> list[Pattern]:
    found = [_name_pattern(name) for name in person.names if name.strip()]
    found += [_literal_pattern("email", address) for address in person.emails]
    found += [_phone_pattern(e164) for e164 in person.phones]
    return found


def _literal(text: str) -> str:
    """``text`` as a pattern both Python and PostgreSQL read literally."""
    return "".join(c if c.isalnum() else "\\" + c for c in text)


def _literal_pattern(kind: str, text: str) -> Pattern:
    sql = _literal(text)
    return Pattern(kind, re.compile(sql, re.IGNORECASE), sql)


def _name_pattern(name: str) -> Pattern:
    """A name as written, in either order ("Matti Virtanen", "Virtanen, Matti")."""
    tokens = [_literal(token) for token in name.split()]
    forms = ["[ ]+".join(tokens)]
    if len(tokens) > 1:
        forms.append("[ ,]+".join([tokens[-1], *tokens[:-1]]))
    sql = "(?:" + "|".join(forms) + ")"
    return Pattern("name", re.compile(sql, re.IGNORECASE), sql)


def _phone_pattern(e164: str) -> Pattern:
    """A number with or without its country code, its trunk zero, spaces, dashes, brackets:
    +358 40 123 4567, +358 (0)40 123 4567, 00358401234567, 040-123 4567, 0401234567."""
    number = phonenumbers.parse(e164, None)
    country = str(number.country_code)
    national = phonenumbers.national_significant_number(number)
    digits = DIGIT_GAP.join(national)
    trunk = f"\\(0\\){DIGIT_GAP}"
    prefix = f"(?:(?:\\+|00)?{country}{DIGIT_GAP}(?:{trunk})?|0{DIGIT_GAP}|{trunk})?"
    sql = prefix + digits
    python = re.compile(f"(?<![0-9+]){sql}(?![0-9])")
    return Pattern("phone", python, sql)


def scrub_text(text: str, found: list[Pattern]) -> str:
    for pattern in found:
        text = pattern.python.sub(REPLACEMENTS[pattern.kind], text)
    return text


def scrub_value(value: Any, found: list[Pattern]) -> Any:
    """A JSON value with every string (and key) scrubbed."""
    if isinstance(value, str):
        return scrub_text(value, found)
    if isinstance(value, list):
        return [scrub_value(item, found) for item in value]
    if isinstance(value, dict):
        return {scrub_text(str(k), found): scrub_value(v, found) for k, v in value.items()}
    return value


def names_any(text: str, found: list[Pattern]) -> bool:
    return any(pattern.python.search(text) for pattern in found)


# -- erasing ------------------------------------------------------------------------------------


def erase(
    session: Session, settings: Settings, person: Person, *, by: str, dry_run: bool = False
) -> ErasureReport:
    """Erase ``person`` in the caller's transaction; see the module's docstring."""
    found = patterns(person)
    report = ErasureReport(dry_run, person.subject, person.data_kinds)
    if not found and not person.contacts:
        raise ErasureError("nothing identifies the person: no name, address or number")
    known = identifiers(person)  # before the contacts are renamed
    # Before the master data goes: the events are found by their contact and party keys too.
    theirs = _their_events(session, person)
    naming = events_naming(session, person, found)
    _master_data(session, person, report)
    _documents(session, settings, theirs, naming, found, report)
    _payloads_by_reference(session, settings, found, report)
    for table in Base.metadata.sorted_tables:
        if table.name not in SKIPPED_TABLES:
            _scrub_table(session, table, found, report)
    erasure = Erasure(
        erased_at=utcnow(),
        erased_by=by[:200],
        subject=person.subject,
        data_kinds=person.data_kinds,
        counts=dict(sorted(report.counts.items())),
    )
    session.add(erasure)
    session.flush()
    report.erasure_id = erasure.id
    key = service_key(session, "erasure").encode()
    for kind, value in known:
        session.add(ErasedIdentifier(erasure_id=erasure.id, kind=kind, digest=digest(key, value)))
    session.flush()
    return report


def identifiers(person: Person) -> list[tuple[str, str]]:
    """(kind, normalised value) of what identifies the person to a later message."""
    found: list[tuple[str, str]] = []
    for contact in person.contacts:
        customer_number = contact_customer_number(contact)
        found.append(("contact", contact_identity(customer_number, contact.name)))
    if person.customer is not None:
        found.append(("customer", person.customer.customer_number.strip()))
    found += [("email", address) for address in person.emails]
    found += [("phone", e164) for e164 in person.phones]
    return found


def contact_customer_number(contact: Contact) -> str:
    session = Session.object_session(contact)
    assert session is not None
    number = session.scalar(
        select(Customer.customer_number).where(Customer.id == contact.customer_id)
    )
    return str(number)


def contact_identity(customer_number: str, name: str) -> str:
    return f"{customer_number.strip()}:{' '.join(name.split()).casefold()}"


def digest(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def naming_conditions(person: Person) -> list[Any]:
    """Conditions on events that concern the person: linked to one of their contacts, or
    under one of their numbers or addresses (the events' party keys)."""
    conditions: list[Any] = []
    if person.contacts:
        conditions.append(CrmEvent.contact_id.in_([c.id for c in person.contacts]))
    keys = [("phone", p) for p in person.phones] + [("email", e) for e in person.emails]
    if keys:
        conditions.append(
            CrmEvent.id.in_(
                select(EventPartyKey.event_id).where(
                    or_(
                        *(
                            (EventPartyKey.kind == kind) & (EventPartyKey.value == value)
                            for kind, value in keys
                        )
                    )
                )
            )
        )
    return conditions


def events_naming(session: Session, person: Person, found: list[Pattern]) -> set[int]:
    """The events that concern the person (``naming_conditions``) or name them in their
    subject, body, notes or details."""
    conditions = naming_conditions(person)
    texts = [CrmEvent.subject, CrmEvent.body, CrmEvent.match_note, CrmEvent.details]
    if found and is_postgresql(session):
        alternatives = "|".join(p.sql for p in found)
        conditions.append(or_(*(cast(c, Text).op("~*")(alternatives) for c in texts)))
    chosen = (
        set(session.scalars(select(CrmEvent.id).where(or_(*conditions)))) if conditions else set()
    )
    if found and not is_postgresql(session):
        for event_id, *values in session.execute(select(CrmEvent.id, *texts)):
            if names_any(json.dumps(values, ensure_ascii=False, default=str), found):
                chosen.add(event_id)
    return chosen


def _their_events(session: Session, person: Person) -> list[int]:
    """Calls, emails and invitations in which the person is the other party."""
    conditions = naming_conditions(person)
    if not conditions:
        return []
    return list(
        session.scalars(
            select(CrmEvent.id)
            .where(or_(*conditions), CrmEvent.source_kind.in_(THEIR_KINDS))
            .order_by(CrmEvent.id)
        )
    )


def _master_data(session: Session, person: Person, report: ErasureReport) -> None:
    for contact in person.contacts:
        contact.name = f"erased contact #{contact.id}"
        contact.email = None
        contact.contact_key = f"erased:{contact.id}"
        report.counts["contact"] += 1
    if person.customer is not None:
        person.customer.name = f"erased customer #{person.customer.id}"
        report.counts["customer"] += 1
    session.flush()
    ids = [c.id for c in person.contacts]
    # A staff member's number is ours, not the person's: never deleted here.
    owned: list[Any] = [PartyPhone.e164.in_(person.phones) & PartyPhone.staff_id.is_(None)]
    if ids:
        owned.append(PartyPhone.contact_id.in_(ids))
    if person.customer is not None:
        owned.append(PartyPhone.customer_id == person.customer.id)
    statements: list[tuple[str, Any]] = [
        ("party_phone", delete(PartyPhone).where(or_(*owned))),
        (
            "contact_email",
            delete(ContactEmail).where(
                or_(ContactEmail.contact_id.in_(ids), ContactEmail.email.in_(person.emails))
            ),
        ),
        (
            "event_party_key",
            delete(EventPartyKey).where(
                or_(
                    (EventPartyKey.kind == "phone") & EventPartyKey.value.in_(person.phones),
                    (EventPartyKey.kind == "email") & EventPartyKey.value.in_(person.emails),
                )
            ),
        ),
        (
            "email_sender_window",
            delete(EmailSenderWindow).where(EmailSenderWindow.sender.in_(person.emails)),
        ),
    ]
    for table, statement in statements:
        if deleted := session.execute(statement).rowcount:  # type: ignore[attr-defined]
            report.counts[table] += deleted
    for address in person.emails:
        for contact in session.scalars(
            select(Contact).where(or_(Contact.email == address, Contact.contact_key == address))
        ):
            contact.email = None
            if contact.contact_key == address:  # the contact's natural key was the address
                contact.contact_key = f"erased:{contact.id}"
            report.counts["contact"] += 1
    leads = session.scalars(
        select(Lead).where(
            or_(
                (Lead.kind == "phone") & Lead.value.in_(person.phones),
                (Lead.kind == "email") & Lead.value.in_(person.emails),
            )
        )
    ).all()
    for lead in leads:
        lead.value = f"erased:{lead.id}"
        report.counts["lead"] += 1
    session.flush()


def _documents(
    session: Session,
    settings: Settings,
    theirs: list[int],
    naming: set[int],
    found: list[Pattern],
    report: ErasureReport,
) -> None:
    """Stub the documents that are theirs, and the text documents of the events naming them
    that name them too; delete bytes nothing refers to. Only those events' documents are read:
    the whole store is not (it may hold years of raw emails)."""
    going: list[EventDocument] = []
    if theirs:
        going += session.scalars(
            select(EventDocument).where(
                EventDocument.event_id.in_(theirs), EventDocument.sha256.is_not(None)
            )
        ).all()
    taken = {d.id for d in going}
    others = sorted(naming - set(theirs))
    for document in session.scalars(
        select(EventDocument)
        .where(EventDocument.event_id.in_(others), EventDocument.sha256.is_not(None))
        .where(or_(*(EventDocument.media_type.startswith(t) for t in TEXT_TYPES)))
        .order_by(EventDocument.id)
    ):
        if document.id in taken or document.sha256 is None:
            continue
        data = read_blob(session, settings, document.sha256)
        if data is not None and names_any(_readable(data, document.media_type), found):
            going.append(document)
            taken.add(document.id)
    hashes = {d.sha256 for d in going if d.sha256 is not None}
    day = utcnow().date().isoformat()
    for document in going:
        report.documents.append(
            {"document": document.id, "event": document.event_id, "role": document.role}
        )
        document.sha256 = None
        document.filename = f"erased-{document.role}-{document.id}"
        document.note = f"deleted on {day}: erasure of personal data"
        report.counts["documents"] += 1
    session.flush()
    _free(session, settings, hashes, report)


def _readable(data: bytes, media_type: str) -> str:
    """A document's text as a person reads it: an email's decoded parts too."""
    text = data.decode("utf-8", errors="replace")
    if media_type.startswith("message/"):
        try:
            message = email.message_from_bytes(data, policy=email.policy.default)
            parts = [str(message.get(h, "")) for h in ("From", "To", "Cc", "Reply-To", "Subject")]
            for part in message.walk():
                if part.get_content_maintype() == "text":
                    try:
                        parts.append(str(part.get_content()))
                    except (LookupError, ValueError, AssertionError):
                        continue
            text += "\n" + "\n".join(parts)
        except Exception:  # a malformed email is searched as its bytes
            pass
    return text


def _free(session: Session, settings: Settings, hashes: set[str], report: ErasureReport) -> None:
    freed, files = delete_unreferenced_blobs(session, settings, hashes)
    report.files += files
    if freed:
        report.counts["document_blob"] += len(freed)


def _payloads_by_reference(
    session: Session, settings: Settings, found: list[Pattern], report: ErasureReport
) -> None:
    """Rejected and failed payloads kept in the document store, rewritten without the person."""
    # Here, not with the module: the stages that refuse erased people are read by listings,
    # which load no marshmallow (tasks.ledger does).
    from tasks.ledger import kept_by_reference, kept_payload, whole_payload

    released: set[str] = set()
    rows: list[RejectedMessage | FailedMessage] = [
        *session.scalars(select(RejectedMessage).order_by(RejectedMessage.id)),
        *session.scalars(select(FailedMessage).order_by(FailedMessage.id)),
    ]
    for row in rows:
        if not kept_by_reference(row.payload):
            continue
        try:
            whole = whole_payload(session, settings, row.payload)
        except LookupError:
            continue
        scrubbed = scrub_value(whole, found)
        if scrubbed == whole:
            continue
        report.counts[row.__tablename__] += 1
        if report.dry_run:
            continue  # nothing written: not even the rewritten payload's bytes
        released.add(row.payload["payload_sha256"])
        row.payload = kept_payload(session, settings, scrubbed)
    session.flush()
    _free(session, settings, released, report)


def _scrub_table(
    session: Session, table: Table, found: list[Pattern], report: ErasureReport
) -> None:
    """Replace the person in every text and JSON column of ``table``."""
    if not found:
        return
    keys = list(table.primary_key.columns)
    foreign = {c for c in table.columns if c.foreign_keys}
    columns = [
        c
        for c in table.columns
        if isinstance(c.type, String | Text | JSON) and c not in keys and c not in foreign
    ]
    if not columns or not keys:
        return
    query = select(*keys, *columns)
    if is_postgresql(session):
        alternatives = "|".join(p.sql for p in found)
        query = query.where(or_(*(cast(c, Text).op("~*")(alternatives) for c in columns)))
    changed = 0
    for row in session.execute(query).all():
        values = dict(row._mapping)
        new: dict[str, Any] = {}
        for column in columns:
            value = values[column.name]
            if value is None:
                continue
            scrubbed = (
                scrub_text(value, found) if isinstance(value, str) else scrub_value(value, found)
            )
            if scrubbed != value:
                new[column.name] = scrubbed
        if new:
            session.execute(
                update(table).where(*(key == values[key.name] for key in keys)).values(**new)
            )
            changed += 1
    if changed:
        report.counts[table.name] += changed
    session.flush()


# -- refusal ------------------------------------------------------------------------------------


class ErasedPerson(BadInput):
    """A message names an erased person: refused, and kept without their data."""


#: The erasure key of each database, once it exists (it never changes).
_keys: dict[str, bytes] = {}


def _erasure_key(session: Session) -> bytes | None:
    """The key of the identifiers' hashes; None while nothing was ever erased."""
    url = str(session.get_bind().engine.url)
    if (key := _keys.get(url)) is None:
        row = session.get(ServiceKey, "erasure")
        if row is None:
            return None
        key = _keys[url] = row.value.encode()
    return key


def erased_identifiers(
    session: Session, candidates: list[tuple[str, str]]
) -> list[tuple[str, str, int]]:
    """Of (kind, value), those erased: (kind, value, erasure id)."""
    if not candidates or (key := _erasure_key(session)) is None:
        return []
    wanted = {digest(key, value): (kind, value) for kind, value in candidates}
    rows = session.execute(
        select(ErasedIdentifier.digest, ErasedIdentifier.erasure_id).where(
            ErasedIdentifier.digest.in_(list(wanted))
        )
    ).all()
    return sorted({(*wanted[d], erasure_id) for d, erasure_id in rows})


def erased_numbers(session: Session, settings: Settings, raws: set[str]) -> set[str]:
    """Of the numbers as written, those of erased people."""
    if _erasure_key(session) is None:
        return set()
    by_e164: dict[str, set[str]] = {}
    for raw in raws:
        if (e164 := normalise_phone(raw, settings.phone_region)) is not None:
            by_e164.setdefault(e164, set()).add(raw)
    found = erased_identifiers(session, [("phone", e164) for e164 in by_e164])
    return {raw for _kind, e164, _erasure in found for raw in by_e164[e164]}


def refuse_erased(
    session: Session,
    settings: Settings,
    message: Any,
    *,
    phones: list[Any] = (),  # type: ignore[assignment]
    emails: list[Any] = (),  # type: ignore[assignment]
    contacts: list[tuple[str, str]] = (),  # type: ignore[assignment]
    customer: str | None = None,
    withheld: Mapping[str, str] | None = None,
) -> None:
    """Raise :class:`ErasedPerson` when the message names an erased person; the message is
    kept with the refusal scrubbed of them, and ``withheld`` fields replaced by these notes."""
    if _erasure_key(session) is None:
        return  # nothing was ever erased here
    candidates = [
        ("phone", e164)
        for raw in phones
        if isinstance(raw, str) and (e164 := normalise_phone(raw, settings.phone_region))
    ]
    candidates += [("email", e.strip().lower()) for e in emails if isinstance(e, str) and e]
    candidates += [("contact", contact_identity(*contact)) for contact in contacts]
    if customer is not None:
        candidates.append(("customer", customer.strip()))
    found = erased_identifiers(session, candidates)
    if not found:
        return
    kinds = sorted({kind for kind, _value, _erasure in found})
    erasures = sorted({erasure for _kind, _value, erasure in found})
    shown = ", ".join(f"#{n}" for n in erasures)
    refused = ErasedPerson(
        f"the message names a person whose data was erased (erasure {shown}: {', '.join(kinds)}):"
        " refused, so that it does not come back; once the person is to be added again,"
        f" `crm-events erase release {erasures[0]}` lets such messages in"
    )
    person = Person("refused")
    for kind, value, _erasure in found:
        if kind == "phone":
            person.phones.append(value)
        elif kind == "email":
            person.emails.append(value)
    erased_contacts = {value for kind, value, _erasure in found if kind == "contact"}
    person.names += [
        name for number, name in contacts if contact_identity(number, name) in erased_contacts
    ]
    kept = {**message, **withheld} if withheld and isinstance(message, dict) else message
    refused.kept_instead = scrub_value(kept, patterns(person))
    raise refused
