"""Store stage: the inbound ledger, the event upsert on its natural key, and tally bookkeeping.

Everything here runs inside the ingest task's one transaction; nothing commits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import (
    Table,
    bindparam,
    delete,
    exists,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.instrumentation import manager_of_class

from config.settings import Settings, known_zone
from models.base import UTCDateTime, utcnow
from models.db import insert_rows, is_postgresql, prepared_upsert, table_of
from models.events import CrmEvent, EventParticipant, EventPropertyLink, counts
from models.ledger import Delivery, InboundMessage
from models.parties import Customer, EventPartyKey, Staff
from models.targets import RefreshRequest, Tally
from tasks.match import email_domain, is_internal_number, normalise_phone
from tasks.periods import period_keys

#: A refresh request older than this is presumed lost (its task never ran) and is re-sent.
STALE_REFRESH_REQUEST = timedelta(seconds=60)


@dataclass
class StageResult:
    """What one stage execution did; the task wrapper records it and acts on it after commit."""

    outcome: str
    event_id: int | None = None
    detail: str = ""
    sellers_to_refresh: set[int] = field(default_factory=set)


@dataclass
class BulkResult:
    """What a batch's set-based stage did: each message it took has its result; the rest are
    left to the kind's stage, message by message (``tasks.batch``)."""

    results: dict[int, StageResult] = field(default_factory=dict)
    left: list[int] = field(default_factory=list)
    #: The tally moves of the stored events (the batch applies them with its others).
    deltas: list[tuple[TallyKey, int]] = field(default_factory=list)


class BatchRaced(Exception):
    """Another transaction wrote what a batch's set-based stage was writing, or changed what it
    had read: the stage runs once more, then the batch goes message by message (``tasks.batch``).

    ``again=False``: what the batch holds makes the stage give up whatever it reads (the batch
    goes message by message at once)."""

    def __init__(self, message: str, *, again: bool = True) -> None:
        super().__init__(message)
        self.again = again


def canonical_text(payload: Any) -> str:
    """``payload``'s JSON in one spelling (keys sorted, no spaces): what its hash is taken of."""
    return json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def canonical_hash(payload: Any, text: str | None = None) -> str:
    """The hash of ``payload``'s canonical text (``text``, when the caller has it)."""
    if text is None:
        text = canonical_text(payload)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def upsert_key(kind: str, ctx: Any, payload: Any) -> str:
    """Ledger key of a message whose latest version wins (a visit, a party).

    A redelivery of the same task message is a duplicate; the same content sent again later
    is applied again (harmless, and right when an A, B, A sequence of updates arrives).
    """
    return f"{kind}:{ctx.task_id or '-'}:{canonical_hash(payload)}"


def record_inbound(
    session: Session,
    *,
    idempotency_key: str,
    schema: str,
    source_kind: str,
    source_system: str,
    source_id: str,
    payload: dict[str, Any],
    event_id: int | None = None,
) -> int | None:
    """Add the message to the ledger: its id, or None when the same message was already
    accepted.

    ``event_id``: the event the message made or updated, when the stage knows it already
    (else ``link_inbound`` sets it).
    """
    values = ledger_row(idempotency_key, schema, source_kind, source_system, source_id, payload)
    inserted: int | None = session.execute(
        prepared_upsert(session, InboundMessage.__table__, _inbound_insert),
        values | {"event_id": event_id},
    ).scalar()
    return inserted


def ledger_row(
    idempotency_key: str,
    schema: str,
    source_kind: str,
    source_system: str,
    source_id: str,
    payload: dict[str, Any],
) -> dict[str, Any]:
    return {
        "idempotency_key": idempotency_key,
        "schema": schema,
        "source_kind": source_kind,
        "source_system": source_system,
        "source_id": source_id,
        "payload": payload,
        "event_id": None,
        "received_at": utcnow(),
    }


def _inbound_insert(upsert: Any) -> Any:
    return upsert.on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(
        upsert.table.c.id
    )


def record_inbound_update(
    session: Session,
    *,
    idempotency_key: str,
    schema: str,
    source_kind: str,
    source_system: str,
    source_id: str,
    payload: dict[str, Any],
) -> tuple[int | None, bool]:
    """:func:`record_inbound` that also says, in the same statement, whether the ledger held an
    earlier message of the same natural key (kind, system, source id) then.

    A hint, not a lock: another transaction may add one a moment later (``lock_event`` settles
    that). A stage that finds none can build the event from this message alone.
    """
    values = ledger_row(idempotency_key, schema, source_kind, source_system, source_id, payload)
    row = session.execute(
        prepared_upsert(session, InboundMessage.__table__, _inbound_insert_seeing_earlier),
        {
            **values,
            # The same values again for the look at the ledger: names of their own.
            "seen_kind": source_kind,
            "seen_system": source_system,
            "seen_id": source_id,
            "seen_key": idempotency_key,
        },
    ).first()
    if row is None:
        return None, False
    return row[0], bool(row[1])


def _inbound_insert_seeing_earlier(upsert: Any) -> Any:
    earlier = table_of(InboundMessage).alias("earlier")
    seen = (
        exists()
        .where(
            earlier.c.source_kind == bindparam("seen_kind"),
            earlier.c.source_system == bindparam("seen_system"),
            earlier.c.source_id == bindparam("seen_id"),
            earlier.c.idempotency_key != bindparam("seen_key"),
        )
        .label("earlier")
    )
    return upsert.on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(
        upsert.table.c.id, seen
    )


def link_inbound(session: Session, inbound_id: int, event_id: int) -> None:
    """The ledger row's event, once the stage has it."""
    session.execute(_LINK_INBOUND, {"inbound_id": inbound_id, "event_id": event_id})


_LINK_INBOUND = (
    update(table_of(InboundMessage))
    .where(table_of(InboundMessage).c.id == bindparam("inbound_id"))
    .values(event_id=bindparam("event_id"))
)


def lock_event(
    session: Session,
    *,
    source_system: str,
    source_kind: str,
    source_id: str,
    defaults: dict[str, Any],
) -> tuple[CrmEvent, bool]:
    """The event of a natural key, created if missing, locked for this transaction.

    Concurrent first deliveries of one call both reach this point: the unique key makes one
    INSERT win and the other wait for it, and ``FOR UPDATE`` then serialises their merges.
    """
    values = new_event_values(source_system, source_kind, source_id, defaults)
    created = session.execute(
        prepared_upsert(session, CrmEvent.__table__, _event_insert), values
    ).scalar()
    if created is not None:
        # Our own uncommitted row: no other transaction can see it, let alone change it.
        return _persistent_event(session, created, values), True
    event = lock_existing_event(
        session, source_system=source_system, source_kind=source_kind, source_id=source_id
    )
    assert event is not None  # the INSERT met it; events are never deleted
    return event, False


def new_event_values(
    source_system: str, source_kind: str, source_id: str, defaults: dict[str, Any]
) -> dict[str, Any]:
    """Every column of a new event of this key: the defaults, then ``defaults``."""
    now = utcnow()
    return {
        "source_system": source_system,
        "source_kind": source_kind,
        "source_id": source_id,
        "created_at": now,
        "updated_at": now,
        **(event_column_defaults() | defaults),
    }


def insert_event_whole(
    session: Session,
    values: dict[str, Any],
    *,
    properties: Iterable[str],
    keys: Sequence[PartyKey],
    staff: Iterable[int],
    inbound_id: int,
) -> CrmEvent | None:
    """PostgreSQL: a new event with its properties, party keys and participants, and the ledger
    row ``inbound_id`` linked to it, in one statement; None (and nothing written) when the
    key's event exists.

    What ``lock_event``, ``set_properties``, ``record_party_keys``, ``add_participants`` and
    ``link_inbound`` write for a new event in five round trips (the party keys' locks are the
    caller's). The statement's sub-statements see one snapshot; each relation takes the event's
    id from the INSERT's RETURNING, so none is written when it inserted nothing.
    """
    names = tuple(sorted(values))
    statement = _WHOLE_EVENT.get(names)
    if statement is None:
        columns = CrmEvent.__table__.columns
        sql = (
            f"WITH e AS (INSERT INTO crm_event ({', '.join(names)})"
            f" VALUES ({', '.join(':' + name for name in names)})"
            " ON CONFLICT (source_system, source_kind, source_id) DO NOTHING RETURNING id),"
            " p AS (INSERT INTO event_property_link (event_id, property_code)"
            " SELECT e.id, x.code FROM e, unnest(CAST(:_properties AS varchar[])) AS x(code)),"
            " k AS (INSERT INTO event_party_key (event_id, kind, value, position)"
            " SELECT e.id, x.kind, x.value, x.position FROM e,"
            " unnest(CAST(:_kinds AS varchar[]), CAST(:_values AS varchar[]),"
            " CAST(:_positions AS integer[])) AS x(kind, value, position)),"
            " s AS (INSERT INTO event_participant (event_id, staff_id)"
            " SELECT e.id, x.staff_id FROM e, unnest(CAST(:_staff AS integer[])) AS x(staff_id)),"
            " l AS (UPDATE inbound_message SET event_id = e.id FROM e"
            " WHERE inbound_message.id = :_inbound)"
            " SELECT id FROM e"
        )
        typed = [bindparam(name, type_=columns[name].type) for name in names]
        statement = _WHOLE_EVENT[names] = text(sql).bindparams(*typed)
    event_id = session.execute(
        statement,
        values
        | {
            "_properties": sorted(set(properties)),
            "_kinds": [key.kind for key in keys],
            "_values": [key.value for key in keys],
            "_positions": list(range(len(keys))),
            "_staff": sorted(set(staff)),
            "_inbound": inbound_id,
        },
    ).scalar()
    return None if event_id is None else _persistent_event(session, event_id, values)


#: The statement of :func:`insert_event_whole`, by the event's columns given.
_WHOLE_EVENT: dict[tuple[str, ...], Any] = {}


def lock_existing_event(
    session: Session, *, source_system: str, source_kind: str, source_id: str
) -> CrmEvent | None:
    """The event of a natural key, locked for this transaction; None when there is none."""
    query = select(CrmEvent).where(
        CrmEvent.source_system == source_system,
        CrmEvent.source_kind == source_kind,
        CrmEvent.source_id == source_id,
    )
    if is_postgresql(session):
        query = query.with_for_update()
    return session.execute(query.execution_options(populate_existing=True)).scalar_one_or_none()


def _event_insert(upsert: Any) -> Any:
    return upsert.on_conflict_do_nothing(
        index_elements=["source_system", "source_kind", "source_id"]
    ).returning(upsert.table.c.id)


def _persistent_event(session: Session, event_id: int, values: dict[str, Any]) -> CrmEvent:
    """The ORM object of the row just inserted, built from its values instead of read back.

    An ORM INSERT … RETURNING of the whole entity cost five times the CPU of the plain insert
    (the stage's most expensive statement). Every column is set, as a read would set it
    (datetimes in UTC), so nothing is lazily loaded later.
    """
    state: dict[str, Any] = dict.fromkeys(_EVENT_COLUMNS)
    for key, value in values.items():
        state[key] = value.astimezone(UTC) if isinstance(value, datetime) else value
    state["id"] = event_id
    # Filled the way a load fills it (the constructor's attribute events cost six times this).
    event = _EVENT_CLASS.new_instance()
    event.__dict__.update(state)
    make_transient_to_detached(event)  # as if loaded: no pending INSERT, no history
    session.add(event)
    return event


_EVENT_COLUMNS = tuple(column.key for column in CrmEvent.__table__.columns)
_EVENT_TIMES = tuple(
    column.key for column in CrmEvent.__table__.columns if isinstance(column.type, UTCDateTime)
)
_EVENT_CLASS = manager_of_class(CrmEvent)


def event_view(row: dict[str, Any]) -> CrmEvent:
    """An event a batch inserted, as a read would give its columns (datetimes in UTC), without
    an ORM instance, which costs more to build than the row to insert: read, never written."""
    state: dict[str, Any] = dict.fromkeys(_EVENT_COLUMNS)
    state.update(row)
    for key in _EVENT_TIMES:
        if isinstance(value := state[key], datetime):
            state[key] = value.astimezone(UTC)
    return cast(CrmEvent, SimpleNamespace(**state))


#: The classification of an event created before the stage classifies it (it always does).
UNCLASSIFIED = {"category_code": "crm_event", "class_code": "events", "type_code": "crm_event"}


def event_column_defaults() -> dict[str, Any]:
    return {
        "link_state": "unlinked",
        "linked_by": "auto",
        "match_note": "",
        "candidates": [],
        "classification_note": "",
        "subject": "",
        "body": "",
        "cancelled": False,
        "details": {},
    }


def lock_event_by_id(session: Session, event_id: int) -> CrmEvent | None:
    """The event, its row locked for this transaction (re-read: another may have changed it)."""
    query = select(CrmEvent).where(CrmEvent.id == event_id)
    if is_postgresql(session):
        query = query.with_for_update()
    return session.execute(query.execution_options(populate_existing=True)).scalar_one_or_none()


@dataclass(frozen=True)
class TallyKey:
    seller_id: int
    category: str
    period: str


def tally_keys(
    session: Session, event: CrmEvent, zones: dict[int, ZoneInfo] | None = None
) -> set[TallyKey]:
    """The tally keys an event counts toward: none when unassigned, cancelled, or an internal
    call that does not count (:func:`counted`). ``zones`` keeps the sellers' zones for a
    caller that asks for many events in one transaction (a batch)."""
    if event.seller_id is None or not counts(session, event):
        return set()
    known = zones.get(event.seller_id) if zones is not None else None
    zone = known or seller_zone(session, event.seller_id)
    if zones is not None:
        zones[event.seller_id] = zone
    return {
        TallyKey(event.seller_id, event.category_code, period)
        for period in period_keys(event.occurred_at, zone)
    }


def seller_zone(session: Session, seller_id: int) -> ZoneInfo:
    # Usually already in the session (matching loaded the seller): no query then.
    seller = session.get(Staff, seller_id)
    name = seller.time_zone if seller is not None else None
    try:
        return known_zone(name or "Europe/Helsinki")
    except ValueError:
        return ZoneInfo("Europe/Helsinki")


def move_tallies(
    session: Session, before: Iterable[TallyKey], after: Iterable[TallyKey]
) -> set[int]:
    """Move an event's counts from the keys it counted toward to those it counts toward now.

    In the change's own transaction, so a tally is exactly as current as the events it counts:
    the ledger's idempotency makes a redelivery a duplicate before it gets here, and a rolled
    back change takes its count with it. Keys are updated in one order, so two changes of one
    seller cannot deadlock on their rows; on PostgreSQL each row also takes the seller's tally
    lock shared, which a recount of the seller (``tasks.maintenance.recount_seller``) takes
    exclusively. Returns the sellers whose view changed.
    """
    before, after = set(before), set(after)
    deltas = [(key, -1) for key in before - after] + [(key, 1) for key in after - before]
    deferred = session.info.get(DEFERRED_TALLIES)
    if deferred is not None:  # a batch moves them all at its end (tasks.batch)
        deferred.extend(deltas)
    else:
        apply_tally_deltas(session, deltas)
    return {key.seller_id for key in before | after}


#: ``session.info`` key of the deltas a batch collects to move at its end, in one statement.
DEFERRED_TALLIES = "crm.deferred_tallies"


def apply_tally_deltas(session: Session, deltas: Iterable[tuple[TallyKey, int]]) -> None:
    """Add each delta to its tally (summed per key first), in one statement, in key order."""
    summed: dict[TallyKey, int] = {}
    for key, delta in deltas:
        summed[key] = summed.get(key, 0) + delta
    deltas = sorted(
        ((key, delta) for key, delta in summed.items() if delta),
        key=lambda item: (item[0].seller_id, item[0].category, item[0].period),
    )
    if deltas:
        now = utcnow()
        session.execute(
            _TALLY_MOVE_PG if is_postgresql(session) else _tally_move(session),
            [
                {
                    "seller_id": key.seller_id,
                    "category_code": key.category,
                    "period": key.period,
                    "count": delta,
                    "updated_at": now,
                    "ns": TALLY_LOCK_NAMESPACE,
                }
                for key, delta in deltas
            ],
        )


#: Namespace of the advisory locks on one seller's tallies (shared: a move; exclusive: a recount).
TALLY_LOCK_NAMESPACE = 0x54414C  # "TAL"

_TALLY_MOVE_PG = text(
    "INSERT INTO tally (seller_id, category_code, period, count, updated_at)"
    " SELECT :seller_id, :category_code, :period, :count, :updated_at"
    " FROM (SELECT pg_advisory_xact_lock_shared(:ns, :seller_id)) AS seller_lock"
    " ON CONFLICT (seller_id, category_code, period)"
    " DO UPDATE SET count = tally.count + excluded.count, updated_at = excluded.updated_at"
).bindparams(bindparam("updated_at", type_=UTCDateTime()))


def _tally_move(session: Session) -> Any:
    return prepared_upsert(session, table_of(Tally), _tally_increment)


def _tally_increment(upsert: Any) -> Any:
    return upsert.on_conflict_do_update(
        index_elements=["seller_id", "category_code", "period"],
        set_={
            "count": table_of(Tally).c.count + upsert.excluded["count"],
            "updated_at": upsert.excluded.updated_at,
        },
    )


#: Built once: a statement reused as it is finds its compiled form without a new cache key.
PROPERTY_INSERT = insert(table_of(EventPropertyLink))
PARTICIPANT_INSERT = insert(table_of(EventParticipant))
PARTY_KEY_INSERT = insert(table_of(EventPartyKey))


def set_properties(
    session: Session, event: CrmEvent, codes: Iterable[str], *, new: bool = False
) -> None:
    """Make the event's properties ``codes``; ``new``: created by this stage, so it has none."""
    wanted = set(codes)
    current: set[str] = set()
    if not new:
        current = set(
            session.scalars(
                select(EventPropertyLink.property_code).where(
                    EventPropertyLink.event_id == event.id
                )
            )
        )
    for code in current - wanted:
        session.execute(
            delete(EventPropertyLink).where(
                EventPropertyLink.event_id == event.id, EventPropertyLink.property_code == code
            )
        )
    added = [{"event_id": event.id, "property_code": code} for code in sorted(wanted - current)]
    if added:
        session.execute(PROPERTY_INSERT, added)


def add_participants(
    session: Session, event: CrmEvent, staff_ids: Iterable[int | None], *, new: bool = False
) -> None:
    """Add staff members as participants; ``new``: created by this stage, so it has none."""
    current: set[int] = set()
    if not new:
        current = set(
            session.scalars(
                select(EventParticipant.staff_id).where(EventParticipant.event_id == event.id)
            )
        )
    added = [
        {"event_id": event.id, "staff_id": staff_id}
        for staff_id in sorted({s for s in staff_ids if s is not None} - current)
    ]
    if added:
        session.execute(PARTICIPANT_INSERT, added)


def record_delivery(
    session: Session,
    *,
    task_id: str | None,
    task_name: str,
    outcome: str,
    event_id: int | None = None,
    detail: str = "",
) -> None:
    if task_id:
        record_deliveries(session, [(task_id, task_name, outcome, event_id, detail)])


def record_deliveries(
    session: Session, deliveries: Iterable[tuple[str, str, str, int | None, str]]
) -> None:
    """Each message's outcome, in one statement: (task id, task name, outcome, event, detail)."""
    now = utcnow()
    rows = [
        {
            "task_id": task_id,
            "task_name": task_name,
            "outcome": outcome,
            "event_id": event_id,
            "detail": detail[:2000],
            "finished_at": now,
        }
        for task_id, task_name, outcome, event_id, detail in deliveries
    ]
    if not rows:
        return
    if is_postgresql(session):
        insert_rows(session, table_of(Delivery), rows, _DELIVERY_UPSERT_PG)
    else:
        session.execute(prepared_upsert(session, Delivery.__table__, _delivery_upsert), rows)


#: What a later outcome of the same message replaces.
_DELIVERY_UPDATED = ("task_name", "outcome", "event_id", "detail", "finished_at")
_DELIVERY_UPSERT_PG = "ON CONFLICT (task_id) DO UPDATE SET " + ", ".join(
    f"{name} = excluded.{name}" for name in _DELIVERY_UPDATED
)


def _delivery_upsert(upsert: Any) -> Any:
    return upsert.on_conflict_do_update(
        index_elements=["task_id"], set_={name: upsert.excluded[name] for name in _DELIVERY_UPDATED}
    )


def claim_refresh(
    session: Session, seller_id: int, now: datetime | None = None, *, in_change: bool = False
) -> bool:
    """Claim the right to enqueue a refresh of ``seller_id``; False when one is already queued.

    Either in a small transaction of its own *after* the change committed, or (``in_change``)
    at the end of the change's own transaction; either way a refresh that clears the request
    before reading the seller's tallies sees this change (docs/design.md): in the change's
    transaction, a request found pending is locked (key share) until the commit, so the
    refresh's delete of it waits for the change, and a claim is the change's own row.
    """
    now = now or utcnow()
    values = {
        "seller_id": seller_id,
        "requested_at": now,
        "stale_before": now - STALE_REFRESH_REQUEST,
    }
    # Most changes find a refresh already requested: a read says so without writing (after the
    # commit, the upsert below would lock the row, and its transaction wait for a WAL flush).
    # After the commit, a request seen now was seen after the change committed; in the
    # change, the request seen is locked so that it cannot be cleared before the commit.
    fresh = _FRESH_REQUEST_LOCKED if in_change and is_postgresql(session) else _FRESH_REQUEST
    if session.execute(fresh, values).first() is not None:
        return False
    # The upsert locks the row it meets, fresh or not (ON CONFLICT DO UPDATE).
    statement = prepared_upsert(session, RefreshRequest.__table__, _claim_upsert)
    return session.execute(statement, values).scalar() is not None


_FRESH_REQUEST = select(table_of(RefreshRequest).c.seller_id).where(
    table_of(RefreshRequest).c.seller_id == bindparam("seller_id"),
    table_of(RefreshRequest).c.requested_at >= bindparam("stale_before"),
)
_FRESH_REQUEST_LOCKED = _FRESH_REQUEST.with_for_update(read=True, key_share=True)


def _claim_upsert(upsert: Any) -> Any:
    return upsert.on_conflict_do_update(
        index_elements=["seller_id"],
        set_={"requested_at": upsert.excluded.requested_at},
        where=upsert.table.c.requested_at < bindparam("stale_before"),
    ).returning(upsert.table.c.seller_id)


def clear_refresh_request(session: Session, seller_id: int) -> None:
    session.execute(delete(RefreshRequest).where(RefreshRequest.seller_id == seller_id))


def expire_refresh_request(session: Session, seller_id: int) -> None:
    """A claim whose refresh was never sent: stale at once, for the next change or the sweep."""
    session.execute(
        update(RefreshRequest)
        .where(RefreshRequest.seller_id == seller_id)
        .values(requested_at=utcnow() - STALE_REFRESH_REQUEST - timedelta(seconds=1))
    )


# -- master data: the party keys of an event and the responsible seller (docs/master-data.md) --

#: Namespace of the advisory locks that order a stage's party keys against a re-link.
PARTY_KEY_LOCK_NAMESPACE = 0x4B4559  # "KEY"


@dataclass(frozen=True, order=True)
class PartyKey:
    """A normalised outside party: ``phone`` (E.164), ``email``, ``domain`` or ``customer``."""

    kind: str
    value: str


def party_keys(
    session: Session,
    settings: Settings,
    *,
    phones: Iterable[str | None] = (),
    addresses: Iterable[str | None] = (),
    customer_numbers: Iterable[str | None] = (),
) -> list[PartyKey]:
    """Normalised keys in the order given; our own numbers, extensions and staff phones dropped."""
    keys: list[PartyKey] = []
    for raw in phones:
        e164 = normalise_phone(raw, settings.phone_region)
        if e164 and not is_internal_number(session, raw, settings):
            keys.append(PartyKey("phone", e164))
    for raw in addresses:
        address = (raw or "").strip().lower()
        if "@" not in address or len(address) > 320:
            continue
        keys.append(PartyKey("email", address))
        domain = email_domain(address)
        if domain and domain not in settings.free_mail_domains:
            keys.append(PartyKey("domain", domain))
    for raw in customer_numbers:
        if raw and raw.strip():
            keys.append(PartyKey("customer", raw.strip()[:320]))
    return list(dict.fromkeys(keys))


def record_party_keys(
    session: Session,
    settings: Settings,
    event: CrmEvent,
    *,
    phones: Iterable[str | None] = (),
    addresses: Iterable[str | None] = (),
    customer_numbers: Iterable[str | None] = (),
    new: bool = False,
) -> list[PartyKey]:
    """Remember which outside numbers and addresses the stage matched ``event`` by.

    Called by the call, email and visit stages after matching. When a contact or customer
    later gains one of these, ``tasks.relink`` finds the event by index and links it. An event
    that is not linked also takes the keys' advisory locks (PostgreSQL): a party change that
    holds them has either committed before our re-check (``tasks.leads``) or waits for us and
    then sees this event's keys, so no re-link falls between the two transactions.
    ``new``: the event was created by this stage (it has no keys yet).
    """
    keys = party_keys(
        session, settings, phones=phones, addresses=addresses, customer_numbers=customer_numbers
    )
    wanted = {(k.kind, k.value): position for position, k in enumerate(keys)}
    current: dict[tuple[str, str], int] = {}
    if not new:  # an event created by this stage has no keys yet
        current = {
            (row.kind, row.value): row.position
            for row in session.scalars(
                select(EventPartyKey).where(EventPartyKey.event_id == event.id)
            )
        }
    if current != wanted:
        if current:
            session.execute(delete(EventPartyKey).where(EventPartyKey.event_id == event.id))
        if wanted:
            session.execute(
                PARTY_KEY_INSERT,
                [
                    {"event_id": event.id, "kind": kind, "value": value, "position": position}
                    for (kind, value), position in wanted.items()
                ],
            )
    if event.link_state != "linked" and event.linked_by != "hand":
        lock_party_keys(session, keys)
    return keys


#: Namespace of the advisory locks on calls, one per (source system, call id) ("CAL").
CALL_LOCK_NAMESPACE = 0x43414C


def lock_calls(session: Session, calls: Iterable[tuple[str, str]]) -> None:
    """Transaction-level advisory locks on calls (source system, call id), taken before
    anything else a writer of a call takes (its ledger rows, its event), all of a transaction's
    at once, in the order of their lock ids.

    A batch writes its calls' ledger rows and events set-based, then the messages it left one
    by one; another batch or a call update holding some of the same calls took theirs in
    another order (a ledger key of one call, then the event of another), and the two waited on
    each other until PostgreSQL broke the circle. Holding the calls first, a writer waits for
    whoever holds any of them, never in a circle. SQLite needs none (one writer at a time).
    """
    if is_postgresql(session):
        _advisory_locks(session, CALL_LOCK_NAMESPACE, (f"{s}\x00{c}" for s, c in calls))


def _lock_id(key: str) -> int:
    # Any string a message may hold, a lone surrogate included (validation rejects it later).
    return int.from_bytes(
        hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:4], "big", signed=True
    )


def _advisory_locks(session: Session, namespace: int, keys: Iterable[str]) -> None:
    """Transaction-level advisory locks on ``keys``, all in one statement, in the order of their
    lock ids (keys whose ids collide are one lock, so two transactions never take two ids in
    opposite orders)."""
    ids = sorted({_lock_id(key) for key in keys})
    if len(ids) == 1:
        session.execute(_ONE_LOCK, {"ns": namespace, "key": ids[0]})
    elif ids:
        session.execute(_LOCKS_IN_ORDER, {"ns": namespace, "keys": ids})


_ONE_LOCK = text("SELECT pg_advisory_xact_lock(:ns, :key)")
# unnest yields the ids in the array's order, and the aggregate takes them as they come.
_LOCKS_IN_ORDER = text(
    "SELECT count(pg_advisory_xact_lock(:ns, k)) FROM unnest(CAST(:keys AS integer[])) AS k"
)


def lock_party_keys(session: Session, keys: Iterable[PartyKey]) -> None:
    """Transaction-level advisory locks on party keys, in one global order (no deadlock among
    them). SQLite needs none: it runs one writing transaction at a time."""
    if is_postgresql(session):
        _advisory_locks(session, PARTY_KEY_LOCK_NAMESPACE, (f"{k.kind}:{k.value}" for k in keys))


def responsible_seller_id(session: Session, customer_id: int | None) -> int | None:
    """The customer's responsible seller, for events no staff member handled.

    A deactivated staff member keeps their history but is assigned no new events: while the
    customer's responsible seller is deactivated, such events stay unassigned until the ERP
    names a new seller.
    """
    if customer_id is None:
        return None
    return session.scalar(
        select(Staff.id)
        .join(Customer, Customer.seller_id == Staff.id)
        .where(Customer.id == customer_id, Staff.active.is_(True))
    )


def responsible_seller_notes(
    session: Session, customer_id: int | None, seller_id: int | None
) -> list[str]:
    """Why an event got (or did not get) the customer's responsible seller, for its note."""
    if customer_id is None:
        return []
    if seller_id is not None:
        return ["assigned to the customer's responsible seller"]
    row = session.execute(
        select(Staff.username, Staff.active)
        .join(Customer, Customer.seller_id == Staff.id)
        .where(Customer.id == customer_id)
    ).first()
    if row is not None and not row.active:
        return [f"the customer's responsible seller {row.username} is deactivated: unassigned"]
    return ["the customer has no responsible seller: unassigned"]


def insert_new(
    session: Session, table: Table, rows: list[dict[str, Any]], unique: tuple[str, ...]
) -> list[int] | None:
    """Insert rows that must all be new, in one statement; their ids in order, or None when
    one of them was there already (and then none is known to be inserted or not).

    On PostgreSQL one ``INSERT … SELECT … FROM unnest(…) ON CONFLICT DO NOTHING RETURNING``
    (``insert_rows``): a short statement however many rows, where the multi-row VALUES of a
    batch was a statement of hundreds of kilobytes that the driver parsed again for every
    batch. SQLite takes the multi-row statement.
    """
    if is_postgresql(session):
        columns = ", ".join(unique)
        returned = insert_rows(
            session,
            table,
            rows,
            f"ON CONFLICT ({columns}) DO NOTHING RETURNING id, {columns}",
        )
    else:
        returning = prepared_upsert(session, table, _RETURNING_INSERTS[unique])
        returned = list(session.execute(returning, rows).all())  # id, *unique
    found = {tuple(row[1:]): row[0] for row in returned}
    if len(found) != len(rows):
        return None
    return [found[tuple(row[name] for name in unique)] for row in rows]


def _ledger_returning(upsert: Any) -> Any:
    table = upsert.table
    return upsert.on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(
        table.c.id, table.c.idempotency_key
    )


def _event_returning(upsert: Any) -> Any:
    table = upsert.table
    return upsert.on_conflict_do_nothing(index_elements=list(EVENT_KEY)).returning(
        table.c.id, table.c.source_system, table.c.source_kind, table.c.source_id
    )


EVENT_KEY = ("source_system", "source_kind", "source_id")
_RETURNING_INSERTS = {("idempotency_key",): _ledger_returning, EVENT_KEY: _event_returning}
