"""Ingest of ``crm.call/1`` call status updates: every update of one call merges into one event.

The update is added to the ledger, the call's event locked (or created), and its state folded
from every accepted update (``tasks.ingest.call_state``); a call's first update, the usual
case, makes its event whole in one INSERT instead. Then the open event's party is checked
again under its keys' locks (``tasks.relink``), the unknown-party lead rule applied
(``tasks.leads``), its recording stored or fetched, and its counts moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from models.base import utcnow
from models.db import is_postgresql
from models.events import CrmEvent
from models.schemas.call import SCHEMA, CallMessageSchema
from models.schemas.common import dump_loaded, fitted_schema, load_message
from tasks.attach import attach
from tasks.context import StageContext
from tasks.erasure import refuse_erased
from tasks.ingest.call_state import (
    CallLookups,
    DerivedCall,
    apply_call_state,
    call_updates,
    derive_call,
    fold_updates,
    insert_new_call,
    new_call_columns,
    write_call_relations,
)
from tasks.leads import apply_lead_rule
from tasks.relink import recheck_open_event
from tasks.store import (
    UNCLASSIFIED,
    StageResult,
    TallyKey,
    canonical_hash,
    link_inbound,
    lock_calls,
    lock_event,
    lock_existing_event,
    move_tallies,
    record_inbound_update,
    tally_keys,
)
from tasks.telephony.recordings import link_recordings


@dataclass
class CallStageResult(StageResult):
    """A stage result plus the recordings to fetch once the event is committed."""

    recordings_to_fetch: list[dict[str, Any]] = field(default_factory=list)


def ingest_call(session: Session, ctx: StageContext, payload: Any) -> CallStageResult:
    schema = fitted_schema(CallMessageSchema, payload)
    message = load_message(schema, payload, SCHEMA)
    lock_calls(session, [(message["source_system"], message["call_id"])])
    # The fold works on the validated values in wire form ("448" and 448 are one duration).
    normalised = dump_loaded(schema, message)
    ledger_payload = _ledger_payload(normalised)
    inbound_id, earlier = record_inbound_update(
        session,
        idempotency_key=f"call:{canonical_hash(normalised)}",
        schema=SCHEMA,
        source_kind="call",
        source_system=message["source_system"],
        source_id=message["call_id"],
        payload=ledger_payload,
    )
    if inbound_id is None:
        return CallStageResult("duplicate", detail="this update was already accepted")

    event, created, before, state, derived = _fold_into_event(
        session,
        ctx,
        {
            "source_system": message["source_system"],
            "source_kind": "call",
            "source_id": message["call_id"],
        },
        ledger_payload,
        inbound_id,
        first=not earlier,
    )
    if derived.link["link_state"] == "unlinked":
        # An erased person's number is unknown by now: a late update or a new call naming it
        # is refused (the transaction rolls back), kept without it. Known numbers cost nothing.
        refuse_erased(
            session, ctx.settings, payload, phones=[message.get("from_"), message.get("to")]
        )
    # The party counts as unknown only if it is still unknown under its keys' locks (taken with
    # the keys); then the lead rule, which may make the call its party's lead.
    recheck_open_event(session, ctx, event)
    apply_lead_rule(session, ctx, event, requested_category=derived.requested_category, new=created)

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
    fetches = link_recordings(session, ctx.settings, event, state["recordings"])

    session.flush()
    sellers = move_tallies(session, before, tally_keys(session, event))
    return CallStageResult(
        "stored",
        event.id,
        "created" if created else "merged",
        sellers_to_refresh=sellers,
        recordings_to_fetch=fetches,
    )


def _fold_into_event(
    session: Session,
    ctx: StageContext,
    key: dict[str, str],
    update: dict[str, Any],
    inbound_id: int,
    *,
    first: bool,
) -> tuple[CrmEvent, bool, set[TallyKey], dict[str, Any], DerivedCall]:
    """The call's event, locked, with ``update`` (ledger row ``inbound_id``, linked to the
    event here) folded in: (event, created, its tally keys before, the folded state, what the
    state made of it).

    ``first``: the ledger held no earlier update of the call (as far as it knew).
    """
    if first:
        # The call's first update, the usual case: its event is made from this update alone
        # and inserted whole. Should another transaction insert it first, the insert waits
        # for that one and finds its event: the updates are then folded as below.
        state = fold_updates([update])
        derived = derive_call(CallLookups(session, ctx.settings), ctx, state, [])
        if is_postgresql(session):
            # One statement for the event, its relations and the ledger's link to it.
            inserted = insert_new_call(session, ctx, key, derived, inbound_id)
            if inserted is not None:
                return inserted, True, set(), state, derived
            event, created = lock_existing_event(session, **key), False
            assert event is not None  # the insert met it; events are deleted only by hand
        else:
            event, created = lock_event(session, **key, defaults=new_call_columns(derived))
            if created:
                write_call_relations(session, ctx, event, derived, new=True)
                link_inbound(session, inbound_id, event.id)
                return event, True, set(), state, derived
    else:
        # Serialises every update of this call (see lock_event): whoever holds the lock folds
        # every update committed before it, plus its own.
        found = lock_existing_event(session, **key)
        if found is None:  # its event was deleted: made again, from all of its updates
            defaults = UNCLASSIFIED | {"occurred_at": utcnow()}
            event, created = lock_event(session, **key, defaults=defaults)
        else:
            event, created = found, False
    link_inbound(session, inbound_id, event.id)
    before = set() if created else tally_keys(session, event)
    state = fold_updates(call_updates(session, event))
    derived = apply_call_state(session, ctx, event, state, [], new=created)
    return event, created, before, state, derived


def _ledger_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The update as kept in the ledger: inline recordings live in the document store instead."""
    recording = payload.get("recording")
    if isinstance(recording, dict) and recording.get("content_b64"):
        return {**payload, "recording": {**recording, "content_b64": "<stored as a document>"}}
    return payload
