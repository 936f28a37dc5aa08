"""Set-based ingest of a batch's calls: a backfill at the speed of the database.

A CDR backfill or a burst of call updates arrives as ``crm.batch/1`` messages of hundreds of
calls, nearly all of them new; a call task takes the live updates queued behind it, most of
them the next updates of calls stored a moment before. Each would cost the call stage a dozen
statements; here the batch's new calls cost a few statements each for the whole batch: one
multi-row insert each of the events, the ledger rows naming them, their properties, party
keys and participants, two reads of the follow-ups they touch (which ones, then each one's
closer), one tally move. Matching and classification are asked once per distinct number,
agent and category (``CallLookups``).

The stored events are the call stage's own: the same fold of the same updates and the same
``derive_call``, so a call gives the same event, follow-ups and counts whichever way it came.
What this stage does not take is left to the call stage, message by message, in the batch's
transaction (``tasks.batch``):

- messages that do not validate (the call stage rejects them, with the reason);
- calls with a recording (stored or fetched by the call stage);
- inbound calls from an unknown party while the lead rule may make them leads;
- updates of calls stored before, but on PostgreSQL those whose merge changes nothing but the
  event's own row and counts (``_merges_alone``): the next update of a linked call, answered,
  completed, sent again. Their earlier updates are read with the batch's, folded with the new
  ones, and the event rewritten in one statement for all of them.

The batch holds its calls' locks (``tasks.store.lock_calls``), so no other writer of them
comes between its reads and its writes. A writer that takes no call's lock and changed a
stored call's event after the batch read it, or a party change under the party keys' locks,
rolls this stage's savepoint back (``BatchRaced``): the stage runs once more, reading what the
writer committed, and if it races again every message goes through the call stage
(``tasks.batch``).
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
    any_,
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
from models.db import JsonText, chunked, insert_rows, is_postgresql, table_of
from models.events import (
    CrmEvent,
    EventParticipant,
    EventPropertyLink,
    FollowUp,
    reaches_customer_sql,
)
from models.invalid import BadInput
from models.ledger import InboundMessage
from models.parties import EventPartyKey
from models.schemas.call import SCHEMA, CallMessageSchema
from models.schemas.common import dump_loaded, fitted_schema, load_message, storable
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
from tasks.store import (
    EVENT_KEY,
    BatchRaced,
    BulkResult,
    StageResult,
    TallyKey,
    canonical_hash,
    canonical_text,
    event_column_defaults,
    event_view,
    insert_new,
    lock_party_keys,
    party_keys,
    tally_keys,
)


@dataclass
class _Call:
    """One new call of the batch: its updates (index, ledger form) and what they make."""

    source_system: str
    call_id: str
    updates: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    #: index -> the update's canonical hash (its ledger key), taken once.
    digests: dict[int, str] = field(default_factory=dict)
    #: index -> the update's canonical text, hashed for its key and stored as its payload.
    texts: dict[int, str] = field(default_factory=dict)
    duplicates: list[int] = field(default_factory=list)
    derived: DerivedCall | None = None
    event: CrmEvent | None = None
    #: A call stored before that this stage merges (PostgreSQL), as read before writing.
    stored: _Stored | None = None


@dataclass
class _Stored:
    """A call stored before: its earlier updates and its event as read, and what they make."""

    #: The earlier updates' payloads, in the ledger's order.
    payloads: list[dict[str, Any]]
    #: Its event's row as read (every column), and the row the merge makes of it.
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    #: Its event's properties, party keys ((kind, value) -> position) and participants.
    properties: set[str] = field(default_factory=set)
    keys: dict[tuple[str, str], int] = field(default_factory=dict)
    participants: set[int] = field(default_factory=set)
    is_lead: bool = False
    #: It reaches its customer now and did not before, or at another time: it may close their
    #: follow-ups (``_follow_ups``).
    settles: bool = False
    #: It reached its customer before and no longer does, or at another time or for another
    #: customer: the follow-ups it closed are settled again.
    released: bool = False


def ingest_new_calls(
    session: Session,
    ctx: StageContext,
    messages: Sequence[tuple[int, Any]],
    before_leaving: Callable[[], None] = lambda: None,
) -> BulkResult:
    """Store the new calls among ``messages`` (index, message), and merge the next updates of
    stored ones (PostgreSQL), set-based; see the module's docstring.

    What the stage leaves is known before it writes: ``before_leaving`` is called then, when it
    leaves any message, so that the batch takes what its message-by-message part needs first.
    """
    result = BulkResult()
    calls = _group(messages, result)
    _leave_existing(session, calls, result)
    _leave_erased(session, ctx, calls, result)
    lookups = CallLookups(session, ctx.settings)
    for call in list(calls.values()):
        earlier = call.stored.payloads if call.stored is not None else []
        state = fold_updates([*earlier, *(payload for _index, payload in call.updates)])
        call.derived = derive_call(lookups, ctx, state, [])
        if call.stored is None:
            if _may_become_a_lead(ctx, call.derived):
                _leave(calls, call, result)
        elif not _merges_alone(session, ctx, call, state):
            _leave(calls, call, result)
    if result.left:
        before_leaving()
    if not calls:
        return result
    ordered = list(calls.values())  # in the batch's order, as the call stage stores them
    new = [call for call in ordered if call.stored is None]
    merged = [call for call in ordered if call.stored is not None]
    # The events first, then the ledger rows naming them: every writer of these calls waits
    # on their locks (``lock_calls``), so no order of the two can meet another's, and each
    # ledger row is written once, not inserted and then updated with its event.
    _insert_events(session, new)
    _merge_stored(session, merged)
    _insert_ledger(session, ordered)
    _insert_links(session, ctx, new, lookups)
    _add_participants(session, merged)
    settling = [call.event for call in new]
    settling += [call.event for call in merged if call.stored and call.stored.settles]
    released = [event_view(c.stored.before) for c in merged if c.stored and c.stored.released]
    _follow_ups(session, [e for e in settling if e is not None], lookups, released)
    zones: dict[int, ZoneInfo] = {}
    for call in ordered:
        event = call.event
        assert event is not None
        after = tally_keys(session, event, zones)
        if call.stored is None:
            before: set[TallyKey] = set()
            sellers = {event.seller_id} if event.seller_id is not None else set()
        else:
            before = tally_keys(session, event_view(call.stored.before), zones)
            sellers = {key.seller_id for key in before | after}
        result.deltas += [(key, -1) for key in before - after]
        result.deltas += [(key, 1) for key in after - before]
        for position, (index, _payload) in enumerate(call.updates):
            detail = "merged" if position or call.stored is not None else "created"
            result.results[index] = StageResult("stored", event.id, detail, sellers)
        for index in call.duplicates:
            result.results[index] = StageResult(
                "duplicate", detail="this update was already accepted"
            )
    return result


def _group(messages: Sequence[tuple[int, Any]], result: BulkResult) -> dict[tuple[str, str], _Call]:
    """Validate each message; group the valid ones by call, each update once."""
    calls: dict[tuple[str, str], _Call] = {}
    slow: set[tuple[str, str]] = set()
    seen: set[str] = set()
    all_storable = storable([message for _index, message in messages])
    for index, message in messages:
        schema = fitted_schema(CallMessageSchema, message)
        try:
            loaded = load_message(schema, message, SCHEMA, known_storable=all_storable)
        except BadInput:
            result.left.append(index)  # the call stage rejects it, with its reason
            continue
        key = (loaded["source_system"], loaded["call_id"])
        call = calls.setdefault(key, _Call(*key))
        normalised = dump_loaded(schema, loaded)
        if normalised.get("recording"):
            slow.add(key)
        spelled = canonical_text(normalised)
        digest = canonical_hash(normalised, spelled)
        if digest in seen:
            call.duplicates.append(index)
        else:
            seen.add(digest)
            call.updates.append((index, normalised))
            call.digests[index] = digest
            call.texts[index] = spelled
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
    """Calls with updates accepted before: their fold needs those updates.

    Asked of the ledger, not of the events: a call whose event was deleted keeps its updates,
    and a late update makes its event again from all of them. On PostgreSQL the updates are
    read with the call's event (``_read_stored``), and whether the merge is this stage's is
    decided once they are folded (``_merges_alone``); elsewhere the call stage takes them.
    """
    if is_postgresql(session):
        _read_stored(session, calls, result)
        return
    by_system: dict[str, list[str]] = {}
    for system, call_id in calls:
        by_system.setdefault(system, []).append(call_id)
    for system, ids in sorted(by_system.items()):
        for chunk in chunked(ids):  # an IN list: with the system, within SQLite's limit
            found = session.execute(_EARLIER, {"system": system, "ids": chunk}).scalars()
            for call_id in found:
                if (call := calls.get((system, call_id))) is not None:
                    _leave(calls, call, result)


def _read_stored(session: Session, calls: dict[tuple[str, str], _Call], result: BulkResult) -> None:
    """PostgreSQL: the earlier updates of the batch's calls, by the ledger's natural key, and
    for the calls that have some their events, properties, party keys, participants and lead
    status, as they are before the batch writes (read again under the events' locks). An update
    accepted before is a duplicate; a call whose event was deleted is the call stage's."""
    by_system: dict[str, list[str]] = {}
    for system, call_id in calls:
        by_system.setdefault(system, []).append(call_id)
    earlier: dict[tuple[str, str], list[tuple[int, str, dict[str, Any]]]] = {}
    for system, ids in sorted(by_system.items()):
        for chunk in chunked(ids, 1000):
            found = session.execute(_EARLIER_PG, {"system": system, "ids": chunk})
            for call_id, ledger_id, key, payload in found:
                earlier.setdefault((system, call_id), []).append((ledger_id, key, payload))
    if not earlier:
        return
    events: dict[tuple[str, str], dict[str, Any]] = {}
    for system, ids in sorted(by_system.items()):
        wanted = [call_id for call_id in ids if (system, call_id) in earlier]
        if not wanted:
            continue
        for row in session.execute(_STORED_EVENTS, {"system": system, "ids": wanted}).mappings():
            events[(system, row["source_id"])] = dict(row)
    for key, updates in earlier.items():
        call = calls[key]
        updates.sort(key=lambda row: row[0])
        known = {idempotency_key for _id, idempotency_key, _payload in updates}
        accepted = {i for i, _payload in call.updates if f"call:{call.digests[i]}" in known}
        call.duplicates = sorted({*call.duplicates, *accepted})
        call.updates = [(i, payload) for i, payload in call.updates if i not in accepted]
        fresh = call.updates
        if not fresh:  # every update accepted before: nothing to write
            del calls[key]
            for index in call.duplicates:
                result.results[index] = StageResult(
                    "duplicate", detail="this update was already accepted"
                )
            continue
        if key not in events:  # deleted: the call stage makes it again from every update
            _leave(calls, call, result)
            continue
        call.stored = _Stored(
            payloads=[payload for _id, _key, payload in updates],
            before=events[key],
        )
    stored = {call.stored.before["id"]: call.stored for call in calls.values() if call.stored}
    if not stored:
        return
    ids = sorted(stored)
    for event_id, code in session.execute(_STORED_PROPERTIES, {"ids": ids}):
        stored[event_id].properties.add(code)
    for event_id, kind, value, position in session.execute(_STORED_KEYS, {"ids": ids}):
        stored[event_id].keys[(kind, value)] = position
    for event_id, staff_id in session.execute(_STORED_PARTICIPANTS, {"ids": ids}):
        stored[event_id].participants.add(staff_id)
    for event_id in session.scalars(_STORED_LEADS, {"ids": ids}):
        stored[event_id].is_lead = True


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
# filter over every call of the system, once per batch (0.1 ms per event at 10,000 rows). The
# OFFSET 0 keeps each probe a subquery of its own, which the planner cannot join another way.
_EARLIER_PG = text(
    "SELECT ids.call_id, found.id, found.idempotency_key, found.payload"
    " FROM unnest(CAST(:ids AS varchar[])) AS ids(call_id)"
    " CROSS JOIN LATERAL (SELECT m.id, m.idempotency_key, m.payload FROM inbound_message AS m"
    " WHERE m.source_kind = 'call' AND m.source_system = :system"
    " AND m.source_id = ids.call_id OFFSET 0) AS found"
)
_EVENTS = table_of(CrmEvent)
# The events of calls stored before, each by its natural key's index.
_STORED_EVENTS = text(
    "SELECT "
    + ", ".join(f"found.{c.name}" for c in _EVENTS.c)
    + " FROM unnest(CAST(:ids AS varchar[])) AS ids(id)"
    " CROSS JOIN LATERAL (SELECT * FROM crm_event AS e WHERE e.source_system = :system"
    " AND e.source_kind = 'call' AND e.source_id = ids.id OFFSET 0) AS found"
).columns(*_EVENTS.c)
_STORED_PROPERTIES = text(
    "SELECT event_id, property_code FROM event_property_link"
    " WHERE event_id = ANY(CAST(:ids AS integer[]))"
)
_STORED_KEYS = text(
    "SELECT event_id, kind, value, position FROM event_party_key"
    " WHERE event_id = ANY(CAST(:ids AS integer[]))"
)
_STORED_PARTICIPANTS = text(
    "SELECT event_id, staff_id FROM event_participant WHERE event_id = ANY(CAST(:ids AS integer[]))"
)
_STORED_LEADS = text("SELECT event_id FROM lead WHERE event_id = ANY(CAST(:ids AS integer[]))")
# Under the events' locks: their rows as they are now.
_LOCK_STORED = (
    select(_EVENTS)
    .where(_EVENTS.c.id == any_(bindparam("ids", type_=ARRAY(Integer))))
    .order_by(_EVENTS.c.id)
    .with_for_update()
)


def _merges_alone(session: Session, ctx: StageContext, call: _Call, state: dict[str, Any]) -> bool:
    """Whether the merge of a stored call's new updates is this stage's to write: it changes
    the event's own row and counts and adds participants, nothing else. The call stage takes
    the rest: a link made by hand or an event not linked before or after (the re-link, the lead
    rule, erasure), a lead, recordings, properties or party keys that change, and a missed
    call, before or after (its own follow-up). A call that reaches its customer now settles
    their follow-ups as a new call does where it did not before, or did at another time or for
    another customer; then the follow-ups it closed are settled again too (``_follow_ups``).

    Sets the row the merge makes (``_Stored.after``), as ``apply_call_state`` writes it.
    """
    stored, derived = call.stored, call.derived
    assert stored is not None and derived is not None
    before = stored.before
    if (
        before["linked_by"] != "auto"
        or before["link_state"] != "linked"
        or derived.link["link_state"] != "linked"
        or stored.is_lead
        or LEAD in (before["category_code"], derived.columns["category_code"])
        or state["recordings"]
        or "recordings" in before["details"]
        or set(derived.properties) != stored.properties
    ):
        return False
    keys = party_keys(
        session,
        ctx.settings,
        phones=[derived.outside_number],
        customer_numbers=[derived.customer_number],
    )
    if {(k.kind, k.value): position for position, k in enumerate(keys)} != stored.keys:
        return False
    after = dict(before)
    for name, value in derived.columns.items():
        if name != "occurred_at" or value is not None:
            after[name] = value
    after.update(derived.link)
    after["details"] = {**before["details"], **call_details(derived, after["contact_id"])}
    old, new = event_view(before), event_view(after)
    if is_missed_inbound(old) or is_missed_inbound(new):
        return False
    reached = reaches_customer(old) and old.customer_id is not None
    reaches = reaches_customer(new) and new.customer_id is not None
    moved = reached and not (
        reaches and (new.customer_id, new.occurred_at) == (old.customer_id, old.occurred_at)
    )
    stored.after, stored.settles, stored.released = after, reaches and (moved or not reached), moved
    return True


def _merge_stored(session: Session, calls: Sequence[_Call]) -> None:
    """Lock the stored calls' events, in id order; check that nothing changed them since they
    were read (else ``BatchRaced``); write the rows the merges make, those that change, in one
    statement.

    No other update of these calls was accepted since the read: the batch holds their locks
    (``lock_calls``). What it checks for are writers of an event that take no call's lock: a
    re-link, a hand link, a fetched recording, an erasure."""
    stored = {call.stored.before["id"]: call.stored for call in calls if call.stored is not None}
    if not stored:
        return
    ids = sorted(stored)
    locked = [dict(row) for row in session.execute(_LOCK_STORED, {"ids": ids}).mappings()]
    if locked != [stored[event_id].before for event_id in ids]:
        raise BatchRaced("a stored call of the batch changed meanwhile")
    changed = []
    now = utcnow()
    for call in calls:
        assert call.stored is not None
        before, after = call.stored.before, call.stored.after
        if after != before:
            after["updated_at"] = now
            changed.append({f"v_{name}": after[name] for name in _MERGED_COLUMNS})
        call.event = event_view(after)
    if changed:
        session.execute(_UPDATE_MERGED, changed)


#: The columns a merge writes (``apply_call_state``): the call's own, its link, its details.
_MERGED_COLUMNS = tuple(
    column.key
    for column in _EVENTS.columns
    if column.key not in ("source_system", "source_kind", "source_id", "created_at", "linked_by")
)
_UPDATE_MERGED = (
    update(_EVENTS)
    .where(_EVENTS.c.id == bindparam("v_id", type_=Integer))
    .values(
        {
            name: bindparam(f"v_{name}", type_=_EVENTS.c[name].type)
            for name in _MERGED_COLUMNS
            if name != "id"
        }
    )
)


def _add_participants(session: Session, calls: Sequence[_Call]) -> None:
    """The staff members a merge names that are not yet the stored event's participants."""
    rows = []
    for call in calls:
        event, derived, stored = call.event, call.derived, call.stored
        assert event is not None and derived is not None and stored is not None
        staff = {s for s in (*derived.staff_ids, event.seller_id) if s is not None}
        rows += [{"event_id": event.id, "staff_id": s} for s in sorted(staff - stored.participants)]
    insert_rows(session, table_of(EventParticipant), rows)


def _may_become_a_lead(ctx: StageContext, derived: DerivedCall) -> bool:
    """An inbound call from an unknown party may be a lead (``tasks.leads``): the call stage's."""
    return (
        derived.columns["direction"] == "inbound"
        and derived.link["link_state"] == "unlinked"
        and (ctx.settings.lead_from_unknown_calls or derived.columns["category_code"] == LEAD)
    )


def _insert_ledger(session: Session, calls: Sequence[_Call]) -> None:
    """The updates' ledger rows, each naming its call's event, in one statement."""
    now = utcnow()
    rows = []
    for call in calls:
        assert call.event is not None
        rows += [
            {
                "idempotency_key": f"call:{call.digests[index]}",
                "schema": SCHEMA,
                "source_kind": "call",
                "source_system": call.source_system,
                "source_id": call.call_id,
                "payload": JsonText(call.texts[index]),
                "event_id": call.event.id,
                "received_at": now,
            }
            for index, _payload in call.updates
        ]
    if insert_new(session, table_of(InboundMessage), rows, ("idempotency_key",)) is None:
        raise BatchRaced("an update of the batch was accepted meanwhile")


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


def _follow_ups(
    session: Session,
    events: Sequence[CrmEvent],
    lookups: CallLookups,
    released: Sequence[CrmEvent] = (),
) -> None:
    """Open a follow-up for each missed call, then settle every follow-up the new calls touch
    (``events``: the new calls, and merged ones that may close follow-ups now; ``released``:
    merged calls, as they were, whose closed follow-ups may need another closer now).

    As ``reconcile_follow_ups`` does for one call, under the same customer locks: a follow-up
    is closed by the first later call that reached the customer, else open. The follow-ups
    that can change are those of the customers the new calls concern whose missed call came
    before one of the new calls that reached the customer, and which are open or closed by a
    call after it: one read finds them (``_CANDIDATES_PG``), one reads each one's closer as it
    should be now (``_SETTLED_PG``), one update writes those that change.
    """
    missed = [e for e in events if is_missed_inbound(e)]
    closers = [e for e in events if e.customer_id is not None and reaches_customer(e)]
    customers = sorted(
        {e.customer_id for e in (*missed, *closers, *released) if e.customer_id is not None}
    )
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
    if released:  # closed by a merged call that no longer closes them, or maybe not
        ids = [*ids, *session.scalars(_CLOSED_BY, {"ids": [e.id for e in released]})]
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
    if changed and postgresql:
        session.execute(
            _FOLLOW_UP_SETTLE_PG,
            {
                "fids": [c["fid"] for c in changed],
                "states": [c["state"] for c in changed],
                "ats": [c["at"] for c in changed],
                "bys": [c["by"] for c in changed],
            },
        )
    elif changed:
        session.execute(_FOLLOW_UP_SETTLE, changed)


_CLOSED_BY = select(table_of(FollowUp).c.id).where(
    table_of(FollowUp).c.closed_by_event_id.in_(bindparam("ids", expanding=True))
)
_FOLLOW_UP_SETTLE = (
    update(table_of(FollowUp))
    .where(table_of(FollowUp).c.id == bindparam("fid"))
    .values(
        state=bindparam("state"),
        closed_at=bindparam("at"),
        closed_by_event_id=bindparam("by"),
    )
)

#: The same as one statement over arrays: a backfill's batch settles a hundred follow-ups, each
#: an execution of its own on the server in ``executemany``.
_FOLLOW_UP_SETTLE_PG = text(
    "UPDATE follow_up AS f SET state = u.state, closed_at = u.at, closed_by_event_id = u.by"
    " FROM unnest(CAST(:fids AS integer[]), CAST(:states AS text[]),"
    " CAST(:ats AS timestamptz[]), CAST(:bys AS integer[])) AS u(fid, state, at, by)"
    " WHERE f.id = u.fid"
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
