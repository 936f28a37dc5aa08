"""Meetings (neuvottelut): an iCalendar invitation sent or copied to the CRM address becomes one
meeting event, from Outlook and from Google Calendar, forwarded or not; a later SEQUENCE moves
it and a CANCEL cancels it, as visit updates do."""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.documents import EventDocument
from models.events import CrmEvent, EventParticipant
from models.parties import Customer, Staff
from tasks.context import StageContext
from tasks.ingest.email import ingest_email
from tasks.ingest.party import ingest_party
from tests.master_data import contact
from tests.unit.test_tallies import tallies

INVITATIONS = Path(__file__).resolve().parents[1] / "data" / "invitations"
OUTLOOK = (INVITATIONS / "outlook-request.eml").read_bytes()
GOOGLE = (INVITATIONS / "google-request.eml").read_bytes()
GOOGLE_UID = "3k1v9q2o7m5n4b6c8d0e2f4g6h@google.com"


def mail(raw: bytes, gateway: str = "smtp-gateway") -> dict[str, Any]:
    return {
        "schema": "crm.email/1",
        "source_system": gateway,
        "raw_b64": base64.b64encode(raw).decode(),
        "rcpt_to": ["crm@myyntitalo.fi"],
    }


def fresh(ctx: StageContext) -> StageContext:
    return replace(ctx, task_id=str(uuid.uuid4()))


def meeting(db: Session, uid_start: str) -> CrmEvent:
    found = db.scalars(
        select(CrmEvent).where(
            CrmEvent.source_kind == "meeting", CrmEvent.source_id.startswith(uid_start)
        )
    ).all()
    assert len(found) == 1, found
    return found[0]


def google_changed(sequence: int, start: str, end: str, method: str = "REQUEST") -> bytes:
    """Google's invitation as Google sends it again: a new SEQUENCE, time or method."""
    raw = GOOGLE.replace(b"SEQUENCE:0", f"SEQUENCE:{sequence}".encode())
    raw = raw.replace(b"DTSTART:20261127T080000Z", f"DTSTART:{start}".encode())
    raw = raw.replace(b"DTEND:20261127T090000Z", f"DTEND:{end}".encode())
    raw = raw.replace(b"METHOD:REQUEST", f"METHOD:{method}".encode())
    raw = raw.replace(b"method=REQUEST", f"method={method}".encode())
    # The base64 copy (invite.ics) still says the old: the inline calendar part comes first.
    return raw.replace(b"calendar-1f2e3d4c", f"calendar-{sequence}{method}".encode())


def test_an_outlook_invitation_is_a_customer_visit_of_its_organizer(
    world: Session, ctx: StageContext
) -> None:
    result = ingest_email(world, ctx, mail(OUTLOOK))
    assert (result.outcome, result.detail) == ("stored", "meeting created")
    event = meeting(world, "040000008200E00074C5B7101A82E008")
    anna = world.scalar(select(Staff).where(Staff.username == "anna"))
    customer = world.get(Customer, event.customer_id)
    assert anna is not None and customer is not None
    assert (event.seller_id, customer.customer_number) == (anna.id, "10001")
    # The location names the customer: a customer visit, at 13:00 Helsinki time (FLE zone).
    assert event.category_code == "customer_visit"
    assert event.occurred_at == datetime(2026, 11, 26, 11, 0, tzinfo=UTC)
    assert (event.duration_s, event.status, event.state, event.subject) == (
        3600,
        "scheduled",
        "scheduled",
        "Huoltosopimusneuvottelu",
    )
    assert "huoltosopimuksen 2027 ehdot" in event.body
    assert event.details["location"] == "Pohjolan Kone Oy, Jyväskylä"
    participants = set(
        world.scalars(
            select(Staff.username)
            .join(EventParticipant, EventParticipant.staff_id == Staff.id)
            .where(EventParticipant.event_id == event.id)
        )
    )
    assert participants == {"anna", "mikko"}
    documents = set(
        world.scalars(select(EventDocument.filename).where(EventDocument.event_id == event.id))
    )
    assert documents == {"invite.ics", "message.eml"}
    assert tallies(world, anna.id)[("customer_visit", "2026-W48")] == 1


def test_a_google_invitation_moves_with_its_sequence_and_is_cancelled(
    world: Session, ctx: StageContext
) -> None:
    assert ingest_email(world, ctx, mail(GOOGLE)).outcome == "stored"
    event = meeting(world, GOOGLE_UID)
    mikko = world.scalar(select(Staff).where(Staff.username == "mikko"))
    customer = world.get(Customer, event.customer_id)
    assert mikko is not None and customer is not None
    # Organized by mikko with Sanna of Järvi-Suomen Sähkö, in Google Meet: not a visit.
    assert (event.seller_id, customer.customer_number, event.category_code) == (
        mikko.id,
        "10002",
        "crm_event",
    )
    assert event.occurred_at == datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
    counted = {("crm_event", "2026-W48"): 1, ("crm_event", "2026-11"): 1}
    assert tallies(world, mikko.id) == counted

    moved = google_changed(1, "20261203T090000Z", "20261203T100000Z")
    assert ingest_email(world, fresh(ctx), mail(moved)).detail == "meeting updated"
    world.refresh(event)
    assert event.occurred_at == datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    assert tallies(world, mikko.id) == {("crm_event", "2026-W49"): 1, ("crm_event", "2026-12"): 1}

    # An older copy arriving late (another mailbox) changes nothing.
    late = google_changed(0, "20261127T080000Z", "20261127T090000Z").replace(b"<calendar-0", b"<x")
    assert ingest_email(world, fresh(ctx), mail(late)).outcome == "outdated"

    cancel = google_changed(2, "20261203T090000Z", "20261203T100000Z", method="CANCEL")
    assert ingest_email(world, fresh(ctx), mail(cancel)).detail == "meeting cancelled"
    world.refresh(event)
    assert (event.cancelled, event.status, event.state) == (True, "cancelled", "cancelled")
    assert tallies(world, mikko.id) == {}
    assert len(world.scalars(select(CrmEvent).where(CrmEvent.source_kind == "meeting")).all()) == 1


def test_a_forwarded_invitation_is_the_same_meeting(world: Session, ctx: StageContext) -> None:
    forward = EmailMessage()
    forward["From"] = "Anna Lahtinen <anna.lahtinen@myyntitalo.fi>"
    forward["To"] = "crm@myyntitalo.fi"
    forward["Subject"] = "VL: Huoltosopimusneuvottelu"
    forward["Message-ID"] = "<fwd-invite-1@myyntitalo.fi>"
    forward.set_content("Kirjaatko tämän.")
    forward.add_attachment(OUTLOOK, maintype="message", subtype="rfc822")
    raw = forward.as_bytes()
    assert ingest_email(world, ctx, mail(raw)).detail == "meeting created"
    # The invitation itself, copied to the CRM address too: the same event, not a second one.
    assert ingest_email(world, fresh(ctx), mail(OUTLOOK)).detail == "meeting updated"
    assert meeting(world, "040000008200E00074C5B7101A82E008").category_code == "customer_visit"


def test_the_category_of_meetings_can_be_fixed(world: Session, ctx: StageContext) -> None:
    settings = replace(ctx.settings, meeting_category="sales_action")
    ingest_email(world, replace(ctx, settings=settings), mail(GOOGLE))
    event = meeting(world, GOOGLE_UID)
    assert event.category_code == "sales_action"
    assert "CRM_MEETING_CATEGORY" in event.classification_note


def test_a_calendar_that_cannot_be_read_leaves_an_ordinary_email(
    world: Session, ctx: StageContext
) -> None:
    """A broken calendar part, or one whose time is out of range: the mail is stored as the
    email it is, never lost and never a crash."""
    invitation = EmailMessage()
    invitation["From"] = "Anna Lahtinen <anna.lahtinen@myyntitalo.fi>"
    invitation["To"] = "crm@myyntitalo.fi"
    invitation["Subject"] = "Neuvottelu"
    invitation["Message-ID"] = "<broken-invite@myyntitalo.fi>"
    invitation.set_content("Tervetuloa.")
    for number, start in enumerate(("99999999T999999Z", "nonsense")):
        calendar = (
            "BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\n"
            f"UID:broken-{number}\r\nDTSTART:{start}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
        )
        invitation.add_attachment(
            calendar.encode(), maintype="text", subtype="calendar", filename=f"{number}.ics"
        )
    result = ingest_email(world, ctx, mail(invitation.as_bytes()))
    assert (result.outcome, result.detail) == ("stored", "created")
    event = world.get(CrmEvent, result.event_id)
    assert event is not None and event.source_kind == "email"
    assert event.details["gateway"] == "smtp-gateway"


def test_a_meeting_with_a_stranger_is_linked_when_they_become_a_contact(
    world: Session, ctx: StageContext
) -> None:
    """Invited before the ERP knew them: the meeting waits unlinked, and the contact's arrival
    links it, a customer visit now that the location is the known customer's."""
    raw = GOOGLE.replace(b"sanna.heikkinen@jsah", b"uusi.ostaja@jsah").replace(
        b"LOCATION:Google Meet", "LOCATION:Järvi-Suomen Sähkö Oy, Kuopio".encode()
    )
    assert ingest_email(world, ctx, mail(raw)).outcome == "stored"
    event = meeting(world, GOOGLE_UID)
    mikko = world.scalar(select(Staff).where(Staff.username == "mikko"))
    assert mikko is not None
    assert (event.link_state, event.customer_id, event.category_code) == (
        "unlinked",
        None,
        "crm_event",
    )
    assert tallies(world, mikko.id)[("crm_event", "2026-W48")] == 1

    result = ingest_party(
        world, fresh(ctx), contact("10002", "Uusi Ostaja", emails=["uusi.ostaja@jsahko.fi"])
    )
    assert f"re-linked 1 event(s): {event.id}" in result.detail
    world.refresh(event)
    customer = world.get(Customer, event.customer_id)
    assert customer is not None and customer.customer_number == "10002"
    assert (event.link_state, event.seller_id, event.category_code) == (
        "linked",
        mikko.id,
        "customer_visit",
    )
    moved = tallies(world, mikko.id)
    assert moved[("customer_visit", "2026-W48")] == 1
    assert moved.get(("crm_event", "2026-W48"), 0) == 0
