"""Message builders and lookups shared by the master-data tests (visits, parties, leads)."""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent
from models.parties import Staff
from models.targets import Tally
from tasks.context import StageContext
from tasks.views import events_json

SWITCHBOARD = "+358 9 111 000"


def party(kind: str, **fields: Any) -> dict[str, Any]:
    return {"schema": "crm.party/1", "source_system": "erp", "kind": kind, **fields}


def contact(customer_number: str, name: str, **fields: Any) -> dict[str, Any]:
    return party("contact", customer_number=customer_number, name=name, **fields)


def inbound_call(call_id: str, number: str, started_at: str, **fields: Any) -> dict[str, Any]:
    """A call to the switchboard that no one on the staff is named for (no agent)."""
    return {
        "schema": "crm.call/1",
        "source_system": "pbx-hki",
        "call_id": call_id,
        "status": "completed",
        "direction": "inbound",
        "from": number,
        "to": SWITCHBOARD,
        "started_at": started_at,
        "duration_s": 120,
        **fields,
    }


def raw_email(
    sender: str,
    to: str,
    subject: str,
    message_id: str,
    *,
    date: str = "Tue, 24 Nov 2026 10:00:00 +0200",
    body: str = "Hei,\r\nkiinnostaisi tarjous.\r\n",
) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n"
        f"Message-ID: <{message_id}>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


def email_message(raw: bytes, rcpt_to: list[str] | None = None) -> dict[str, Any]:
    return {
        "schema": "crm.email/1",
        "source_system": "smtp-gw",
        "raw_b64": base64.b64encode(raw).decode("ascii"),
        "rcpt_to": rcpt_to or ["crm@myyntitalo.fi"],
    }


def another_delivery(ctx: StageContext, **settings: Any) -> StageContext:
    """A separate, later task execution (not a redelivery), optionally with other settings."""
    return StageContext(
        replace(ctx.settings, **settings) if settings else ctx.settings,
        task_id=str(uuid.uuid4()),
        task_name=ctx.task_name,
    )


def staff_id(db: Session, username: str) -> int:
    found = db.scalar(select(Staff.id).where(Staff.username == username))
    assert found is not None, username
    return found


def tally(db: Session, seller: int, category: str, period: str) -> int:
    return (
        db.scalar(
            select(Tally.count).where(
                Tally.seller_id == seller, Tally.category_code == category, Tally.period == period
            )
        )
        or 0
    )


def event_json(db: Session, event_id: int | None) -> dict[str, Any]:
    assert event_id is not None
    db.expire_all()
    return events_json(db, [db.get_one(CrmEvent, event_id)])[0]


def event_by_source(db: Session, source_kind: str, source_id: str) -> dict[str, Any]:
    events = list(
        db.scalars(
            select(CrmEvent).where(
                CrmEvent.source_kind == source_kind, CrmEvent.source_id == source_id
            )
        )
    )
    assert len(events) == 1, f"{len(events)} events for {source_kind} {source_id}"
    return events_json(db, events)[0]
