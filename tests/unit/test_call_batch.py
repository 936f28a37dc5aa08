"""The set-based stage of a batch's new calls stores what the call stage would have stored:
the same events, properties, party keys, participants, follow-ups, counts and outcomes."""

from __future__ import annotations

import random
import re
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg.sql
import pytest
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from config.settings import Settings
from models.db import table_of
from models.events import CrmEvent, EventParticipant, EventPropertyLink, FollowUp
from models.ledger import Delivery, InboundMessage, RejectedMessage
from models.parties import EventPartyKey, Staff
from models.schemas.batch import MAX_BATCH_MESSAGES
from models.targets import Tally
from tasks import batch as batch_stage
from tasks import store
from tasks.batch import ingest_batch
from tasks.context import StageContext
from tasks.ingest import call_batch, call_state
from tasks.ingest.call import ingest_call
from tasks.maintenance import delete_event, reconcile
from tests.conftest import migrated
from tests.unit.test_call_followups import MATTI, callback, event_id, missed

QUEUES = {"crm.ingest.call": "crm.ingest.call"}
HELSINKI = "+02:00"


def at(day: int, hour: int) -> str:
    return f"2026-11-{day:02d}T{hour:02d}:00:00{HELSINKI}"


def batch(messages: list[Any]) -> dict[str, Any]:
    return {
        "schema": "crm.batch/1",
        "source_system": "import",
        "kind": "call",
        "messages": messages,
    }


def mixed_calls() -> list[Any]:
    """A backfill's worth of cases: follow-ups opened and closed (also by a callback that comes
    later in the file but happened earlier), internal calls, unknown and shared numbers, a
    customer number, properties and refused codes, a call in three updates, an update sent
    twice, and what the set-based stage leaves to the call stage."""
    ringing = {**missed("b-multi", at(24, 9)), "status": "ringing", "sequence": 1}
    return [
        missed("b-m1", at(23, 10)),
        callback("b-cb-late", at(23, 12)),
        missed("b-m2", at(23, 14)),
        callback("b-cb-early", at(23, 11)),  # happened before b-cb-late: it closes b-m1
        {**callback("b-props", at(24, 8)), "properties": ["commercial", "bogus"]},
        {**callback("b-cat", at(24, 8)), "category": "sales_action", "call_id": "b-cat"},
        {**callback("b-erp", at(24, 8)), "project_number": "P-2027-14", "offer_number": "T-118"},
        {**callback("b-open", at(24, 8)), "state": "open"},
        {**callback("b-nocat", at(24, 8)), "category": "nonsense"},
        ringing,
        {**ringing, "status": "answered", "sequence": 2, "answered_at": at(24, 9)},
        {**ringing, "status": "completed", "sequence": 3, "ended_at": at(24, 10)},
        {**ringing, "status": "answered", "sequence": 2, "answered_at": at(24, 9)},  # twice
        {
            "schema": "crm.call/1",
            "source_system": "pbx-test",
            "call_id": "b-internal",
            "status": "completed",
            "from": "201",
            "to": "202",
            "started_at": at(24, 11),
        },
        missed("b-unknown", at(24, 12), number="+358 40 900 0001"),
        missed("b-shared", at(24, 13), number="09 4321 000"),  # two contacts of 10002
        {**missed("b-custno", at(24, 14), number="+358 40 900 0002"), "customer_number": "10002"},
        {**missed("b-nodir", at(24, 15)), "direction": None, "started_at": "2026-11-24T15:00:00"},
        {**callback("b-rec", at(24, 16)), "recording": {"url": "https://pbx.invalid/r.wav"}},
        callback("b-existing", at(25, 9)),  # a second update of a call stored before
        {"schema": "crm.call/1", "source_system": "pbx-test", "colour": "red"},
        callback("b-cb-next", at(25, 10), agent="mikko"),
    ]


def snapshot(db: Session) -> dict[str, Any]:
    """What users see of the calls: every column but ids and clocks, by call id."""
    db.flush()
    events = db.scalars(
        select(CrmEvent).where(CrmEvent.source_id.like("b-%")).order_by(CrmEvent.source_id)
    ).all()
    call_of = {e.id: e.source_id for e in events}
    skip = {"id", "created_at", "updated_at"}
    return {
        "events": {
            e.source_id: {
                c.key: comparable(getattr(e, c.key), call_of)
                for c in CrmEvent.__table__.columns
                if c.key not in skip
            }
            for e in events
        },
        "properties": sorted(
            (call_of[p.event_id], p.property_code)
            for p in db.scalars(select(EventPropertyLink))
            if p.event_id in call_of
        ),
        "keys": sorted(
            (call_of[k.event_id], k.kind, k.value, k.position)
            for k in db.scalars(select(EventPartyKey))
            if k.event_id in call_of
        ),
        "participants": sorted(
            (call_of[p.event_id], p.staff_id)
            for p in db.scalars(select(EventParticipant))
            if p.event_id in call_of
        ),
        "follow_ups": sorted(
            (
                call_of[f.event_id],
                f.state,
                call_of.get(f.closed_by_event_id or 0),
                f.seller_id,
                f.customer_id,
                f.reason,
            )
            for f in db.scalars(select(FollowUp))
            if f.event_id in call_of
        ),
        "ledger": sorted(
            (m.source_id, m.idempotency_key, call_of.get(m.event_id or 0))
            for m in db.scalars(select(InboundMessage).where(InboundMessage.source_id.like("b-%")))
        ),
        "tallies": sorted(
            (t.seller_id, t.category_code, t.period, t.count) for t in db.scalars(select(Tally))
        ),
        "outcomes": sorted(
            (d.task_id, d.outcome, d.detail, call_of.get(d.event_id or 0))
            for d in db.scalars(select(Delivery).where(Delivery.task_id.like("imp/%")))
        ),
        "rejected": sorted(
            (r.task_id, r.reason)
            for r in db.scalars(
                select(RejectedMessage).where(RejectedMessage.task_id.like("imp/%"))
            )
        ),
    }


def comparable(value: Any, call_of: dict[int, str]) -> Any:
    """Without what differs between two runs: a recording's ``requested_at`` is when the stage
    ran, and a note's ``event #N`` names the event by its id (the call id instead)."""
    if isinstance(value, dict):
        return {k: comparable(v, call_of) for k, v in value.items() if k != "requested_at"}
    if isinstance(value, list):
        return [comparable(v, call_of) for v in value]
    if isinstance(value, str):
        return re.sub(r"#(\d+)", lambda m: "#" + call_of.get(int(m[1]), m[1]), value)
    return value


def run_batch(db: Session, ctx: StageContext, messages: list[Any]) -> Any:
    context = StageContext(ctx.settings, "imp", "crm.ingest.batch")
    return ingest_batch(db, context, batch(messages), queue_of=QUEUES.get)


def both_ways(
    db: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch, messages: list[Any]
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The batch message by message, rolled back; then with the set-based stage. Returns both
    snapshots and the calls the call stage took in the second run."""
    task_name, stage = batch_stage.STAGES["call"]
    by_stage: list[str] = []

    def counted(session: Session, context: StageContext, message: Any) -> Any:
        by_stage.append(message.get("call_id", "?") if isinstance(message, dict) else "?")
        return stage(session, context, message)

    savepoint = db.begin_nested()
    with monkeypatch.context() as patch:
        patch.setattr(batch_stage, "BULK_STAGES", {})
        run_batch(db, ctx, messages)
        one_by_one = snapshot(db)
    savepoint.rollback()
    db.expunge_all()
    monkeypatch.setitem(batch_stage.STAGES, "call", (task_name, counted))
    run_batch(db, ctx, messages)
    return one_by_one, snapshot(db), by_stage


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_backfill_stores_what_the_call_stage_would(
    database: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if database == "sqlite":
        world, ctx = request.getfixturevalue("sqlite_world")
    else:
        world, ctx = request.getfixturevalue("world"), request.getfixturevalue("ctx")
    ingest_call(world, ctx, callback("b-existing", at(25, 8)))
    one_by_one, set_based, by_stage = both_ways(world, ctx, monkeypatch, mixed_calls())

    # The set-based stage took every new call but the one with a recording; the call stage
    # took that one and the message that is no call, and on SQLite the update of the call
    # stored before (PostgreSQL's batch merges it: a callback the PBX moved in time).
    merged = [] if database == "postgresql" else ["b-existing"]
    assert sorted(by_stage) == sorted(["?", "b-rec", *merged])
    assert set_based == one_by_one
    events = set_based["events"]
    assert len(events) == 18
    follow_ups = {f[0]: (f[1], f[2]) for f in set_based["follow_ups"]}
    assert follow_ups["b-m1"] == ("closed", "b-cb-early")
    assert follow_ups["b-m2"] == ("closed", "b-props")
    assert events["b-multi"]["status"] == "completed"
    assert events["b-multi"]["details"]["updates"] == 3
    assert events["b-internal"]["link_state"] == "internal"
    assert (events["b-erp"]["project_number"], events["b-erp"]["offer_number"]) == (
        "P-2027-14",
        "T-118",
    )
    assert (events["b-open"]["state"], events["b-multi"]["state"]) == ("open", "done")
    assert events["b-shared"]["link_state"] == "ambiguous"
    assert events["b-custno"]["customer_id"] is not None
    assert ("b-props", "commercial") in set_based["properties"]
    assert "unknown property 'bogus' refused" in events["b-props"]["classification_note"]
    outcomes = [o[1] for o in set_based["outcomes"]]
    assert outcomes.count("duplicate") == 1 and outcomes.count("rejected") == 1
    assert reconcile(world, ctx).drift == 0


def test_the_lead_rule_is_the_call_stage_s(
    world: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With leads from unknown callers on, an unknown inbound caller's calls go through the call
    stage, which makes the first one the lead; the others stay set-based."""
    leads = StageContext(replace(ctx.settings, lead_from_unknown_calls=True), ctx.task_id)
    messages = [
        missed("b-lead-1", at(24, 12), number="+358 40 900 0003"),
        missed("b-lead-2", at(24, 13), number="+358 40 900 0003"),
        callback("b-known", at(24, 14)),
    ]
    one_by_one, set_based, by_stage = both_ways(world, leads, monkeypatch, messages)
    assert sorted(by_stage) == ["b-lead-1", "b-lead-2"]
    assert set_based == one_by_one
    assert set_based["events"]["b-lead-1"]["category_code"] == "lead"
    assert set_based["events"]["b-lead-2"]["category_code"] == "crm_event"


def test_an_update_accepted_meanwhile_sends_the_batch_message_by_message(
    world: Session, ctx: StageContext
) -> None:
    """Another worker accepted one of the batch's updates first (its ledger row is there, as if
    committed while the batch ran): the set-based stage gives up, rolls back, and the call stage
    gives every message its outcome."""
    messages = [callback("b-race-1", at(24, 8)), callback("b-race-2", at(24, 9))]
    ingest_call(world, ctx, messages[1])
    # Its event is gone (as if not committed yet when the batch looked), its ledger row stays.
    world.execute(text("DELETE FROM crm_event WHERE source_id = 'b-race-2'"))
    result = run_batch(world, ctx, messages)
    assert dict(result.outcomes) == {"stored": 1, "duplicate": 1}
    anna = world.scalar(select(Staff.id).where(Staff.username == "anna"))
    assert world.scalar(select(CrmEvent.seller_id).where(CrmEvent.source_id == "b-race-1")) == anna


def batch_lock_free(engine: Engine) -> bool:
    """Whether another batch could take the lock of batches going message by message now."""
    with engine.connect() as probe:
        free = probe.scalar(
            text("SELECT pg_try_advisory_xact_lock(:ns, 0)"),
            {"ns": batch_stage.BATCH_LOCK_NAMESPACE},
        )
        probe.rollback()
    return bool(free)


def test_batches_the_set_based_stage_takes_whole_write_side_by_side(
    world: Session, ctx: StageContext, engine: Engine
) -> None:
    """A batch of new calls leaves the batch lock free while it is uncommitted: a backfill's
    batches write side by side. One that leaves a message to the call stage holds it, taken
    before it wrote anything, as does one that the set-based stage gave up on."""
    result = run_batch(world, ctx, [missed("b-side-1", at(24, 8)), callback("b-side-2", at(24, 9))])
    assert dict(result.outcomes) == {"stored": 2}
    assert batch_lock_free(engine)

    result = run_batch(world, ctx, [callback("b-side-3", at(24, 10)), {"colour": "red"}])
    assert dict(result.outcomes) == {"stored": 1, "rejected": 1}
    assert not batch_lock_free(engine)


def call_lock_free(engine: Engine, call_id: str) -> bool:
    """Whether another transaction could take the call's lock (``tasks.store.lock_calls``)."""
    with engine.connect() as probe:
        free = probe.scalar(
            text("SELECT pg_try_advisory_xact_lock(:ns, :key)"),
            {"ns": store.CALL_LOCK_NAMESPACE, "key": store._lock_id(f"pbx-test\x00{call_id}")},
        )
        probe.rollback()
    return bool(free)


def test_a_batch_holds_its_calls_before_it_writes_and_until_it_commits(
    world: Session, ctx: StageContext, engine: Engine
) -> None:
    """Every call a batch names is held from before its first write to its commit, those the
    call stage takes included; a call update alone holds its own: a writer of the same calls
    waits for it, and two batches never wait on each other in a circle."""
    assert call_lock_free(engine, "b-held-1")
    result = run_batch(
        world,
        ctx,
        [
            callback("b-held-1", at(24, 8)),
            {**callback("b-held-2", at(24, 9)), "recording": {"url": "https://pbx.invalid/r"}},
            {**callback("b-held-3", at(24, 10)), "from": 42},  # rejected
        ],
    )
    assert dict(result.outcomes) == {"stored": 2, "rejected": 1}
    assert not call_lock_free(engine, "b-held-1")  # set-based
    assert not call_lock_free(engine, "b-held-2")  # the call stage's
    assert call_lock_free(engine, "b-unrelated")
    ingest_call(world, ctx, callback("b-held-4", at(24, 11)))
    assert not call_lock_free(engine, "b-held-4")


def test_a_batch_the_set_based_stage_gave_up_on_goes_one_batch_at_a_time(
    world: Session, ctx: StageContext, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update committed by another worker after the set-based stage looked (its ledger row
    appears only when the batch inserts its own) sends the batch message by message, under the
    batch lock, although its savepoint's rollback let go of everything taken in it."""
    messages = [callback("b-raced-1", at(24, 8)), callback("b-raced-2", at(24, 9))]
    ingest_call(world, ctx, messages[1])
    monkeypatch.setattr(call_batch, "_leave_existing", lambda session, calls, result: None)
    result = run_batch(world, ctx, messages)
    assert dict(result.outcomes) == {"stored": 1, "duplicate": 1}
    assert not batch_lock_free(engine)


def test_follow_ups_are_settled_by_the_batch_itself(
    world: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Follow-ups opened before the batch and in it are closed by the first call after them
    that reached the customer, also when that call comes later in the file or closed another
    follow-up before; and the set-based stage alone settles them."""
    ingest_call(world, ctx, missed("b-before", at(20, 9)))  # open until the batch's callback
    ingest_call(world, ctx, missed("b-before-2", at(21, 9)))
    ingest_call(world, ctx, callback("b-closer-before", at(22, 9)))  # closes both, for now
    messages = [
        missed("b-m1", at(23, 10)),
        callback("b-cb-late", at(23, 12)),
        missed("b-m2", at(23, 14)),
        callback("b-cb-early", at(23, 11)),
        callback("b-cb-first", at(21, 12)),  # happened before b-closer-before: closes b-before-2
        missed("b-m3", at(23, 15), number="+358 45 222 3333"),  # Sanna of 10002: stays open
    ]
    one_by_one, set_based, by_stage = both_ways(world, ctx, monkeypatch, messages)
    assert by_stage == []
    assert set_based == one_by_one
    follow_ups = {f[0]: (f[1], f[2]) for f in set_based["follow_ups"]}
    assert follow_ups == {
        "b-before": ("closed", "b-cb-first"),
        "b-before-2": ("closed", "b-cb-first"),
        "b-m1": ("closed", "b-cb-early"),
        "b-m2": ("open", None),
        "b-m3": ("open", None),
    }


def test_a_late_update_of_a_deleted_call_gets_all_its_updates(
    world: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event deleted by hand keeps its call's updates in the ledger; a late update in a batch
    makes the event again from all of them, as the call stage does, not from itself alone."""
    first = {**callback("b-deleted", at(24, 8)), "status": "answered", "sequence": 1}
    ingest_call(world, ctx, {**first, "note": "tarjous lähetetty"})
    event_id = world.scalar(select(CrmEvent.id).where(CrmEvent.source_id == "b-deleted"))
    assert event_id is not None
    delete_event(world, event_id)
    late = {**first, "status": "completed", "sequence": 2, "duration_s": 300}
    one_by_one, set_based, by_stage = both_ways(world, ctx, monkeypatch, [late])
    assert by_stage == ["b-deleted"]
    assert set_based == one_by_one
    event = set_based["events"]["b-deleted"]
    assert (event["status"], event["body"], event["details"]["updates"]) == (
        "completed",
        "tarjous lähetetty",
        2,
    )


def store_calls_in_progress(db: Session, ctx: StageContext) -> list[Any]:
    """Calls stored before a batch (a PBX's first updates); returns the batch's next updates
    of them: what a live contact centre sends most."""
    ringing = {**missed("b-ring", at(24, 9)), "status": "ringing", "sequence": 1}
    talking = {**missed("b-talk", at(24, 10)), "status": "answered", "answered_at": at(24, 10)}
    other = {**missed("b-agent", at(24, 16)), "status": "ringing", "sequence": 1}
    for message in (
        missed("b-before", at(24, 8)),  # closed by b-talk, until b-ring is answered
        ringing,
        talking,
        callback("b-done", at(24, 11)),
        callback("b-cat", at(24, 12)),
        callback("b-props", at(24, 13)),
        missed("b-missed", at(24, 14)),
        callback("b-hand", at(24, 15)),
        other,
        missed("b-m9", at(25, 9)),  # closed by b-move, until it moves before it
        {**callback("b-move", at(25, 10)), "sequence": 1},
        callback("b-after", at(25, 11)),
        {**callback("b-late", at(25, 12)), "sequence": 1},
        missed("b-m10", at(25, 13)),  # closed by b-after2, until b-late moves after it
        callback("b-after2", at(25, 15)),
    ):
        ingest_call(db, ctx, message)
    db.execute(text("UPDATE crm_event SET linked_by = 'hand' WHERE source_id = 'b-hand'"))
    return [
        {**ringing, "status": "answered", "sequence": 2, "answered_at": at(24, 9)},
        {**talking, "status": "completed", "ended_at": at(24, 11), "duration_s": 3600},
        callback("b-done", at(24, 11)),  # sent again
        {**callback("b-cat", at(24, 12)), "category": "sales_action", "duration_s": 60},
        {**callback("b-props", at(24, 13)), "properties": ["commercial"]},
        {**missed("b-missed", at(24, 14)), "status": "voicemail"},
        {**callback("b-hand", at(24, 15)), "duration_s": 30},
        {**other, "status": "answered", "sequence": 2, "agent": "mikko", "answered_at": at(24, 16)},
        callback("b-new", at(24, 17)),
        {**callback("b-move", at(25, 8)), "sequence": 2},  # the PBX's clock corrected
        {**callback("b-late", at(25, 14)), "sequence": 2},
    ]


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_next_updates_of_stored_calls_are_merged_as_the_call_stage_would(
    database: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL the batch merges the next updates of linked calls itself: answered (a call
    that now reaches its customer closes their follow-up), completed, sent again, another
    category, another agent, another time (the follow-ups it closed, and those it closes now,
    are settled again). A link made by hand, a missed call and changed properties stay the call
    stage's, as every stored call does on SQLite. Both ways store the same."""
    if database == "sqlite":
        world, ctx = request.getfixturevalue("sqlite_world")
    else:
        world, ctx = request.getfixturevalue("world"), request.getfixturevalue("ctx")
    messages = store_calls_in_progress(world, ctx)
    one_by_one, set_based, by_stage = both_ways(world, ctx, monkeypatch, messages)

    stored_before = ["b-agent", "b-cat", "b-done", "b-hand", "b-late", "b-missed", "b-move"]
    stored_before += ["b-props", "b-ring"]
    if database == "postgresql":
        assert sorted(by_stage) == ["b-hand", "b-missed", "b-props"]
    else:
        assert sorted(by_stage) == sorted([*stored_before, "b-talk"])
    assert set_based == one_by_one
    events = set_based["events"]
    follow_ups = {f[0]: (f[1], f[2]) for f in set_based["follow_ups"]}
    assert follow_ups["b-before"] == ("closed", "b-ring")
    assert follow_ups["b-m9"] == ("closed", "b-after")
    assert follow_ups["b-m10"] == ("closed", "b-late")
    assert (events["b-talk"]["status"], events["b-talk"]["duration_s"]) == ("completed", 3600)
    assert events["b-cat"]["category_code"] == "sales_action"
    mikko = world.scalar(select(Staff.id).where(Staff.username == "mikko"))
    assert events["b-agent"]["seller_id"] == mikko
    assert ("b-agent", mikko) in set_based["participants"]
    outcomes = {o[0]: o[1:3] for o in set_based["outcomes"]}
    assert outcomes["imp/2"] == ("duplicate", "this update was already accepted")
    assert outcomes["imp/1"] == ("stored", "merged")
    assert reconcile(world, ctx).drift == 0


def test_a_stored_call_changed_after_the_batch_read_it_sends_the_batch_message_by_message(
    world: Session, ctx: StageContext, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that takes no call's lock (a re-link, a hand link) changed a stored call's
    event after the batch read it: the batch sees it under the event's lock, gives up (twice),
    and the call stage folds every update of the call."""
    first = {**callback("b-raced", at(24, 8)), "status": "answered", "sequence": 1}
    ingest_call(world, ctx, first)
    ingest_call(world, ctx, {**first, "note": "soitetaan takaisin", "sequence": 2})
    read = call_batch._read_stored

    def read_before_the_other(session: Session, calls: Any, result: Any) -> None:
        read(session, calls, result)
        calls[("pbx-test", "b-raced")].stored.before["body"] = ""  # as it was before

    monkeypatch.setattr(call_batch, "_read_stored", read_before_the_other)
    result = run_batch(world, ctx, [{**first, "status": "completed", "sequence": 3}])
    assert dict(result.outcomes) == {"stored": 1}
    assert not batch_lock_free(engine)  # it went message by message
    event = world.scalars(select(CrmEvent).where(CrmEvent.source_id == "b-raced")).one()
    world.refresh(event)
    assert (event.status, event.body, event.details["updates"]) == (
        "completed",
        "soitetaan takaisin",
        3,
    )


def test_a_batch_that_met_a_writer_runs_its_set_based_stage_once_more(
    world: Session, ctx: StageContext, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer a batch met has committed when the batch notices: the set-based stage runs
    again, reads what it wrote, and takes the batch whole (no batch lock, no message alone)."""
    first = {**callback("b-again", at(24, 8)), "status": "answered", "sequence": 1}
    ingest_call(world, ctx, first)
    ingest_call(world, ctx, {**first, "note": "soitetaan takaisin", "sequence": 2})
    read, reads = call_batch._read_stored, []

    def read_before_the_other_once(session: Session, calls: Any, result: Any) -> None:
        read(session, calls, result)
        reads.append(1)
        if len(reads) == 1:
            calls[("pbx-test", "b-again")].stored.before["body"] = ""  # as it was before

    monkeypatch.setattr(call_batch, "_read_stored", read_before_the_other_once)
    result = run_batch(world, ctx, [{**first, "status": "completed", "sequence": 3}])
    assert len(reads) == 2
    assert dict(result.outcomes) == {"stored": 1}
    assert batch_lock_free(engine)
    event = world.scalars(select(CrmEvent).where(CrmEvent.source_id == "b-again")).one()
    world.refresh(event)
    assert (event.status, event.body, event.details["updates"]) == (
        "completed",
        "soitetaan takaisin",
        3,
    )


def test_earlier_updates_are_found_by_index_probes_whatever_the_statistics(world: Session) -> None:
    """A backfill into a new database outruns ANALYZE: the planner, told the ledger holds almost
    nothing, must still look each call id up in the index, not filter every call of the system
    (that made each batch read the whole ledger)."""
    world.execute(text("ANALYZE inbound_message"))  # rolled back with the test
    world.execute(
        table_of(InboundMessage).insert(),
        [
            {
                "idempotency_key": f"call:stale-{n}",
                "schema": "crm.call/1",
                "source_kind": "call",
                "source_system": "pbx-stale",
                "source_id": f"stale-{n}",
                "payload": {},
            }
            for n in range(3000)
        ],
    )
    ids = ["stale-7", "stale-2999", "never-seen"]
    found = world.scalars(call_batch._EARLIER_PG, {"system": "pbx-stale", "ids": ids}).all()
    assert sorted(found) == ["stale-2999", "stale-7"]
    [[plan]] = world.execute(
        text("EXPLAIN (FORMAT JSON) " + str(call_batch._EARLIER_PG)),
        {"system": "pbx-stale", "ids": ids},
    ).all()
    conditions = [node.get("Index Cond", "") for node in plan_nodes(plan[0]["Plan"])]
    assert any("source_id" in condition for condition in conditions), plan


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in plan_nodes(child))]


def busy_customer(world: Session, ctx: StageContext) -> int:
    """A customer with a year's worth of missed calls, each closed by a callback, and a
    planner told (a backfill outruns ANALYZE) that there are hardly any follow-ups."""
    world.execute(text("ANALYZE follow_up"))  # rolled back with the test
    ingest_call(world, ctx, missed("busy-m", at(1, 9)))
    ingest_call(world, ctx, callback("busy-cb", at(1, 10)))
    template = world.scalars(select(CrmEvent.id).where(CrmEvent.source_id == "busy-m")).one()
    closer = world.scalars(select(CrmEvent.id).where(CrmEvent.source_id == "busy-cb")).one()
    columns = [c.name for c in table_of(CrmEvent).columns if c.name not in ("id", "source_id")]
    listed = ", ".join(columns)
    world.execute(
        text(
            f"INSERT INTO crm_event (source_id, {listed}) SELECT 'busy-' || n, {listed}"
            " FROM crm_event, generate_series(1, 3000) AS n WHERE id = :template"
        ),
        {"template": template},
    )
    world.execute(
        text(
            "INSERT INTO follow_up (event_id, seller_id, customer_id, reason, state, created_at,"
            " closed_at, closed_by_event_id) SELECT e.id, e.seller_id, e.customer_id, 'missed',"
            " 'closed', now(), now(), :closer FROM crm_event e WHERE e.source_id LIKE 'busy-%'"
            " AND e.id <> :closer"
            " AND NOT EXISTS (SELECT 1 FROM follow_up f WHERE f.event_id = e.id)"
        ),
        {"closer": closer},
    )
    customer = world.scalars(select(CrmEvent.customer_id).where(CrmEvent.id == template)).one()
    assert customer is not None
    return customer


def plan_of(world: Session, statement: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
    expanded = statement.compile(dialect=world.get_bind().dialect).construct_expanded_state(params)
    [[plan]] = (
        world.connection()
        .exec_driver_sql("EXPLAIN (FORMAT JSON) " + expanded.statement, expanded.parameters)
        .all()
    )
    return plan_nodes(plan[0]["Plan"])


def generic_plan_of(world: Session, statement: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan of ``statement`` prepared, as the driver prepares a statement run five times,
    in the generic form PostgreSQL may then keep: planned without the parameters' values."""
    expanded = statement.compile(dialect=world.get_bind().dialect).construct_expanded_state(params)
    names: list[str] = []

    def numbered(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    prepared = re.sub(r"%\((\w+)\)s", numbered, expanded.statement)
    connection = world.connection()
    connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
    connection.exec_driver_sql(f"PREPARE generic_plan AS {prepared}")
    try:
        # EXECUTE takes no parameters of its own: the values go as literals.
        driver = connection.connection.driver_connection
        arguments = ", ".join(
            psycopg.sql.Literal(expanded.parameters[name]).as_string(driver) for name in names
        )
        [[plan]] = connection.exec_driver_sql(
            f"EXPLAIN (FORMAT JSON) EXECUTE generic_plan({arguments})"
        ).all()
    finally:
        connection.exec_driver_sql("DEALLOCATE generic_plan")
    return plan_nodes(plan[0]["Plan"])


def indexes_read(world: Session, statement: Any, params: dict[str, Any]) -> set[str]:
    return {
        node["Index Name"] for node in plan_of(world, statement, params) if "Index Name" in node
    }


def test_open_follow_ups_are_read_by_their_index_also_when_prepared(
    world: Session, ctx: StageContext
) -> None:
    """The driver prepares a statement that a worker runs again and again, and PostgreSQL may
    then plan it once for any parameters: the customers' open follow-ups must still be read
    by their partial index, not by all of a busy customer's follow-ups (a backfill's every
    batch read 14,000 of them that way)."""
    customer = busy_customer(world, ctx)
    world.execute(text("ANALYZE follow_up"))
    params = probes(customer, datetime(2026, 11, 20, tzinfo=UTC))
    nodes = generic_plan_of(world, call_batch._CANDIDATES_PG, params)
    indexes = {node["Index Name"] for node in nodes if "Index Name" in node}
    assert "ix_follow_up_open_customer" in indexes
    assert "ix_follow_up_customer_id" not in indexes


def assert_read_by_index(world: Session, statement: Any, params: dict[str, Any]) -> None:
    """The follow-ups a call may settle are read by their indexes (the customer's open ones,
    those a call closed, the customer's next call), never all of the customer's."""
    indexes = indexes_read(world, statement, params)
    assert "ix_follow_up_customer_id" not in indexes
    assert {
        "ix_follow_up_open_customer",
        "ix_follow_up_closed_by_event_id",
        "ix_crm_event_reaching_call",
    } <= indexes


def probes(customer: int, *moments: datetime) -> dict[str, Any]:
    """``_CANDIDATES_PG``'s parameters for new calls at ``moments`` that reached ``customer``."""
    calls = [CrmEvent(id=-n, customer_id=customer, occurred_at=m) for n, m in enumerate(moments)]
    return {"customers": [customer], **call_batch._probes(calls)}


def test_the_follow_ups_a_batch_settles_are_found_by_index_whatever_the_statistics(
    world: Session, ctx: StageContext
) -> None:
    """A busy customer's past follow-ups must not be read again by every batch of a backfill:
    only the open ones and those closed by the customer's next call after each new one, each
    by an index."""
    customer = busy_customer(world, ctx)
    params = probes(
        customer, datetime(2026, 11, 20, tzinfo=UTC), datetime(2026, 11, 21, tzinfo=UTC)
    )
    assert world.scalars(call_batch._CANDIDATES_PG, params).all() == []
    assert_read_by_index(world, call_batch._CANDIDATES_PG, params)

    # A call between the missed calls and their callback: it closes all 3,001 of them now.
    params = probes(customer, datetime(2026, 11, 1, 9, 30, tzinfo=ZoneInfo("Europe/Helsinki")))
    ids = world.scalars(call_batch._CANDIDATES_PG, params).all()
    assert len(ids) == 3001
    # Each with its closer by index, never by reading all the events (3,000 here, millions in
    # a year's backfill) to join the candidates to their missed calls.
    nodes = plan_of(world, call_batch._SETTLED_PG, {"ids": ids[:3]})
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], nodes
    assert "ix_crm_event_reaching_call" in {n.get("Index Name") for n in nodes}


def a_year_of_missed_calls_and_callbacks(world: Session, ctx: StageContext, days: int) -> int:
    """A customer who missed a call each morning and got a callback each afternoon, for
    ``days`` days from 2026-01-01: each follow-up closed by that day's callback."""
    for day in range(days):
        moment = datetime(2026, 1, 1, 9, tzinfo=UTC) + timedelta(days=day)
        ingest_call(world, ctx, missed(f"b-y-m{day}", moment.isoformat()))
        later = moment + timedelta(hours=6)
        ingest_call(world, ctx, callback(f"b-y-cb{day}", later.isoformat()))
    customer = world.scalar(select(CrmEvent.customer_id).where(CrmEvent.source_id == "b-y-m0"))
    assert customer is not None
    return customer


def test_calls_that_arrive_late_read_no_more_follow_ups_than_those_in_order(
    world: Session, ctx: StageContext
) -> None:
    """A second PBX's file of the same year: its calls happened before most of the customer's
    stored ones. Each may close only the follow-up its customer's next call closed, not
    every follow-up closed since (which made such a file import a hundred times slower)."""
    customer = a_year_of_missed_calls_and_callbacks(world, ctx, days=60)
    early = datetime(2026, 1, 2, 10, tzinfo=UTC)  # between day 1's missed call and its callback
    ids = world.scalars(call_batch._CANDIDATES_PG, probes(customer, early)).all()
    assert len(ids) == 1  # day 1's follow-up, closed by day 1's callback for now

    statement = call_state._AFFECTED_BY_CLOSER
    params = {
        "customers": [customer],
        "customer_id": customer,
        "event_id": -1,
        "occurred_at": early,
    }
    assert len(world.scalars(statement, params).all()) == 1

    result = run_batch(world, ctx, [callback("b-y-early", early.isoformat())])
    assert dict(result.outcomes) == {"stored": 1}
    closed_by = world.scalar(
        select(CrmEvent.source_id)
        .join(FollowUp, FollowUp.closed_by_event_id == CrmEvent.id)
        .where(FollowUp.event_id == event_id(world, "b-y-m1"))
    )
    assert closed_by == "b-y-early"


CUSTOMERS = {  # the number a missed call comes from, the number a callback goes to
    "10001": (MATTI, "+358 44 765 4321"),
    "10002": ("+358 45 222 3333", "+358 45 222 3333"),
}


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
@pytest.mark.parametrize("seed", range(4))
def test_follow_ups_end_as_the_rule_says_whatever_order_calls_come_in(
    database: str, seed: int, request: pytest.FixtureRequest
) -> None:
    """Missed calls and callbacks of two customers over a few days, some stored one by one,
    then the rest in a batch in any order, then a few more one by one: each follow-up ends
    closed by the first later call that reached its customer, else open."""
    if database == "sqlite":
        world, ctx = request.getfixturevalue("sqlite_world")
    else:
        world, ctx = request.getfixturevalue("world"), request.getfixturevalue("ctx")
    rng = random.Random(seed)
    start = datetime(2026, 11, 2, 8, tzinfo=UTC)
    minutes = rng.sample(range(5 * 24 * 60), 40)  # distinct: no two calls at once
    calls = []
    for n, minute in enumerate(minutes):
        customer = rng.choice(sorted(CUSTOMERS))
        moment = (start + timedelta(minutes=minute)).isoformat()
        if rng.random() < 0.5:
            message = missed(f"b-r{n}", moment, number=CUSTOMERS[customer][0])
        else:
            message = callback(f"b-r{n}", moment, to=CUSTOMERS[customer][1])
        calls.append((customer, minute, message))
    arrival = rng.sample(calls, len(calls))
    before, in_batch, after = arrival[:15], arrival[15:33], arrival[33:]
    for _customer, _minute, message in before:
        ingest_call(world, ctx, message)
    assert run_batch(world, ctx, [m for _c, _t, m in in_batch]).outcomes == {"stored": 18}
    for _customer, _minute, message in after:
        ingest_call(world, ctx, message)

    expected = {}
    for customer, minute, message in calls:
        if message["status"] != "missed":
            continue
        later = [
            (t, m["call_id"])
            for c, t, m in calls
            if c == customer and t > minute and m["status"] != "missed"
        ]
        expected[message["call_id"]] = min(later)[1] if later else None
    found = {}
    for follow_up, call_id in world.execute(
        select(FollowUp, CrmEvent.source_id).join(CrmEvent, CrmEvent.id == FollowUp.event_id)
    ):
        closer = world.scalar(
            select(CrmEvent.source_id).where(CrmEvent.id == follow_up.closed_by_event_id)
        )
        assert (follow_up.state == "closed") == (closer is not None)
        found[call_id] = closer
    assert found == expected


def test_a_call_reads_the_follow_ups_it_may_settle_by_index_whatever_the_statistics(
    world: Session, ctx: StageContext
) -> None:
    """Nor by every call of the customer that arrives live: the same parts, by the same
    indexes, and the call's own follow-up and those it closed by theirs."""
    customer = busy_customer(world, ctx)
    params = {
        "customers": [customer],
        "customer_id": customer,
        "event_id": -1,
        "occurred_at": datetime(2026, 11, 20, tzinfo=UTC),
    }
    statement = call_state._AFFECTED_BY_CLOSER
    assert world.scalars(statement, params).all() == []
    assert_read_by_index(world, statement, params)


def test_a_full_batch_on_an_sqlite_built_for_999_parameters(tmp_path: Path) -> None:
    # An SQLite built to take at most 999 parameters a statement (the default until 3.32): a
    # batch of the most calls crm.batch/1 carries reads its calls' earlier updates in lists that
    # fit, and its multi-row inserts are cut to fit, as the connection reports its limit.
    settings = Settings.embedded(tmp_path)
    engine = migrated(settings)
    engine.dispose()

    def built_for_999(connection: sqlite3.Connection, _record: Any) -> None:
        connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    event.listen(engine, "connect", built_for_999, insert=True)  # before the engine's own
    ctx = StageContext(settings, "full-batch", "test")
    start = datetime(2026, 11, 2, 8, tzinfo=UTC)
    messages = [
        callback(f"b-full-{n}", (start + timedelta(minutes=n)).isoformat())
        for n in range(MAX_BATCH_MESSAGES)
    ]
    with Session(engine) as session:
        with pytest.raises(OperationalError, match="too many SQL variables"):
            session.execute(select(CrmEvent.id).where(CrmEvent.id.in_(range(1000)))).all()
        session.rollback()
        run_batch(session, ctx, messages)
        session.commit()
        stored = session.scalar(select(func.count()).select_from(CrmEvent))
    engine.dispose()
    assert stored == MAX_BATCH_MESSAGES == 1000
