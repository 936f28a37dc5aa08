"""An event named as its sender knows it: a call or a visit by its system and id, an email by
its Message-ID (``crm.document/1`` and ``crm.task/1`` name events this way)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent
from models.invalid import BadInput

#: The key ``source_system`` of every email event (one email through two gateways is one event).
EMAIL_KEY_SYSTEM = "email"


def referenced_event(session: Session, reference: dict[str, Any], what: str) -> CrmEvent:
    """The event ``reference`` names; bad input that says so when there is none (yet)."""
    kind = reference["kind"]
    if kind == "email":
        system, source_id = EMAIL_KEY_SYSTEM, reference["id"].strip().strip("<>").strip()
        named = f"the email {source_id!r}"
    else:
        system, source_id = reference["source_system"], reference["id"]
        named = f"the {kind} {source_id!r} of {system}"
    event = session.scalar(
        select(CrmEvent).where(
            CrmEvent.source_system == system,
            CrmEvent.source_kind == kind,
            CrmEvent.source_id == source_id,
        )
    )
    if event is None:
        reason = (
            f"no event for {named}: {what} are added to stored events; replay this message "
            "once the event is stored"
        )
        raise BadInput(reason, {"event": [reason]})
    return event
