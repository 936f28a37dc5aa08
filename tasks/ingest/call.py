"""Ingest of ``crm.call/1`` call status updates: every update of one call merges into one event.

The merged state is a fold over *all* accepted updates of the call, ordered by status rank and
sequence, so the stored event does not depend on the order in which updates arrived.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from celery import shared_task
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.base import utcnow
from models.events import CrmEvent, FollowUp
from models.ledger import InboundMessage
from models.parties import Customer
from models.schemas.call import SCHEMA, STATUS_RANK, CallMessageSchema
from models.schemas.common import load_message
from tasks.attach import attach
from tasks.classify import ClassificationRequest, classify
from tasks.context import StageContext
from tasks.match import PartyMatch, customer_by_number, find_staff, is_internal_number, match_phone
from tasks.periods import aware
from tasks.store import (
    StageResult,
    add_participants,
    canonical_hash,
    lock_event,
    record_inbound,
    set_properties,
    tally_keys,
    touch_tallies,
)
from workers.base import CrmTask

#: A missed inbound call from a known customer opens a follow-up for the seller.
MISSED_STATUSES = {"missed", "busy", "voicemail", "failed"}
#: Among terminal statuses of equal sequence, the more informative one wins (deterministic).
TERMINAL_PREFERENCE = {"completed": 5, "voicemail": 4, "missed": 3, "busy": 2, "failed": 1}
MERGED_FIELDS = (
    "direction",
    "from",
    "to",
    "agent",
    "started_at",
    "answered_at",
    "ended_at",
    "duration_s",
    "note",
    "category",
    "class",
    "type",
    "customer_number",
)


def ingest_call(session: Session, ctx: StageContext, payload: Any) -> StageResult:
    schema = CallMessageSchema()
    message = load_message(schema, payload, SCHEMA)
    # The fold works on the validated values in wire form ("448" and 448 are one duration).
    normalised = schema.dump(message)
    inbound = record_inbound(
        session,
        idempotency_key=f"call:{canonical_hash(normalised)}",
        schema=SCHEMA,
        source_kind="call",
        source_system=message["source_system"],
        source_id=message["call_id"],
        payload=_ledger_payload(normalised),
    )
    if inbound is None:
        return StageResult("duplicate", detail="this update was already accepted")

    event, created = lock_event(
        session,
        source_system=message["source_system"],
        source_kind="call",
        source_id=message["call_id"],
        defaults={
            "category_code": "crm_event",
            "class_code": "events",
            "type_code": "crm_event",
            "occurred_at": utcnow(),
        },
    )
    before = tally_keys(session, event)
    updates = session.scalars(
        select(InboundMessage.payload)
        .where(
            InboundMessage.source_kind == "call",
            InboundMessage.source_system == message["source_system"],
            InboundMessage.source_id == message["call_id"],
        )
        .order_by(InboundMessage.id)
    ).all()
    state = fold_updates(updates)
    notes: list[str] = []
    apply_call_state(session, ctx, event, state, notes)
    inbound.event_id = event.id

    recording = message.get("recording")
    if recording and recording.get("content_b64"):
        attach(
            session,
            ctx.settings,
            event.id,
            content=recording["content_b64"],
            filename=recording.get("filename") or f"{message['call_id']}-recording",
            declared_type=recording.get("media_type"),
            role="recording",
        )
    elif recording and recording.get("url"):
        event.details = {**event.details, "recording_url": recording["url"]}

    session.flush()
    sellers = touch_tallies(session, before | tally_keys(session, event))
    return StageResult(
        "stored", event.id, "created" if created else "merged", sellers_to_refresh=sellers
    )


def _ledger_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The update as kept in the ledger: inline recordings live in the document store instead."""
    recording = payload.get("recording")
    if isinstance(recording, dict) and recording.get("content_b64"):
        return {**payload, "recording": {**recording, "content_b64": "<stored as a document>"}}
    return payload


def _update_order(update: dict[str, Any]) -> tuple[int, int, int, str]:
    status = update.get("status") or ""
    rank = STATUS_RANK.get(status, 0)
    sequence = update.get("sequence")
    return (
        rank,
        sequence if isinstance(sequence, int) else -1,
        TERMINAL_PREFERENCE.get(status, 0),
        canonical_hash(update),
    )


def fold_updates(updates: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge every update of one call: status only moves forward, empty never overwrites known.

    Updates are applied in (status rank, sequence, …) order, so a late "ringing" cannot
    overwrite "completed" and any permutation of the same updates gives the same state.
    """
    state: dict[str, Any] = {"raw_statuses": [], "properties": set(), "updates": len(updates)}
    for change in sorted(updates, key=_update_order):
        status = change.get("status")
        if status:
            if status in STATUS_RANK:
                state["status"] = status
            elif status not in state["raw_statuses"]:
                state["raw_statuses"].append(status)
        for name in MERGED_FIELDS:
            value = change.get(name)
            if value not in (None, "", []):
                state[name] = value
        state["properties"] |= set(change.get("properties") or [])
        if isinstance(change.get("sequence"), int):
            state["sequence"] = max(state.get("sequence", -1), change["sequence"])
    state["raw_statuses"].sort()
    state["properties"] = sorted(state["properties"])
    return state


def _parse_time(
    value: str | None, ctx: StageContext, notes: list[str], label: str
) -> datetime | None:
    if not value:
        return None
    return aware(datetime.fromisoformat(value), ctx.settings.zone, notes, label)


def apply_call_state(
    session: Session, ctx: StageContext, event: CrmEvent, state: dict[str, Any], notes: list[str]
) -> None:
    settings = ctx.settings
    started = _parse_time(state.get("started_at"), ctx, notes, "started_at")
    answered = _parse_time(state.get("answered_at"), ctx, notes, "answered_at")
    ended = _parse_time(state.get("ended_at"), ctx, notes, "ended_at")
    duration = state.get("duration_s")
    if duration is None and answered and ended and ended >= answered:
        duration = int((ended - answered).total_seconds())
    direction = state.get("direction")
    status = state.get("status") or (state["raw_statuses"][-1] if state["raw_statuses"] else None)

    # Who is outside (the customer side) and who is inside (staff)?
    external_raw = state.get("to") if direction == "outbound" else state.get("from")
    internal_raw = state.get("from") if direction == "outbound" else state.get("to")
    agent = find_staff(session, state.get("agent"), settings)
    internal_staff = find_staff(session, internal_raw, settings)
    match = PartyMatch()
    if is_internal_number(session, external_raw, settings):
        match.notes.append(f"{external_raw} is our own number or a staff member: not a customer")
    else:
        match = match_phone(session, external_raw, settings)
    if customer := customer_by_number(session, state.get("customer_number")):
        if match.customer_id not in (None, customer.id):
            match.notes.append("customer_number given by the message overrides the number match")
            match.contact_id, match.candidates = None, []
        match.customer_id = customer.id
        match.state = "ambiguous" if match.candidates else "linked"
    elif state.get("customer_number"):
        match.notes.append(f"unknown customer_number {state['customer_number']!r}")

    seller = agent or internal_staff
    seller_id = seller.id if seller else None
    if seller_id is None and match.customer_id is not None:
        seller_id = session.scalar(
            select(Customer.seller_id).where(Customer.id == match.customer_id)
        )
        if seller_id is not None:
            match.notes.append("no staff member handled it: assigned to the customer's seller")

    classification = classify(
        session,
        ClassificationRequest(
            source_kind="call",
            category=state.get("category"),
            class_code=state.get("class"),
            type_code=state.get("type"),
            properties=tuple(state["properties"]),
        ),
    )
    if state["raw_statuses"]:
        notes.append("provider statuses kept raw: " + ", ".join(state["raw_statuses"]))

    event.occurred_at = started or answered or ended or event.occurred_at
    event.ended_at = ended
    event.duration_s = duration
    event.direction = direction
    event.status = status
    event.subject = _subject(direction, external_raw, status)
    event.body = state.get("note") or ""
    event.category_code = classification.category
    event.class_code = classification.class_code
    event.type_code = classification.type_code
    event.classification_note = classification.note
    if event.linked_by != "hand":
        event.customer_id = match.customer_id
        event.contact_id = match.contact_id
        event.link_state = match.state
        event.candidates = match.candidates
        event.match_note = "; ".join(match.notes + notes)
        event.seller_id = seller_id
    event.details = {
        **event.details,
        "from": state.get("from"),
        "to": state.get("to"),
        "agent": state.get("agent"),
        "answered_at": answered.isoformat() if answered else None,
        "raw_statuses": state["raw_statuses"],
        "updates": state["updates"],
        "last_sequence": state.get("sequence"),
    }
    session.flush()
    set_properties(session, event, classification.properties)
    add_participants(session, event, [agent.id if agent else None, event.seller_id])
    _follow_up(session, event)


def _subject(direction: str | None, number: str | None, status: str | None) -> str:
    label = {"inbound": "Inbound call", "outbound": "Outbound call"}.get(direction or "", "Call")
    parts = [label]
    if number:
        parts.append(("from " if direction == "inbound" else "to ") + number)
    if status:
        parts.append(f"({status})")
    return " ".join(parts)


def _follow_up(session: Session, event: CrmEvent) -> None:
    """Missed inbound call from a known customer: open a follow-up; a later contact closes it."""
    if event.customer_id is None:
        return
    if event.direction == "inbound" and event.status in MISSED_STATUSES:
        if session.scalar(select(FollowUp.id).where(FollowUp.event_id == event.id)) is None:
            seller_id = session.scalar(
                select(Customer.seller_id).where(Customer.id == event.customer_id)
            )
            session.add(
                FollowUp(
                    event_id=event.id,
                    seller_id=seller_id or event.seller_id,
                    customer_id=event.customer_id,
                    reason=f"missed call: call back ({event.subject})",
                )
            )
    elif event.status == "completed" or event.direction == "outbound":
        session.execute(
            update(FollowUp)
            .where(
                FollowUp.customer_id == event.customer_id,
                FollowUp.state == "open",
                FollowUp.created_at <= utcnow(),
                FollowUp.event_id != event.id,
                FollowUp.event_id.in_(
                    select(CrmEvent.id).where(CrmEvent.occurred_at <= event.occurred_at)
                ),
            )
            .values(state="closed", closed_at=utcnow(), closed_by_event_id=event.id)
        )


@shared_task(name="crm.ingest.call", base=CrmTask, bind=True)
def ingest_call_task(self: CrmTask, message: Any) -> str:
    """crm.ingest.call: one call status update (DESIGN §5)."""
    return self.run_ingest(ingest_call, message)
