"""Meetings: an email carrying an iCalendar invitation becomes one meeting event (neuvottelu).

A seller books a negotiation in their calendar and invites the customer, copying (or later
forwarding) the invitation to the CRM address. Outlook sends it as a ``text/calendar;
method=REQUEST`` alternative of the mail, Google Calendar as that and an ``invite.ics``
attachment; a forwarded invitation carries either inside the forward. The invitation's ``UID``
is the event's key (``calendar``, ``meeting``, UID): a later invitation with a higher
``SEQUENCE`` (a new time, a new place) updates the same event, one with a lower one is
outdated, and ``METHOD:CANCEL`` cancels it, as visit updates do.

Who: the organizer is the seller (else the staff member who forwarded or sent the mail);
attendees are matched to the customer's contacts (which links the customer) and to staff
(participants). When: ``DTSTART`` (a floating time is read in ``CRM_TIME_ZONE``). Which
category: ``CRM_MEETING_CATEGORY`` (``auto``: ``customer_visit`` when the location names the
customer, else ``crm_event``; or a category code for every meeting).
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from email.message import Message
from typing import Any

from sqlalchemy.orm import Session

from config.settings import Settings
from models.base import utcnow
from models.events import CrmEvent
from models.parties import Customer
from models.schemas.email import SCHEMA as EMAIL_SCHEMA
from tasks.attach import attach
from tasks.classify import Classification, ClassificationRequest, classify
from tasks.context import StageContext
from tasks.ingest.email_parse import ParsedEmail
from tasks.ingest.visit import apply_visit_parties
from tasks.match import find_staff
from tasks.store import (
    UNCLASSIFIED,
    StageResult,
    link_inbound,
    lock_event,
    move_tallies,
    record_inbound,
    record_party_keys,
    set_properties,
    tally_keys,
)

#: The key of meeting events: ``(calendar, meeting, UID)``.
MEETING_SOURCE_SYSTEM = "calendar"
#: Invitations that make or change a meeting; a REPLY (an attendee's answer) is an ordinary email.
MEETING_METHODS = ("REQUEST", "CANCEL", "PUBLISH")
CALENDAR_TYPES = ("text/calendar", "application/ics")
#: Company forms left out when a location is compared with the customer's name.
#: What may announce a calendar in a raw mail: searched in place, never a lowered copy of a
#: mail of up to CRM_MAX_EMAIL_BYTES on every email's path.
CALENDAR_MARKS = (b"calendar", b"application/ics", b".ics", b"message/rfc822")
#: What reading a malformed calendar raises (icalendar, dates out of range).
UNREADABLE = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)
COMPANY_FORMS = re.compile(r"\b(oyj|oy|ab|ky|ay|tmi|ltd|inc|gmbh)\b\.?", re.IGNORECASE)


@dataclass
class Invitation:
    method: str
    uid: str
    sequence: int
    start: datetime
    end: datetime | None
    summary: str
    description: str
    location: str
    organizer: str | None
    #: (address, name) of each attendee.
    attendees: list[tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False
    ics: bytes = b""
    notes: list[str] = field(default_factory=list)


def might_hold_invitation(raw: bytes) -> bool:
    """A cheap look before the MIME tree is walked: most mail has no calendar at all (a
    forwarded mail may hide one in an encoded attachment). Lower-cased once and searched for
    each mark: a case-insensitive pattern of alternatives cost a typical 97 kB email a
    millisecond, a fifth of its stage."""
    lowered = raw.lower()
    return any(mark in lowered for mark in CALENDAR_MARKS)


def find_invitation(raw: bytes, zone: Any, depth: int = 0) -> Invitation | None:
    """The first iCalendar invitation (REQUEST, CANCEL, PUBLISH) anywhere in the mail, the
    forwarded mail included; None when there is none or it cannot be read as one."""
    from icalendar import Calendar

    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part in message.walk():
        if part.get_content_type() == "message/rfc822" and _encoded(part):
            # A forward some clients encode (base64, against RFC 2046): the parser took the
            # encoded text for a mail; decode it and read the mail inside, a few levels deep.
            inner = _encoded_mail(part)
            if inner and depth < 3:
                found = find_invitation(inner, zone, depth + 1)
                if found is not None:
                    return found
            continue
        if not _is_calendar(part):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or not payload.strip():
            continue
        try:
            invitation = _invitation(Calendar.from_ical(payload), payload, zone)
        except UNREADABLE:  # not a calendar we can read: the mail stays an ordinary email
            continue
        if invitation is not None:
            return invitation
    return None


def _encoded(part: Message) -> bool:
    return str(part.get("Content-Transfer-Encoding", "")).strip().lower() == "base64"


def _encoded_mail(part: Message) -> bytes:
    payload: Any = part.get_payload()
    text = payload[0].get_payload() if isinstance(payload, list) and payload else payload
    if not isinstance(text, str):
        return b""
    try:
        return base64.b64decode("".join(text.split()))
    except ValueError:
        return b""


def _is_calendar(part: Message) -> bool:
    if part.is_multipart():
        return False
    filename = (part.get_filename() or "").lower()
    return part.get_content_type() in CALENDAR_TYPES or filename.endswith(".ics")


def _invitation(calendar: Any, ics: bytes, zone: Any) -> Invitation | None:
    method = str(calendar.get("METHOD") or "PUBLISH").upper()
    if method not in MEETING_METHODS:
        return None
    for component in calendar.walk("VEVENT"):
        uid = str(component.get("UID") or "").strip()
        start = component.get("DTSTART")
        if not uid or start is None:
            continue
        notes: list[str] = []
        end = component.get("DTEND")
        status = str(component.get("STATUS") or "").upper()
        organizer = _address(component.get("ORGANIZER"))
        attendees = []
        for attendee in _as_list(component.get("ATTENDEE")):
            address = _address(attendee)
            if address:
                name = str(getattr(attendee, "params", {}).get("CN", "") or "")
                attendees.append((address, name))
        try:
            sequence = int(component.get("SEQUENCE") or 0)
        except (TypeError, ValueError):
            sequence = 0
        return Invitation(
            method=method,
            uid=uid[:500],
            sequence=sequence,
            start=_moment(start.dt, zone, notes, "DTSTART"),
            end=_moment(end.dt, zone, notes, "DTEND") if end is not None else None,
            summary=str(component.get("SUMMARY") or "").strip(),
            description=str(component.get("DESCRIPTION") or "").strip(),
            location=str(component.get("LOCATION") or "").strip(),
            organizer=organizer,
            attendees=attendees,
            cancelled=method == "CANCEL" or status == "CANCELLED",
            ics=ics,
            notes=notes,
        )
    return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _address(value: Any) -> str | None:
    text = str(value or "").strip()
    if text.lower().startswith("mailto:"):
        text = text[7:]
    return text.lower() if "@" in text else None


def _moment(value: Any, zone: Any, notes: list[str], label: str) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            notes.append(f"{label} is a floating time; read as {zone.key}")
            return value.replace(tzinfo=zone)
        return value.astimezone(UTC)
    if isinstance(value, date):  # an all-day meeting
        return datetime.combine(value, time.min, tzinfo=zone)
    raise ValueError(f"{label} is not a date or a time")


def meeting_category(setting: str, location: str, customer: Customer | None) -> tuple[str, str]:
    """The category of a meeting and why (``CRM_MEETING_CATEGORY``)."""
    if setting != "auto":
        return setting, "CRM_MEETING_CATEGORY"
    if customer is not None and location:
        name = COMPANY_FORMS.sub("", customer.name).strip(" ,.").casefold()
        if name and name in location.casefold():
            return "customer_visit", f"the location names the customer ({customer.name})"
    return "crm_event", "the location is not the customer's"


def meeting_view(settings: Settings, seller: str, addresses: list[str]) -> dict[str, Any]:
    """The visit-shaped message the party matching reads: the seller, the other attendees."""
    others = [a for a in addresses if a != seller and a not in settings.crm_addresses]
    return {"seller": seller, "customer_number": None, "contacts": others, "attendees": []}


def classify_meeting(
    session: Session, settings: Settings, location: str, customer: Customer | None
) -> Classification:
    rule_category, why = meeting_category(settings.meeting_category, location, customer)
    return classify(
        session,
        ClassificationRequest(source_kind="meeting", rule_category=rule_category, rule_reason=why),
    )


def relink_meeting(session: Session, settings: Settings, event: CrmEvent) -> None:
    """Match a meeting again from its invitation's attendees (``tasks.relink``).

    A contact or customer that appears after the invitation links it as a later invitation
    would; the category follows (``CRM_MEETING_CATEGORY``: a customer visit once the location
    names the now known customer). The caller compares and moves the tallies.
    """
    details = event.details or {}
    addresses = [
        a["address"]
        for a in details.get("attendees") or []
        if isinstance(a, dict) and isinstance(a.get("address"), str)
    ]
    # Meetings stored before seller_reference was kept: their organizer.
    seller = details.get("seller_reference", details.get("organizer")) or ""
    parties = apply_visit_parties(
        session, settings, event, meeting_view(settings, str(seller), addresses)
    )
    classification = classify_meeting(
        session, settings, details.get("location") or "", parties.customer
    )
    classification.apply_to(event)
    session.flush()
    set_properties(session, event, classification.properties)


def ingest_meeting(
    session: Session,
    ctx: StageContext,
    message: dict[str, Any],
    payload: dict[str, Any],
    parsed: ParsedEmail,
    invitation: Invitation,
    raw: bytes,
    digest: str,
) -> StageResult:
    """The meeting event an invitation makes or changes (see the module's docstring)."""
    settings = ctx.settings
    inbound_id = record_inbound(
        session,
        idempotency_key=f"email:{digest}",
        schema=EMAIL_SCHEMA,
        source_kind="email",
        source_system=message["source_system"],
        source_id=parsed.message_id or f"sha256:{digest}",
        payload={k: v for k, v in payload.items() if k != "raw_b64"} | {"raw_sha256": digest},
    )
    if inbound_id is None:
        return StageResult("duplicate", detail="these exact bytes were already accepted")
    event, created = lock_event(
        session,
        source_system=MEETING_SOURCE_SYSTEM,
        source_kind="meeting",
        source_id=invitation.uid,
        defaults=UNCLASSIFIED | {"occurred_at": invitation.start},
    )
    link_inbound(session, inbound_id, event.id)
    applied = (event.details or {}).get("sequence")
    if not created and isinstance(applied, int) and invitation.sequence < applied:
        return StageResult(
            "outdated",
            event.id,
            f"invitation SEQUENCE {invitation.sequence} is older than the applied "
            f"{applied}: not applied",
        )
    before = tally_keys(session, event)

    # The organizer is the seller; else the staff member who sent or forwarded the mail.
    addresses = [a for a, _ in invitation.attendees]
    sender = parsed.from_[1].lower() if parsed.from_ else None
    seller = next(
        (
            reference
            for reference in (invitation.organizer, message.get("mail_from"), sender)
            if reference and find_staff(session, reference, settings) is not None
        ),
        "",
    )
    # Read by apply_visit_parties into the match note, once, as for visits.
    event.details = {**event.details, "time_notes": invitation.notes}
    parties = apply_visit_parties(
        session, settings, event, meeting_view(settings, seller, addresses)
    )
    classification = classify_meeting(session, settings, invitation.location, parties.customer)
    event.occurred_at = invitation.start
    event.ended_at = invitation.end
    event.duration_s = (
        int((invitation.end - invitation.start).total_seconds()) if invitation.end else None
    )
    event.subject = invitation.summary or "Meeting"
    event.body = invitation.description
    event.status = "cancelled" if invitation.cancelled else "scheduled"
    event.state = event.status
    event.cancelled = invitation.cancelled
    classification.apply_to(event)
    event.details = {
        **event.details,
        "location": invitation.location or None,
        "gateway": message["source_system"],
        "uid": invitation.uid,
        "sequence": invitation.sequence,
        "method": invitation.method,
        "organizer": invitation.organizer,
        # Whom the seller was found by, for the re-link (relink_meeting).
        "seller_reference": seller,
        "attendees": [{"address": a, "name": n} for a, n in invitation.attendees],
        "updated_by_message": inbound_id,
        "time_notes": invitation.notes,
    }
    event.updated_at = utcnow()
    session.flush()
    set_properties(session, event, classification.properties)
    record_party_keys(session, settings, event, addresses=parties.addresses)
    attach(
        session,
        settings,
        event.id,
        content=invitation.ics,
        filename="invite.ics",
        declared_type="text/calendar",
        role="attachment",
        note=f"SEQUENCE {invitation.sequence}, METHOD {invitation.method}",
    )
    attach(
        session,
        settings,
        event.id,
        content=raw,
        filename="message.eml",
        declared_type="message/rfc822",
        role="raw_message",
        max_bytes=max(settings.max_email_bytes, settings.max_attachment_bytes),
        stored_as=digest if message.get("raw_ref") == digest else "",
    )
    session.flush()
    sellers = move_tallies(session, before, tally_keys(session, event))
    outcome = "created" if created else "cancelled" if invitation.cancelled else "updated"
    return StageResult("stored", event.id, f"meeting {outcome}", sellers_to_refresh=sellers)
