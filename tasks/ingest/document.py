"""Document stage: ``crm.document/1`` adds files to an event that is already stored.

The event is named as its sender knows it (a call or a visit by its system and id, an email by
its Message-ID). A document the event has already is not stored again (``attach`` is
idempotent), so a message sent twice adds nothing; one for an event not stored (yet) is
rejected with the reason and kept, to be replayed once the event is there.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from models.schemas.common import load_message, shared_schema
from models.schemas.document import SCHEMA, DocumentMessageSchema
from tasks.attach import attach
from tasks.context import StageContext
from tasks.references import referenced_event
from tasks.store import StageResult, record_inbound, upsert_key


def ingest_document(session: Session, ctx: StageContext, payload: Any) -> StageResult:
    message = load_message(shared_schema(DocumentMessageSchema), payload, SCHEMA)
    event = referenced_event(session, message["event"], "documents")
    inbound = record_inbound(
        session,
        idempotency_key=upsert_key("document", ctx, payload),
        schema=SCHEMA,
        source_kind="document",
        source_system=message["source_system"],
        source_id=f"{event.source_kind}:{event.source_system}:{event.source_id}",
        # The ledger keeps what was sent, not the files themselves (they are the documents).
        payload={
            **payload,
            "documents": [
                {k: v for k, v in d.items() if k != "content_b64"}
                for d in payload.get("documents", [])
            ],
        },
        event_id=event.id,
    )
    if inbound is None:
        return StageResult("duplicate", event.id, "this document message was already accepted")
    note = f"added by {message['source_system']}" + (
        f": {message['note']}" if message.get("note") else ""
    )
    stored = [
        attach(
            session,
            ctx.settings,
            event.id,
            content=document["content_b64"],
            filename=document["filename"],
            declared_type=document.get("media_type"),
            role="photo" if document.get("media_type", "").startswith("image/") else "attachment",
            note=note,
        )
        for document in message["documents"]
    ]
    refused = [d.filename for d in stored if d.sha256 is None]
    detail = f"{len(stored) - len(refused)} document(s) added to event {event.id}"
    if refused:
        detail += f"; refused (kept as a listed stub with the reason): {', '.join(refused)}"
    sellers = {event.seller_id} if event.seller_id is not None else set()
    return StageResult("stored", event.id, detail, sellers_to_refresh=sellers)
