"""Set-based ingest of a batch's new calls: a backfill at the speed of the database.

A CDR backfill or a burst of call updates arrives as ``crm.batch/1`` messages of hundreds of
calls, nearly all of them new. Each would cost the call stage a dozen statements; here the
batch's new calls cost a few statements each for the whole batch: one multi-row insert each of
the ledger rows, the events, their properties, party keys and participants, one read of the
follow-ups they touch, one tally move. Matching and classification are asked once per distinct
number, agent and category (``CallLookups``).

The stored events are the call stage's own: the same fold of the same updates and the same
``derive_call``, so a call gives the same event, follow-ups and counts whichever way it came.
What this stage does not take is left to the call stage, message by message, in the batch's
transaction (``tasks.batch``):

- messages that do not validate (the call stage rejects them, with the reason);
- calls with updates accepted before (their fold needs the stored updates);
- calls with a recording (stored or fetched by the call stage);
- inbound calls from an unknown party while the lead rule may make them leads.

A concurrent writer that took one of the batch's calls or updates first (its row appears
while the batch inserts its own) makes the batch run every message through the call stage
instead: ``BatchRaced`` rolls back this stage's savepoint (``tasks.batch``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import BindParameter, bindparam, select, text, union, update
from sqlalchemy.orm import Session

from models.base import UTCDateTime, utcnow
from models.db import insert_rows, is_postgresql, table_of
from models.events import CrmEvent, EventParticipant, EventPropertyLink, FollowUp, counts
from models.invalid import BadInput
from models.ledger import InboundMessage
from models.parties import EventPartyKey
from models.schemas.call import SCHEMA, CallMessageSchema
from models.schemas.common import load_message, shared_schema
from tasks.context import StageContext
from tasks.erasure import erased_numbers
from tasks.ingest.call_state import (
    MISSED_CALL,
    CallLookups,
    DerivedCall,
    call_details,
    closed_by_later_calls,
    derive_call,
    fold_updates,
    is_missed_inbound,
    lock_customer,
    open_follow_ups,
    reaches_customer,
    reaches_customer_sql,
)
from tasks.leads import LEAD
from tasks.periods import period_keys
from tasks.store import (
    EVENT_KEY,
    BatchRaced,
    BulkResult,
    StageResult,
    TallyKey,
    canonical_hash,
    event_column_defaults,
    event_view,
    insert_new,
    lock_party_keys,
    party_keys,
    seller_zone,
)


@dataclass
class _Call:
    """One new call of the batch: its updates (index, ledger form) and what they make."""

    source_system: str
    call_id: str
    updates: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    #: index -> the update's canonical hash (its ledger key), taken once.
    digests: dict[int, str] = field(default_factory=dict)
    duplicates: list[int] = field(default_factory=list)
    derived: DerivedCall | None = None
    event: CrmEvent | None = None


def ingest_new_calls(
    session: Session,
    ctx: StageContext,
    messages: Sequence[tuple[int, Any]],
    before_leaving: Callable[[], None] = lambda: None,
) -> BulkResult:
    """Store the new calls among ``messages`` (index, message) set-based; see the docstring.

    What the stage leaves is known before it writes: ``before_leaving`` is called then, when it
    leaves any message, so that the batch takes what its message-by-message part needs first.
    """
    result = BulkResult()
    calls = _group(messages, result)
    _leave_existing(session, calls, result)
    _leave_erased(session, ctx, calls, result)
    lookups = CallLookups(session, ctx.settings)
    for call in list(calls.values()):
        state = fold_updates([payload for _index, payload in call.updates])
        call.derived = derive_call(lookups, ctx, state, [])
        if _may_become_a_lead(ctx, call.derived):
            _leave(calls, call, result)
    if result.left:
        before_leaving()
    if not calls:
        return result
    ordered = list(calls.values())  # in the batch's order, as the call stage stores them
    # The ledger first, as the call stage writes: a call stage storing one of these calls
    # meanwhile then waits on the batch, or the batch on it, never each on the other.
    inbound_ids = _insert_ledger(session, ordered)
    _insert_events(session, ordered)
    _link_ledger(session, ordered, inbound_ids)
    _insert_links(session, ctx, ordered, lookups)
    _follow_ups(session, ordered, lookups)
    zones: dict[int, ZoneInfo] = {}
    for call in ordered:
        event = call.event
        assert event is not None
        sellers = set()
        if event.seller_id is not None:
            sellers.add(event.seller_id)
        if event.seller_id is not None and counts(session, event):
            if (zone := zones.get(event.seller_id)) is None:
                zone = zones[event.seller_id] = seller_zone(session, event.seller_id)
            for period in period_keys(event.occurred_at, zone):
                result.deltas.append((TallyKey(event.seller_id, event.category_code, period), 1))
        for position, (index, _payload) in enumerate(call.updates):
            detail = "merged" if position else "created"
            result.results[index] = StageResult("stored", event.id, detail, sellers)
        for index in call.duplicates:
            result.results[index] = StageResult(
                "duplicate", detail="this update was already accepted"
            )
    return result


def _group(messages: Sequence[tuple[int, Any]], result: BulkResult) -> dict[tuple[str, str], _Call]:
    """Validate each message; group the valid ones by call, each update once."""
    schema = shared_schema(CallMessageSchema)
    calls: dict[tuple[str, str], _Call] = {}
    slow: set[tuple[str, str]] = set()
    seen: set[str] = set()
    for index, message in messages:
        try:
            loaded = load_message(schema, message, SCHEMA)
        except BadInput:
            result.left.append(index)  # the call stage rejects it, with its reason
            continue
        key = (loaded["source_system"], loaded["call_id"])
        call = calls.setdefault(key, _Call(*key))
        normalised = schema.dump(loaded)
        if normalised.get("recording"):
            slow.add(key)
        digest = canonical_hash(normalised)
        if digest in seen:
            call.duplicates.append(index)
        else:
            seen.add(digest)
            call.updates.append((index, normalised))
            call.digests[index] = digest
    for key in slow:
        _leave(calls, calls[key], result)
    return calls


def _leave(calls: dict[tuple[str, str], _Call], call: _Call, result: BulkResult) -> None:
    """The call stage takes this call's messages, in the batch's order."""
    del calls[(call.source_system, call.call_id)]
    result.left.extend(index for index, _payload in call.updates)
    result.left.extend(call.duplicates)
    result.left.sort()


def _leave_erased(
    session: Session, ctx: StageContext, calls: dict[tuple[str, str], _Call], result: BulkResult
) -> None:
    """Calls naming an erased person's number are the call stage's, which refuses them."""
    numbers = {
        value
        for call in calls.values()
        for _index, payload in call.updates
        for value in (payload.get("from"), payload.get("to"))
        if isinstance(value, str)
    }
    erased = erased_numbers(session, ctx.settings, numbers)
    if not erased:
        return
    for call in list(calls.values()):
        if any(p.get("from") in erased or p.get("to") in erased for _i, p in call.updates):
            _leave(calls, call, result)


def _leave_existing(
    session: Session, calls: dict[tuple[str, str], _Call], result: BulkResult
) -> None:
    """Calls with updates accepted before are the call stage's: their fold needs those updates.

    Asked of the ledger, not of the events: a call whose event was deleted keeps its updates,
    and a late update makes its event again from all of them.
    """
    by_system: dict[str, list[str]] = {}
    for system, call_id in calls:
        by_system.setdefault(system, []).append(call_id)
    # By the ledger's natural key, its system included (a batch has one, usually); PostgreSQL
    # takes the ids as one array: a short statement the driver parses once.
    earlier = _EARLIER_PG if is_postgresql(session) else _EARLIER
    for system, ids in sorted(by_system.items()):
        for start in range(0, len(ids), 1000):
            found = session.execute(
                earlier, {"system": system, "ids": ids[start : start + 1000]}
            ).scalars()
            for call_id in found:
                if (call := calls.get((system, call_id))) is not None:
                    _leave(calls, call, result)


_LEDGER = table_of(InboundMessage)
_EARLIER = (
    select(_LEDGER.c.source_id)
    .where(
        _LEDGER.c.source_kind == "call",
        _LEDGER.c.source_system == bindparam("system"),
        _LEDGER.c.source_id.in_(bindparam("ids", expanding=True)),
    )
    .distinct()
)
# One index probe per id, whatever the planner believes of the table: a backfill into a new
# database outruns ANALYZE, and with a ledger "too small to matter" an ``= ANY`` list became a
# filter over every call of the system, once per batch (0.1 ms per event at 10,000 rows).
_EARLIER_PG = text(
    "SELECT ids.id FROM unnest(CAST(:ids AS varchar[])) AS ids(id)"
    " CROSS JOIN LATERAL (SELECT 1 FROM inbound_message AS m WHERE m.source_kind = 'call'"
    " AND m.source_system = :system AND m.source_id = ids.id LIMIT 1) AS found"
)


def _may_become_a_lead(ctx: StageContext, derived: DerivedCall) -> bool:
    """An inbound call from an unknown party may be a lead (``tasks.leads``): the call stage's."""
    return (
        derived.columns["direction"] == "inbound"
        and derived.link["link_state"] == "unlinked"
        and (ctx.settings.lead_from_unknown_calls or derived.columns["category_code"] == LEAD)
    )


def _insert_ledger(session: Session, calls: Sequence[_Call]) -> dict[int, int]:
    """The updates' ledger rows, in one statement: message index -> ledger id."""
    now = utcnow()
    rows = [
        {
            "idempotency_key": f"call:{call.digests[index]}",
            "schema": SCHEMA,
            "source_kind": "call",
            "source_system": call.source_system,
            "source_id": call.call_id,
            "payload": payload,
            "event_id": None,
            "received_at": now,
        }
        for call in calls
        for index, payload in call.updates
    ]
    ids = insert_new(session, table_of(InboundMessage), rows, ("idempotency_key",))
    if ids is None:
        raise BatchRaced("an update of the batch was accepted meanwhile")
    indexes = [index for call in calls for index, _payload in call.updates]
    return dict(zip(indexes, ids, strict=True))


def _link_ledger(session: Session, calls: Sequence[_Call], inbound_ids: dict[int, int]) -> None:
    """Each ledger row names its call's event: on PostgreSQL one statement over two arrays."""
    pairs = [
        (inbound_ids[index], call.event.id)
        for call in calls
        if call.event is not None
        for index, _payload in call.updates
    ]
    if is_postgresql(session):
        session.execute(
            _LINK_INBOUND_PG,
            {"ids": [ledger for ledger, _ in pairs], "events": [event for _, event in pairs]},
        )
    else:
        session.execute(_LINK_INBOUND, [{"inbound_id": i, "event": e} for i, e in pairs])


_LINK_INBOUND = (
    update(table_of(InboundMessage))
    .where(table_of(InboundMessage).c.id == bindparam("inbound_id"))
    .values(event_id=bindparam("event"))
)
_LINK_INBOUND_PG = text(
    "UPDATE inbound_message SET event_id = link.event_id"
    " FROM unnest(CAST(:ids AS bigint[]), CAST(:events AS bigint[])) AS link(id, event_id)"
    " WHERE inbound_message.id = link.id"
)


def _insert_events(session: Session, calls: Sequence[_Call]) -> None:
    """The events, in one statement; each call gets its (detached, as if read) event."""
    now = utcnow()
    defaults = event_column_defaults()
    rows: list[dict[str, Any]] = []
    for call in calls:
        derived = call.derived
        assert derived is not None
        columns = dict(derived.columns)
        if columns["occurred_at"] is None:
            columns["occurred_at"] = now
        rows.append(
            {
                **defaults,
                "source_system": call.source_system,
                "source_kind": "call",
                "source_id": call.call_id,
                "created_at": now,
                "updated_at": now,
                **columns,
                **derived.link,
                "details": call_details(derived, derived.link["contact_id"]),
            }
        )
    ids = insert_new(session, table_of(CrmEvent), rows, EVENT_KEY)
    if ids is None:
        raise BatchRaced("a call of the batch was stored meanwhile")
    for call, row, event_id in zip(calls, rows, ids, strict=True):
        # Read as the stored event is read (counts, follow-ups), never written.
        call.event = event_view(row | {"id": event_id})


def _insert_links(
    session: Session, ctx: StageContext, calls: Sequence[_Call], lookups: CallLookups
) -> None:
    """Properties, party keys and participants of the new events, one statement each.

    An event that is not linked takes its party keys' locks, and its party is then matched
    again: a party change committed in between would have linked it (``record_party_keys``,
    ``tasks.relink.recheck_open_event``). If it would, the call stage takes the batch instead.
    """
    properties: list[dict[str, Any]] = []
    keys: list[dict[str, Any]] = []
    participants: list[dict[str, Any]] = []
    open_keys = []
    for call in calls:
        event, derived = call.event, call.derived
        assert event is not None and derived is not None
        properties += [{"event_id": event.id, "property_code": c} for c in derived.properties]
        found = party_keys(
            session,
            ctx.settings,
            phones=[derived.outside_number],
            customer_numbers=[derived.customer_number],
        )
        keys += [
            {"event_id": event.id, "kind": k.kind, "value": k.value, "position": position}
            for position, k in enumerate(found)
        ]
        if event.link_state != "linked":
            open_keys += found
        staff = sorted({s for s in (*derived.staff_ids, event.seller_id) if s is not None})
        participants += [{"event_id": event.id, "staff_id": s} for s in staff]
    for model, rows in (
        (EventPropertyLink, properties),
        (EventPartyKey, keys),
        (EventParticipant, participants),
    ):
        insert_rows(session, table_of(model), rows)
    if open_keys:
        lock_party_keys(session, open_keys)
        fresh = CallLookups(session, ctx.settings)
        for call in calls:
            event = call.event
            assert event is not None and call.derived is not None
            if event.link_state == "linked":
                continue
            state = fold_updates([payload for _index, payload in call.updates])
            again = derive_call(fresh, ctx, state, []).link
            if (again["customer_id"], again["contact_id"], again["link_state"]) != (
                event.customer_id,
                event.contact_id,
                event.link_state,
            ):
                raise BatchRaced(f"the party of call {call.call_id} changed meanwhile")


def _follow_ups(session: Session, calls: Sequence[_Call], lookups: CallLookups) -> None:
    """Open a follow-up for each missed call, then settle every follow-up the new calls touch.

    As ``reconcile_follow_ups`` does for one call, under the same customer locks: a follow-up
    is closed by the first later call that reached the customer, else open. The follow-ups
    that can change are those of the customers the new calls concern whose missed call came
    before one of the new calls that reached the customer, and which are open or closed by a
    call after it; one read settles them all.
    """
    events = [call.event for call in calls if call.event is not None]
    missed = [e for e in events if is_missed_inbound(e)]
    closers = [e for e in events if e.customer_id is not None and reaches_customer(e)]
    customers = sorted({e.customer_id for e in (*missed, *closers) if e.customer_id is not None})
    if not customers:
        return
    for customer_id in customers:
        lock_customer(session, customer_id)
    now = utcnow()
    if missed:
        insert_rows(
            session,
            table_of(FollowUp),
            [
                {
                    "event_id": event.id,
                    "seller_id": lookups.responsible_seller(event.customer_id) or event.seller_id,
                    "customer_id": event.customer_id,
                    "reason": f"missed call: call back ({event.subject})",
                    "state": "open",
                    "created_at": now,
                    "closed_at": None,
                    "closed_by_event_id": None,
                }
                for event in missed
                if event.customer_id is not None
            ],
        )
    # Closed by a call after the earliest new one that reached the customer (none: no bound).
    earliest = min((e.occurred_at for e in closers), default=None)
    settled = _SETTLED_PG if is_postgresql(session) else _SETTLED
    rows = session.execute(settled, {"customers": customers, "after": earliest}).all()
    changed = []
    for follow_up_id, state, closed_by, closer in rows:
        if closer is None:
            if state != "open" or closed_by is not None:
                changed.append({"fid": follow_up_id, "state": "open", "at": None, "by": None})
        elif closed_by != closer or state != "closed":
            changed.append({"fid": follow_up_id, "state": "closed", "at": now, "by": closer})
    if changed:
        session.execute(_FOLLOW_UP_SETTLE, changed)


_FOLLOW_UP_SETTLE = (
    update(table_of(FollowUp))
    .where(table_of(FollowUp).c.id == bindparam("fid"))
    .values(
        state=bindparam("state"),
        closed_at=bindparam("at"),
        closed_by_event_id=bindparam("by"),
    )
)


def _settled_query(postgresql: bool) -> Any:
    """The follow-ups that new calls may settle, each with its closer as it should be now:
    the customers' open ones, and those closed by one of their calls after ``after``, each
    part by index as for one call (``tasks.ingest.call_state``), never all the follow-ups of a
    busy customer's past, which a year's backfill read again with every batch.
    """
    follow_up = FollowUp
    customers: BindParameter[list[int]] = bindparam("customers", expanding=True)
    closer = (
        select(CrmEvent.id)
        .where(
            CrmEvent.customer_id == follow_up.customer_id,
            CrmEvent.id != MISSED_CALL.id,
            CrmEvent.occurred_at > MISSED_CALL.occurred_at,
            reaches_customer_sql(CrmEvent),
        )
        .order_by(CrmEvent.occurred_at, CrmEvent.id)
        .limit(1)
        .correlate(follow_up, MISSED_CALL)
        .scalar_subquery()
    )
    after = bindparam("after", type_=UTCDateTime())
    candidates = union(
        open_follow_ups(customers),
        closed_by_later_calls(customers, after, postgresql=postgresql),
    )
    return (
        select(follow_up.id, follow_up.state, follow_up.closed_by_event_id, closer)
        .join(MISSED_CALL, MISSED_CALL.id == follow_up.event_id)
        .where(follow_up.id.in_(candidates))
        .order_by(follow_up.id)
    )


_SETTLED = _settled_query(postgresql=False)
_SETTLED_PG = _settled_query(postgresql=True)
