"""Set-based ingest of a batch's new calls: a backfill at the speed of the database.

A CDR backfill or a burst of call updates arrives as ``crm.batch/1`` messages of hundreds of
calls, nearly all of them new. Each would cost the call stage a dozen statements; here the
batch's new calls cost a few statements each for the whole batch: one multi-row insert each of
the ledger rows, the events, their properties, party keys and participants, two reads of the
follow-ups they touch (which ones, then each one's closer), one tally move. Matching and
classification are asked once per distinct number, agent and category (``CallLookups``).

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
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    BindParameter,
    Integer,
    all_,
    and_,
    bindparam,
    case,
    column,
    func,
    literal,
    select,
    text,
    true,
    union,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, aliased

from models.base import UTCDateTime, utcnow
from models.db import insert_rows, is_postgresql, table_of
from models.events import (
    CrmEvent,
    EventParticipant,
    EventPropertyLink,
    FollowUp,
    counts,
    reaches_customer_sql,
)
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
    derive_call,
    fold_updates,
    is_missed_inbound,
    lock_customer,
    next_reaching_call,
    open_follow_ups,
    reaches_customer,
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
    call after it: one read finds them (``_CANDIDATES_PG``), one reads each one's closer as it
    should be now (``_SETTLED_PG``), one update writes those that change.
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
    postgresql = is_postgresql(session)
    if postgresql:
        ids = session.scalars(_CANDIDATES_PG, {"customers": customers, **_probes(closers)}).all()
    else:
        # Closed by a call after the earliest new one that reached the customer (none: none).
        earliest = min((e.occurred_at for e in closers), default=None)
        ids = session.scalars(_CANDIDATES, {"customers": customers, "after": earliest}).all()
    # A statement of its own: the planner then knows how few they are, where statistics that
    # a backfill outran made it hash the whole event table to join them to their calls.
    settled = _SETTLED_PG if postgresql else _SETTLED
    rows = session.execute(settled, {"ids": sorted(set(ids))}).all() if ids else []
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


def _probes(closers: Sequence[CrmEvent]) -> dict[str, list[Any]]:
    """Where to look for the follow-ups that the new calls that reached their customer may now
    close (``_closed_by_next_calls``): for each customer, each such call's time and the next
    one's (the last: ``_NO_END``); and the new calls, which closed nothing yet."""
    times: dict[int, set[Any]] = {}
    for event in closers:
        assert event.customer_id is not None
        times.setdefault(event.customer_id, set()).add(event.occurred_at)
    probes: dict[str, list[Any]] = {"probe_customer": [], "probe_after": [], "probe_until": []}
    for customer_id, moments in sorted(times.items()):
        ordered = sorted(moments)
        probes["probe_customer"] += [customer_id] * len(ordered)
        probes["probe_after"] += ordered
        probes["probe_until"] += [*ordered[1:], _NO_END]
    probes["new_ids"] = [event.id for event in closers]
    return probes


#: The upper end of a customer's last probe: no call is later.
_NO_END = datetime.max.replace(tzinfo=UTC)


def _closed_by_next_calls() -> Any:
    """PostgreSQL: the follow-ups closed by the next call that reached the customer (of those
    stored before this batch) after each new one that did (``next_reaching_call``): of the
    closed ones, the only ones that a new call can now close.

    Each probe reads the customer's calls up to the next new one only: where none of theirs
    lies between two new calls, the later one's probe finds the same next call. So a probe
    never walks the batch's own later calls of a busy customer, and a batch of calls that
    arrive late (a second PBX's file of the same year) reads no more of the customer's past
    than one in order.
    """
    probe = (
        func.unnest(
            bindparam("probe_customer", type_=ARRAY(Integer)),
            bindparam("probe_after", type_=ARRAY(UTCDateTime())),
            bindparam("probe_until", type_=ARRAY(UTCDateTime())),
        )
        .table_valued(
            column("customer_id", Integer),
            column("after", UTCDateTime()),
            column("until", UTCDateTime()),
        )
        .render_derived(name="probe")
    )
    new_ids = bindparam("new_ids", type_=ARRAY(Integer))
    next_call = next_reaching_call(
        probe.c.customer_id,
        probe.c.after,
        until=probe.c.until,
        other_than=lambda later: later.id != all_(new_ids),
    ).lateral("next_one")
    was_closed = aliased(FollowUp, name="closed_by_next")
    # Each next call's by index, in a subquery of its own (OFFSET 0): a planner told that there
    # are hardly any follow-ups otherwise chose to scan them all for each next call. Those
    # missed after the new call are settled again for nothing (as they were): testing their
    # times here let it join the missed calls first.
    closed = (
        select(was_closed.id)
        .where(was_closed.closed_by_event_id == next_call.c.id)
        .offset(0)
        .lateral("closed_by_it")
    )
    return select(closed.c.id).select_from(probe).join(next_call, true()).join(closed, true())


def _closed_by_later_calls(customers: Any, after: Any) -> Any:
    """SQLite (no arrays to probe with): the customers' follow-ups closed by one of their calls
    after ``after``, the earliest new call that reached its customer. More than
    ``_closed_by_next_calls`` reads where calls arrive late, the same follow-ups settled."""
    later = aliased(CrmEvent, name="later_call")
    was_closed = aliased(FollowUp, name="closed_one")
    return (
        select(was_closed.id)
        .join(later, was_closed.closed_by_event_id == later.id)
        .where(
            later.customer_id.in_(customers),
            later.occurred_at > after,
            was_closed.customer_id.in_(customers),
        )
    )


def _candidates(postgresql: bool) -> Any:
    """The ids of the follow-ups that new calls may settle: the customers' open ones, and those
    that a new call may now close (``_closed_by_next_calls``), each part by index as for one
    call (``tasks.ingest.call_state``), never all the follow-ups of a busy customer's past,
    which a year's backfill would read again with every batch."""
    customers: BindParameter[list[int]] = bindparam("customers", expanding=True)
    return union(
        open_follow_ups(customers),
        _closed_by_next_calls()
        if postgresql
        else _closed_by_later_calls(customers, bindparam("after", type_=UTCDateTime())),
    )


_CANDIDATES = _candidates(postgresql=False)
_CANDIDATES_PG = _candidates(postgresql=True)


def _settled_query(postgresql: bool) -> Any:
    """Follow-ups by id, each with its closer as it should be now: the first call after the
    missed one that reached the customer (``next_reaching_call``).

    New calls can only move a closer earlier: where the follow-up's closer still reaches its
    customer after the missed call, the search ends at it, and reads the calls between the
    two, not all the customer's calls since (a year of them for a call missed in January).
    On PostgreSQL each follow-up is read by itself (a LATERAL subquery): a planner whose
    statistics a backfill outran otherwise hashed the whole event table to find their calls.
    """
    follow_up = FollowUp
    current = aliased(CrmEvent, name="current_closer")
    still_closes = and_(
        current.customer_id == follow_up.customer_id,
        current.occurred_at > MISSED_CALL.occurred_at,
        reaches_customer_sql(current),
    )
    closer = (
        next_reaching_call(
            follow_up.customer_id,
            MISSED_CALL.occurred_at,
            until=case((still_closes, current.occurred_at), else_=literal(_NO_END, UTCDateTime())),
            other_than=lambda later: later.id != MISSED_CALL.id,
        )
        .correlate(follow_up, MISSED_CALL, current)
        .scalar_subquery()
    )
    settled = (
        select(follow_up.id, follow_up.state, follow_up.closed_by_event_id, closer.label("closer"))
        .join(MISSED_CALL, MISSED_CALL.id == follow_up.event_id)
        .outerjoin(current, current.id == follow_up.closed_by_event_id)
    )
    if not postgresql:
        return settled.where(follow_up.id.in_(bindparam("ids", expanding=True))).order_by(
            follow_up.id
        )
    wanted = (
        func.unnest(bindparam("ids", type_=ARRAY(Integer)))
        .table_valued(column("id", Integer))
        .render_derived(name="wanted")
    )
    one = settled.where(follow_up.id == wanted.c.id).offset(0).lateral("settled")
    return select(one).select_from(wanted).join(one, true()).order_by(one.c.id)


_SETTLED = _settled_query(postgresql=False)
_SETTLED_PG = _settled_query(postgresql=True)
