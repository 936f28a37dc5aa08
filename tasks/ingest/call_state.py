"""A call's state: the fold of its updates, the event it makes, and its follow-ups.

The merged state is a fold over *all* accepted updates of the call, read from the inbound ledger
while the event's row is locked, so the stored event depends neither on the order in which the
updates arrived nor on which worker process handled which update (docs/telephony.md). The call
stage (``tasks.ingest.call``), the set-based stage of a batch (``tasks.ingest.call_batch``) and
the re-link (``tasks.relink``) all make a call's event here; the unknown-party lead rule and the
re-check of an open event's party are the stage's, after this (``tasks.leads``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BindParameter, bindparam, exists, or_, select, text, union
from sqlalchemy.orm import Session, aliased

from models.base import UTCDateTime, utcnow
from models.db import is_postgresql, table_of
from models.events import (
    ANSWERED_STATUSES,
    ERP_REFERENCES,
    CrmEvent,
    FollowUp,
    reaches_customer_sql,
    sql_word,
)
from models.ledger import InboundMessage
from models.parties import Staff
from tasks.classify import Classification, ClassificationRequest, classify
from tasks.context import StageContext
from tasks.match import (
    PartyMatch,
    customer_by_number,
    find_staff,
    find_staff_many,
    is_internal_number,
    match_phone,
    normalise_phone,
    phone_owners,
)
from tasks.periods import aware
from tasks.store import (
    add_participants,
    canonical_hash,
    insert_event_whole,
    lock_party_keys,
    new_event_values,
    party_keys,
    record_party_keys,
    responsible_seller_id,
    set_properties,
)

#: Known statuses and their order: a call's status only moves forward along this rank.
STATUS_RANK: dict[str, int] = {
    "ringing": 1,
    "answered": 2,
    "completed": 3,
    "missed": 3,
    "busy": 3,
    "failed": 3,
    "voicemail": 3,
}

#: A missed inbound call from a known customer opens a follow-up for the seller.
MISSED_STATUSES = frozenset({"missed", "busy", "voicemail", "failed"})
#: Among terminal statuses of equal sequence, the more informative one wins: someone talked
#: beats a voicemail beats a plain miss. This also makes an answered leg of a call outrank the
#: legs that rang unanswered.
TERMINAL_PREFERENCE = {"completed": 5, "voicemail": 4, "missed": 3, "busy": 2, "failed": 1}
#: Fields where the latest known value (in fold order) wins and an empty one never overwrites.
MERGED_FIELDS = (
    "direction",
    "from",
    "to",
    "agent",
    "duration_s",
    "note",
    "category",
    "class",
    "type",
    "customer_number",
    *ERP_REFERENCES,
    "state",
)
#: Times: like the merged fields, and a time without an offset never replaces one with an offset.
TIME_FIELDS = ("started_at", "answered_at", "ended_at")
#: Fields that name the call rather than say something about it.
IDENTITY_FIELDS = frozenset({"schema", "source_system", "call_id"})
#: Namespace of the transaction-level advisory locks that serialise one customer's follow-ups.
FOLLOW_UP_LOCK_NAMESPACE = 0x43524E


def refold_call(session: Session, ctx: StageContext, event: CrmEvent) -> DerivedCall:
    """Recompute a call's event from its updates (after its parties changed, for example).

    Locks the event like an update would. Its counts are the caller's to move: whoever changes
    an event takes its tally keys before and moves them after, once (``move_tallies``).
    """
    lock = select(CrmEvent).where(CrmEvent.id == event.id)
    if is_postgresql(session):
        lock = lock.with_for_update()
    session.execute(lock.execution_options(populate_existing=True))
    derived = apply_call_state(session, ctx, event, fold_updates(call_updates(session, event)), [])
    session.flush()
    return derived


def call_updates(session: Session, event: CrmEvent) -> Sequence[dict[str, Any]]:
    """Every accepted update of the event's call, as kept in the ledger."""
    return (
        session.execute(_CALL_UPDATES, {"system": event.source_system, "call_id": event.source_id})
        .scalars()
        .all()
    )


_CALL_UPDATES = (
    select(table_of(InboundMessage).c.payload)
    .where(
        table_of(InboundMessage).c.source_kind == "call",
        table_of(InboundMessage).c.source_system == bindparam("system"),
        table_of(InboundMessage).c.source_id == bindparam("call_id"),
    )
    .order_by(table_of(InboundMessage).c.id)
)


# -- the fold -------------------------------------------------------------------------------------


def update_order(update: dict[str, Any]) -> tuple[int, int, int, str]:
    """The total order in which updates are applied; later ones win where they know something.

    1. status rank: ringing < answered < terminal (an update without a known status ranks
       lowest), so status only moves forward and a late "ringing" changes nothing it knows;
    2. ``sequence`` within a rank, where the provider sends one (an update without one before
       those with one);
    3. among terminal statuses of equal sequence, the more informative status;
    4. the hash of the update's content: two conflicting updates without a sequence are
       ordered the same way whatever order they arrived in (and in whichever call).
    """
    status = update.get("status") or ""
    sequence = update.get("sequence")
    content = {k: v for k, v in update.items() if k not in IDENTITY_FIELDS}
    return (
        STATUS_RANK.get(status, 0),
        sequence if isinstance(sequence, int) else -1,
        TERMINAL_PREFERENCE.get(status, 0),
        canonical_hash(content),
    )


def fold_updates(updates: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge every update of one call into its state: status only moves forward, empty never
    overwrites known, and any permutation of the same updates (duplicates included) gives the
    same state."""
    state: dict[str, Any] = {
        "raw_statuses": [],
        "raw_status": None,
        "properties": set(),
        "recordings": {},
        "updates": len(updates),
    }
    # One update (a CDR row, most of a backfill) needs no order, nor the hash that orders it.
    for change in sorted(updates, key=update_order) if len(updates) > 1 else updates:
        status = change.get("status")
        if status in STATUS_RANK:
            state["status"] = status
        elif status:
            # Unknown provider statuses are kept, never a reason to drop the call.
            state["raw_status"] = status
            if status not in state["raw_statuses"]:
                state["raw_statuses"].append(status)
        for name in MERGED_FIELDS:
            value = change.get(name)
            if value not in (None, "", []):
                state[name] = value
        for name in TIME_FIELDS:
            value = change.get(name)
            if not value:
                continue
            if _has_offset(state.get(name)) and not _has_offset(value):
                continue  # the time with an offset is the more complete one
            state[name] = value
        state["properties"] |= set(change.get("properties") or [])
        if isinstance(change.get("sequence"), int):
            state["sequence"] = max(state.get("sequence", -1), change["sequence"])
        recording = change.get("recording")
        if isinstance(recording, dict) and recording.get("url"):
            state["recordings"][recording["url"]] = {
                k: recording.get(k) for k in ("url", "filename", "media_type")
            }
    state["raw_statuses"].sort()
    state["properties"] = sorted(state["properties"])
    state["recordings"] = [state["recordings"][url] for url in sorted(state["recordings"])]
    return state


def _has_offset(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def _parse_time(
    value: str | None, ctx: StageContext, notes: list[str], label: str
) -> datetime | None:
    if not value:
        return None
    return aware(datetime.fromisoformat(value), ctx.settings.zone, notes, label)


# -- the event ------------------------------------------------------------------------------------


class CallLookups:
    """What a call's state is matched and classified against, each value looked up once.

    The call stage makes one per call; the set-based stage of a batch one per batch
    (``tasks.ingest.call_batch``), so a thousand calls of one agent with one customer ask the
    database once. The answers are copies: a caller may add notes to them.
    """

    def __init__(self, session: Session, settings: Any) -> None:
        self.session, self.settings = session, settings
        self._staff: dict[str | None, Staff | None] = {}
        self._phones: dict[str, PartyMatch] = {}
        self._phone_owners: dict[str, list[tuple[Any, ...]]] = {}
        self._customers: dict[str, int | None] = {}
        self._sellers: dict[int, int | None] = {}
        self._classes: dict[ClassificationRequest, Classification] = {}

    def staff(self, reference: str | None) -> Staff | None:
        if reference not in self._staff:
            self._staff[reference] = find_staff(self.session, reference, self.settings)
        return self._staff[reference]

    def prefetch_staff(self, *references: str | None) -> None:
        """Look up these references (those not known yet) in one query."""
        wanted = {r for r in references if r not in self._staff}
        if len(wanted) > 1:
            found = find_staff_many(self.session, [r for r in wanted if r], self.settings)
            self._staff.update({r: found.get(r) if r else None for r in wanted})

    def internal(self, raw: str | None) -> bool:
        # Remembered per session; a number's rows are read once for this and for ``phone``.
        return is_internal_number(self.session, raw, self.settings, self._owners)

    def _owners(self, e164: str) -> list[tuple[Any, ...]]:
        if e164 not in self._phone_owners:
            self._phone_owners[e164] = phone_owners(self.session, e164)
        return self._phone_owners[e164]

    def phone(self, raw: str) -> PartyMatch:
        if raw not in self._phones:
            self._phones[raw] = match_phone(self.session, raw, self.settings, self._owners)
        return self._phones[raw].copy()

    def customer_id(self, number: str | None) -> int | None:
        if not number:
            return None
        if number not in self._customers:
            customer = customer_by_number(self.session, number)
            self._customers[number] = customer.id if customer else None
        return self._customers[number]

    def responsible_seller(self, customer_id: int) -> int | None:
        if customer_id not in self._sellers:
            self._sellers[customer_id] = responsible_seller_id(self.session, customer_id)
        return self._sellers[customer_id]

    def classify(self, request: ClassificationRequest) -> Classification:
        if request not in self._classes:
            self._classes[request] = classify(self.session, request)
        return self._classes[request].copy()


@dataclass
class DerivedCall:
    """What a call's folded state makes of its event, before anything is written."""

    #: Columns of the event; ``occurred_at`` is None when no update gave a time.
    columns: dict[str, Any]
    #: Who it is linked to: customer_id, contact_id, link_state, candidates, match_note,
    #: seller_id (not written over a link made by hand).
    link: dict[str, Any]
    #: ``details`` without ``contact_ids`` (the event's contact, whoever linked it).
    details: dict[str, Any]
    properties: list[str]
    #: The outside number, unless it is our own (the party key of the event).
    outside_number: str | None
    customer_number: str | None
    requested_category: str | None
    #: The staff members the call names (agent, inside and outside number).
    staff_ids: list[int | None]


def derive_call(
    lookups: CallLookups, ctx: StageContext, state: dict[str, Any], notes: list[str]
) -> DerivedCall:
    """The event a folded call state makes: times, status, parties, seller, classification."""
    started = _parse_time(state.get("started_at"), ctx, notes, "started_at")
    answered = _parse_time(state.get("answered_at"), ctx, notes, "answered_at")
    ended = _parse_time(state.get("ended_at"), ctx, notes, "ended_at")
    duration = state.get("duration_s")
    if duration is None and answered and ended and ended >= answered:
        duration = int((ended - answered).total_seconds())
    status = state.get("status") or state.get("raw_status")

    from_raw, to_raw = state.get("from"), state.get("to")
    direction = state.get("direction")
    if direction is None:
        direction = _infer_direction(lookups, from_raw, to_raw, notes)
    # Who is outside (the customer side) and who is inside (staff)?
    external_raw = to_raw if direction == "outbound" else from_raw
    internal_raw = from_raw if direction == "outbound" else to_raw
    lookups.prefetch_staff(state.get("agent"), internal_raw)
    agent = lookups.staff(state.get("agent"))
    internal_staff = lookups.staff(internal_raw)
    external_staff: Staff | None = None
    if not external_raw:
        match = PartyMatch(notes=["the call's updates give no outside number"])
    elif lookups.internal(external_raw):
        # Extensions, our own numbers and staff phones are never customers or leads.
        match = PartyMatch(
            state="internal",
            notes=[f"{external_raw} is our own number, an extension or a staff phone: internal"],
        )
        external_staff = lookups.staff(external_raw)
    else:
        match = lookups.phone(external_raw)
    if (customer_id := lookups.customer_id(state.get("customer_number"))) is not None:
        if match.customer_id not in (None, customer_id):
            match.notes.append("customer_number given by the message overrides the number match")
            match.contact_id, match.candidates = None, []
        match.customer_id = customer_id
        match.state = "ambiguous" if match.candidates else "linked"
    elif state.get("customer_number"):
        match.notes.append(f"unknown customer_number {state['customer_number']!r}")

    seller = agent or internal_staff
    seller_id = seller.id if seller else None
    if seller_id is None and match.customer_id is not None:
        seller_id = lookups.responsible_seller(match.customer_id)
        if seller_id is not None:
            match.notes.append("no staff member handled it: assigned to the customer's seller")
    if seller_id is None and external_staff is not None:
        seller_id = external_staff.id

    classification = lookups.classify(
        ClassificationRequest(
            source_kind="call",
            category=state.get("category"),
            class_code=state.get("class"),
            type_code=state.get("type"),
            properties=tuple(state["properties"]),
        )
    )
    if state["raw_statuses"]:
        notes.append("provider statuses kept raw: " + ", ".join(state["raw_statuses"]))

    talk_start = ended - timedelta(seconds=duration) if ended and duration is not None else None
    internal = match.state == "internal"
    return DerivedCall(
        columns={
            "occurred_at": started or answered or talk_start or ended,
            "ended_at": ended,
            "duration_s": duration,
            "direction": direction,
            "status": status,
            "subject": _subject(direction, external_raw, status, internal=internal),
            "body": state.get("note") or "",
            "category_code": classification.category,
            "class_code": classification.class_code,
            "type_code": classification.type_code,
            "classification_note": classification.note,
            **{name: state.get(name) for name in ERP_REFERENCES},
            "state": state.get("state") or "done",
        },
        link={
            "customer_id": match.customer_id,
            "contact_id": match.contact_id,
            "link_state": match.state,
            "candidates": match.candidates,
            "match_note": "; ".join(match.notes + notes),
            "seller_id": seller_id,
        },
        details={
            "from": from_raw,
            "to": to_raw,
            "agent": state.get("agent"),
            "outside_number": normalise_phone(external_raw, ctx.settings.phone_region),
            "answered_at": answered.isoformat() if answered else None,
            "raw_statuses": state["raw_statuses"],
            "updates": state["updates"],
            "last_sequence": state.get("sequence"),
        },
        properties=classification.properties,
        outside_number=None if internal else external_raw,
        customer_number=state.get("customer_number"),
        requested_category=state.get("category"),
        staff_ids=[
            agent.id if agent else None,
            internal_staff.id if internal_staff else None,
            external_staff.id if external_staff else None,
        ],
    )


def call_details(derived: DerivedCall, contact_id: int | None) -> dict[str, Any]:
    """The event's ``details``: what the updates said, and the contact it is linked to."""
    details = dict(derived.details)
    details["contact_ids"] = [contact_id] if contact_id else []
    return details


def apply_call_state(
    session: Session,
    ctx: StageContext,
    event: CrmEvent,
    state: dict[str, Any],
    notes: list[str],
    *,
    new: bool = False,
) -> DerivedCall:
    """Write the folded state to the event: times, status, parties, seller, classification,
    properties, party keys, participants and follow-ups. Returns what the state made of it.

    ``new``: the event was created by this stage (no properties, keys or participants yet).
    """
    derived = derive_call(CallLookups(session, ctx.settings), ctx, state, notes)
    for name, value in derived.columns.items():
        if name != "occurred_at" or value is not None:
            setattr(event, name, value)
    if event.linked_by != "hand":
        for name, value in derived.link.items():
            setattr(event, name, value)
    event.details = {**event.details, **call_details(derived, event.contact_id)}
    session.flush()
    write_call_relations(session, ctx, event, derived, new=new)
    return derived


def new_call_columns(derived: DerivedCall) -> dict[str, Any]:
    """The columns of a call's event made by ``derived`` alone, for an event inserted whole."""
    columns = dict(derived.columns)
    if columns["occurred_at"] is None:
        columns["occurred_at"] = utcnow()
    return {
        **columns,
        **derived.link,
        "details": call_details(derived, derived.link["contact_id"]),
    }


def insert_new_call(
    session: Session,
    ctx: StageContext,
    key: dict[str, str],
    derived: DerivedCall,
    inbound_id: int,
) -> CrmEvent | None:
    """PostgreSQL: a call's first update made into its event, inserted whole with what
    :func:`write_call_relations` writes for a new event and its ledger row linked, in one
    statement (``insert_event_whole``); then its party keys' locks and its follow-ups, as
    there. None (nothing written) when the call's event exists."""
    values = new_event_values(
        key["source_system"], key["source_kind"], key["source_id"], new_call_columns(derived)
    )
    keys = party_keys(
        session,
        ctx.settings,
        phones=[derived.outside_number],
        customer_numbers=[derived.customer_number],
    )
    staff = [s for s in (*derived.staff_ids, values["seller_id"]) if s is not None]
    event = insert_event_whole(
        session,
        values,
        properties=derived.properties,
        keys=keys,
        staff=staff,
        inbound_id=inbound_id,
    )
    if event is None:
        return None
    if event.link_state != "linked" and event.linked_by != "hand":
        lock_party_keys(session, keys)  # as record_party_keys does for an open event
    reconcile_follow_ups(session, event, new=True)
    return event


def write_call_relations(
    session: Session, ctx: StageContext, event: CrmEvent, derived: DerivedCall, *, new: bool
) -> None:
    """What the call's state makes besides the event's row: properties, party keys,
    participants and follow-ups (``new``: the event was created by this stage, none yet)."""
    set_properties(session, event, derived.properties, new=new)
    # Remembered for the automatic re-link when a contact later gains the number, and for the
    # lead rule (tasks.relink, tasks.leads); our own numbers are never keys.
    record_party_keys(
        session,
        ctx.settings,
        event,
        phones=[derived.outside_number],
        customer_numbers=[derived.customer_number],
        new=new,
    )
    add_participants(session, event, [*derived.staff_ids, event.seller_id], new=new)
    reconcile_follow_ups(session, event, new=new)


def _infer_direction(
    lookups: CallLookups, from_raw: str | None, to_raw: str | None, notes: list[str]
) -> str | None:
    """A call without a direction: from our side to an outside number goes out, else in."""
    from_ours = lookups.internal(from_raw)
    to_ours = lookups.internal(to_raw)
    if from_ours and to_raw and not to_ours:
        notes.append("no direction given: outbound (from our side to an outside number)")
        return "outbound"
    if from_raw and not from_ours:
        notes.append("no direction given: inbound (from an outside number)")
        return "inbound"
    return None


def _subject(direction: str | None, number: str | None, status: str | None, internal: bool) -> str:
    label = {"inbound": "Inbound call", "outbound": "Outbound call"}.get(direction or "", "Call")
    if internal:
        label = "Internal call"
    parts = [label]
    if number:
        parts.append(("to " if direction == "outbound" else "from ") + number)
    if status:
        parts.append(f"({status})")
    return " ".join(parts)


# -- follow-ups -----------------------------------------------------------------------------------


def is_missed_inbound(event: CrmEvent) -> bool:
    return (
        event.direction == "inbound"
        and event.status in MISSED_STATUSES
        and event.customer_id is not None
        and event.link_state != "internal"
    )


def reaches_customer(event: CrmEvent) -> bool:
    """A call that reached the customer: an answered inbound call or any outbound call."""
    return event.source_kind == "call" and (
        event.direction == "outbound"
        or (event.direction == "inbound" and event.status in ANSWERED_STATUSES)
    )


#: The missed call of a follow-up, beside the call being reconciled (built once: costly).
MISSED_CALL = aliased(CrmEvent, name="missed_call")


def reconcile_follow_ups(session: Session, event: CrmEvent, *, new: bool = False) -> None:
    """Open, close or withdraw follow-ups so that they match the calls as stored now.

    A missed inbound call from a known customer has a follow-up for the customer's seller. It is
    closed by the first later call that reached the customer: an answered inbound call or an
    outbound call to them ("later" by when the calls happened, not when their updates arrived:
    a callback made before the missed call does not close it). When further updates show that
    the call was not missed after all, its follow-up is withdrawn.

    The follow-ups of one customer are serialised by a transaction-level advisory lock taken
    before they are read, so a missed call and its callback processed at the same moment by two
    workers cannot miss each other.
    """
    session.flush()
    missed = is_missed_inbound(event)
    closer = reaches_customer(event) and event.customer_id is not None
    # An event created by this stage has opened or closed no follow-up yet.
    involved = (
        []
        if new
        else session.scalars(
            select(FollowUp.customer_id).where(
                or_(FollowUp.event_id == event.id, FollowUp.closed_by_event_id == event.id)
            )
        ).all()
    )
    if not (missed or closer or involved):
        return  # most updates: nothing to open, close or withdraw
    customers = sorted({c for c in (event.customer_id, *involved) if c is not None})
    for customer_id in customers:
        lock_customer(session, customer_id)
    affected = list(
        session.scalars(
            _AFFECTED_BY_CLOSER if closer else _AFFECTED,
            {
                "customers": customers,
                "customer_id": event.customer_id,
                "event_id": event.id,
                "occurred_at": event.occurred_at,
            },
        )
    )
    own = next((f for f in affected if f.event_id == event.id), None)
    if missed:
        seller_id = responsible_seller_id(session, event.customer_id)
        if own is None:
            own = FollowUp(event_id=event.id, state="open")
            session.add(own)
            affected.append(own)
        own.seller_id = seller_id or event.seller_id
        own.customer_id = event.customer_id
        own.reason = f"missed call: call back ({event.subject})"
        session.flush()
    elif own is not None:
        affected.remove(own)
        session.delete(own)
        session.flush()
    for follow_up in affected:
        _settle(session, follow_up)


def open_follow_ups(customers: Any) -> Any:
    """The ids of the customers' open follow-ups (their partial index, also when prepared)."""
    is_open = aliased(FollowUp, name="open_one")
    return select(is_open.id).where(
        is_open.customer_id.in_(customers), is_open.state == sql_word("open")
    )


def next_reaching_call(customer_id: Any, after: Any, *, until: Any = None, other_than: Any) -> Any:
    """The customer's first call after ``after`` (and not after ``until``) that reached them,
    but for those ``other_than`` rules out (a clause built on the ``next_call`` it is given).

    A follow-up is closed by the first call after its missed one that reached the customer. Of
    the follow-ups missed before ``after``, only those closed by this call can have been closed
    later than ``after``: a call at ``after`` that reached the customer closes them now instead.
    Read by ``ix_crm_event_reaching_call`` from ``after`` on, up to the first such call: a
    call that arrives late (a second PBX's file of the same year, a month imported after the
    next) reads no more of a busy customer's later calls than one that arrives in order.
    """
    later = aliased(CrmEvent, name="next_call")
    bounds = [later.customer_id == customer_id, later.occurred_at > after]
    if until is not None:
        bounds.append(later.occurred_at <= until)
    return (
        select(later.id)
        .where(*bounds, reaches_customer_sql(later), other_than(later))
        .order_by(later.occurred_at, later.id)
        .limit(1)
    )


def missed_before(follow_up: Any, moment: Any) -> Any:
    """The follow-up's call was missed before ``moment``."""
    return (
        exists()
        .where(MISSED_CALL.id == follow_up.event_id, MISSED_CALL.occurred_at < moment)
        .correlate_except(MISSED_CALL)
    )


def _affected_query(closer: bool) -> Any:
    """The follow-ups a call may open, close or withdraw: open ones of its customers, its own,
    those it closed; and for a call that reached the customer, those its customer's next such
    call closed after a call missed before this one (``next_reaching_call``).

    A callback that arrives late but happened before the one that closed a follow-up becomes the
    one that closed it. Each part is read by an index, never all of a busy customer's past
    follow-ups nor all their later calls: a busy customer's call, in order or months late,
    reads as fast as one of a customer with none (docs/telephony.md). Built once
    (``reconcile_follow_ups``).
    """
    event_id: BindParameter[int] = bindparam("event_id")
    occurred_at = bindparam("occurred_at", type_=UTCDateTime())
    customers: BindParameter[list[int]] = bindparam("customers", expanding=True)
    own, closed_by_it = aliased(FollowUp, name="own_one"), aliased(FollowUp, name="closed_by_it")
    parts: list[Any] = [
        open_follow_ups(customers),
        select(own.id).where(own.event_id == event_id),
        # Their customers are among ``customers`` (``involved``): no test of it to AND in.
        select(closed_by_it.id).where(closed_by_it.closed_by_event_id == event_id),
    ]
    if closer:
        next_call = next_reaching_call(
            bindparam("customer_id"), occurred_at, other_than=lambda later: later.id != event_id
        ).scalar_subquery()
        was_closed = aliased(FollowUp, name="closed_by_next")
        parts.append(
            select(was_closed.id).where(
                was_closed.closed_by_event_id == next_call, missed_before(was_closed, occurred_at)
            )
        )
    return (
        select(FollowUp)
        .where(FollowUp.id.in_(union(*parts)))
        .order_by(FollowUp.id)
        .execution_options(populate_existing=True)
    )


_AFFECTED = _affected_query(closer=False)
_AFFECTED_BY_CLOSER = _affected_query(closer=True)


def _settle(session: Session, follow_up: FollowUp) -> None:
    """Closed by the first call after the missed one that reached the customer, else open."""
    missed = session.get(CrmEvent, follow_up.event_id)
    if missed is None:
        return
    closer = session.execute(
        _FIRST_CLOSER,
        {"customer_id": follow_up.customer_id, "missed": missed.id, "at": missed.occurred_at},
    ).scalar()
    if closer is None:
        follow_up.state, follow_up.closed_at, follow_up.closed_by_event_id = "open", None, None
    elif follow_up.closed_by_event_id != closer or follow_up.state != "closed":
        follow_up.state, follow_up.closed_at, follow_up.closed_by_event_id = (
            "closed",
            utcnow(),
            closer,
        )


_FIRST_CLOSER = next_reaching_call(
    bindparam("customer_id"),
    bindparam("at", type_=UTCDateTime()),
    other_than=lambda later: later.id != bindparam("missed"),
)


def lock_customer(session: Session, customer_id: int) -> None:
    """Serialise follow-up bookkeeping of one customer (SQLite serialises every writer)."""
    if is_postgresql(session):
        session.execute(_CUSTOMER_LOCK, {"ns": FOLLOW_UP_LOCK_NAMESPACE, "key": customer_id})


_CUSTOMER_LOCK = text("SELECT pg_advisory_xact_lock(:ns, :key)")
