"""A subject access request (GDPR article 15): ``crm-events export person``.

Everything held about a person, found as the erasure finds it (``tasks.erasure``): their
contact records, every event that names them (linked to their contact, under one of their
numbers or addresses, or naming them in its text), the documents of those events, and the
messages that name them (the ledger's, rejected and failed ones), written to one folder as JSON
files and the documents' own bytes, with a README saying what each file is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.base import utcnow
from models.db import is_postgresql
from models.documents import EventDocument
from models.events import CrmEvent
from models.ledger import FailedMessage, InboundMessage, RejectedMessage
from models.parties import ContactEmail, Customer, PartyPhone
from tasks.attach import read_blob, sanitise_filename
from tasks.erasure import Pattern, Person, events_naming, names_any, patterns
from tasks.ledger import json_safe
from tasks.views import events_json

README = """\
Personal data held about one person, exported {at} by crm-events export person.

person.json     who was searched for: their contact records (name, customer, addresses,
                numbers) and the names, addresses and numbers searched with
events.json     every event that names them: linked to their contact, under one of their
                numbers or addresses, or naming them in its subject, body or notes; each with
                its documents (filename, media type, size, SHA-256, role)
messages.json   the messages received that name them, as received: the inbound ledger
                (calls, emails' envelopes, visits, master data), and messages rejected or
                failed, with the reason
documents/      the documents of those events, one file each: <event id>-<document id>-<name>;
                a document listed without a file here was not kept (refused for its size, or
                deleted by retention)
"""


@dataclass
class Export:
    folder: Path
    events: int = 0
    messages: int = 0
    documents: int = 0
    files: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "events": self.events,
            "messages": self.messages,
            "documents": self.documents,
            "files": self.files,
        }


def export_person(session: Session, settings: Settings, person: Person, folder: Path) -> Export:
    """Write everything held about ``person`` to ``folder`` (created; must be empty)."""
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty")
    found = patterns(person)
    export = Export(folder)
    events = _events(session, person, found)
    zone = ZoneInfo(settings.time_zone)
    _write(folder / "person.json", _person(session, person))
    _write(folder / "events.json", events_json(session, events, zone))
    messages = _messages(session, found)
    _write(folder / "messages.json", messages)
    export.events, export.messages = len(events), len(messages)
    documents = folder / "documents"
    documents.mkdir()
    for document in session.scalars(
        select(EventDocument)
        .where(EventDocument.event_id.in_([e.id for e in events]))
        .order_by(EventDocument.event_id, EventDocument.id)
    ):
        if document.sha256 is None:
            continue
        data = read_blob(session, settings, document.sha256)
        if data is None:
            continue
        safe = sanitise_filename(document.filename, fallback=document.role)
        name = f"{document.event_id}-{document.id}-{safe}"
        (documents / name).write_bytes(data)
        export.documents += 1
    (folder / "README.txt").write_text(README.format(at=utcnow().isoformat()), encoding="utf-8")
    export.files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return export


def _write(path: Path, value: Any) -> None:
    path.write_text(
        json.dumps(json_safe(value), ensure_ascii=False, indent=2, default=str) + "\n",
        encoding="utf-8",
    )


def _person(session: Session, person: Person) -> dict[str, Any]:
    records = []
    for contact in person.contacts:
        records.append(
            {
                "contact_id": contact.id,
                "name": contact.name,
                "customer_number": session.scalar(
                    select(Customer.customer_number).where(Customer.id == contact.customer_id)
                ),
                "email": contact.email,
                "emails": session.scalars(
                    select(ContactEmail.email).where(ContactEmail.contact_id == contact.id)
                ).all(),
                "phones": session.scalars(
                    select(PartyPhone.raw).where(PartyPhone.contact_id == contact.id)
                ).all(),
                "updated_at": contact.updated_at,
            }
        )
    return {
        "searched_for": person.subject,
        "names": person.names,
        "emails": person.emails,
        "phones": person.phones,
        "contacts": records,
    }


def _events(session: Session, person: Person, found: list[Pattern]) -> list[CrmEvent]:
    chosen = events_naming(session, person, found)
    return list(
        session.scalars(
            select(CrmEvent).where(CrmEvent.id.in_(chosen)).order_by(CrmEvent.occurred_at)
        )
    )


def _messages(session: Session, found: list[Pattern]) -> list[dict[str, Any]]:
    if not found:
        return []
    rows: list[dict[str, Any]] = []
    alternatives = "|".join(p.sql for p in found)
    candidates: list[InboundMessage | RejectedMessage | FailedMessage] = []
    for model in (InboundMessage, RejectedMessage, FailedMessage):
        query = select(model).order_by(model.id)
        if is_postgresql(session):
            query = query.where(cast(model.payload, Text).op("~*")(alternatives))
        candidates += session.scalars(query)
    for row in candidates:
        if not names_any(json.dumps(row.payload, ensure_ascii=False, default=str), found):
            continue
        entry: dict[str, Any]
        if isinstance(row, InboundMessage):
            entry = {"kind": "received", "at": row.received_at, "schema": row.schema}
        elif isinstance(row, RejectedMessage):
            entry = {"kind": "rejected", "at": row.rejected_at, "task": row.task_name}
            entry["reason"] = row.reason
        else:
            entry = {"kind": "failed", "at": row.failed_at, "task": row.task_name}
            entry["reason"] = row.exception
        entry["message"] = row.payload
        rows.append(entry)
    return rows
