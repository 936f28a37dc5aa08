"""crm.document/1: files added to an event already stored, named as its sender knows it."""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.documents import EventDocument
from models.events import CrmEvent
from tasks.attach import read_blob
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.call import ingest_call
from tasks.ingest.document import ingest_document
from tasks.ingest.email import ingest_email
from tests.conftest import ROOT
from tests.messages import outbound_call

PDF = b"%PDF-1.4\n%\xc7\xec\x8f\xa2\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n"


def document(event: dict[str, Any], filename: str = "Tarjous_allekirjoitettu.pdf") -> Any:
    return {
        "schema": "crm.document/1",
        "source_system": "erp",
        "event": event,
        "documents": [
            {
                "filename": filename,
                "media_type": "application/pdf",
                "content_b64": base64.b64encode(PDF).decode(),
            }
        ],
        "note": "signed by the customer",
    }


def documents_of(db: Session, event_id: int | None) -> list[EventDocument]:
    return list(
        db.scalars(
            select(EventDocument)
            .where(EventDocument.event_id == event_id)
            .order_by(EventDocument.id)
        )
    )


def test_a_document_joins_the_call_it_names(world: Session, ctx: StageContext) -> None:
    call = ingest_call(world, ctx, outbound_call("doc-1", "2026-11-24T09:00:00+02:00"))
    message = document({"kind": "call", "source_system": "pbx-hki", "id": "doc-1"})
    result = ingest_document(world, ctx, message)
    assert (result.outcome, result.event_id) == ("stored", call.event_id)
    [stored] = documents_of(world, call.event_id)
    assert (stored.filename, stored.role, stored.media_type) == (
        "Tarjous_allekirjoitettu.pdf",
        "attachment",
        "application/pdf",
    )
    assert stored.note == "added by erp: signed by the customer"
    assert stored.sha256 and read_blob(world, ctx.settings, stored.sha256) == PDF

    # Delivered again: a duplicate; sent again as a new message: the file is not added twice.
    assert ingest_document(world, ctx, message).outcome == "duplicate"
    again = replace(ctx, task_id=str(uuid.uuid4()))
    assert ingest_document(world, again, message).outcome == "stored"
    assert len(documents_of(world, call.event_id)) == 1


def test_an_email_is_named_by_its_message_id(world: Session, ctx: StageContext) -> None:
    raw = (ROOT / "examples" / "emails" / "bcc-offer-with-pdf.eml").read_bytes()
    email = {
        "schema": "crm.email/1",
        "source_system": "smtp-gw",
        "raw_b64": base64.b64encode(raw).decode(),
    }
    stored = ingest_email(world, ctx, email)
    event = world.get(CrmEvent, stored.event_id)
    assert event is not None
    named = {"kind": "email", "id": f"<{event.source_id}>"}
    result = ingest_document(world, ctx, document(named, "../../etc/passwd"))
    assert result.event_id == event.id
    names = [d.filename for d in documents_of(world, event.id)]
    added = names[-1]
    assert "/" not in added and ".." not in added and added.endswith("passwd")


@pytest.mark.parametrize(
    ("event", "said"),
    [
        (
            {"kind": "call", "source_system": "pbx-hki", "id": "never-called"},
            "no event for the call 'never-called' of pbx-hki: documents are added to stored "
            "events; replay this message once the event is stored",
        ),
        ({"kind": "email", "id": "<nobody@example.invalid>"}, "no event for the email"),
        ({"kind": "visit", "id": "v-1"}, "event: source_system: a visit is named by"),
        ({"kind": "fax", "id": "1"}, "event: kind: Must be one of: call, email, visit."),
    ],
)
def test_an_event_that_is_not_there_is_a_reason_not_a_loss(
    world: Session, ctx: StageContext, event: dict[str, Any], said: str
) -> None:
    with pytest.raises(BadInput) as raised:
        ingest_document(world, ctx, document(event))
    assert said in raised.value.reason
