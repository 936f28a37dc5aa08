"""The per-call state machine: every order of a call's updates gives the same stored event."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from models.events import CrmEvent, FollowUp
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.ingest.call_state import fold_updates
from tasks.maintenance import delete_event
from tasks.store import record_inbound_update
from tasks.views import events_json

SWITCHBOARD = "+358 9 111 000"
MATTI = "040 123 4567"


def update(call_id: str, **fields: Any) -> dict[str, Any]:
    return {"schema": "crm.call/1", "source_system": "pbx-test", "call_id": call_id, **fields}


def five_updates(call_id: str) -> list[dict[str, Any]]:
    """Ringing, answered, a note without a status, an unknown provider status, completed.

    The completed update carries no numbers (some PBXs send only the outcome at the end).
    """
    return [
        update(
            call_id,
            sequence=1,
            status="ringing",
            direction="inbound",
            **{"from": MATTI, "to": SWITCHBOARD},
            agent="201",
            started_at="2026-11-23T09:14:05+02:00",
        ),
        update(
            call_id,
            sequence=2,
            status="answered",
            direction="inbound",
            **{"from": MATTI, "to": SWITCHBOARD},
            agent="201",
            answered_at="2026-11-23T09:14:12+02:00",
        ),
        update(call_id, note="Soittaa takaisin huomenna.", properties=["advisory"]),
        update(call_id, sequence=3, status="on-hold", properties=["customer_feedback"]),
        update(
            call_id,
            sequence=4,
            status="completed",
            ended_at="2026-11-23T09:21:40+02:00",
            duration_s=448,
        ),
    ]


def stored(db: Session, call_id: str) -> dict[str, Any]:
    events = db.scalars(select(CrmEvent).where(CrmEvent.source_id == call_id)).all()
    assert len(events) == 1, f"{len(events)} events for {call_id}"
    event = events_json(db, list(events))[0]
    details = events[0].details
    # Everything a user sees, minus what names this particular call.
    for key in ("id", "source_id", "subject"):
        event.pop(key)
    event["raw_statuses"] = details["raw_statuses"]
    event["updates"] = details["updates"]
    return event


def test_every_permutation_of_five_updates_with_duplicates_gives_the_same_event(
    world: Session, ctx: StageContext
) -> None:
    """All 120 delivery orders, each through the stage from a clean state, with duplicates.

    The orders are walked as a tree: a savepoint before each delivery is rolled back after its
    subtree, so every root-to-leaf path is one complete delivery sequence of the same call.
    """
    updates = five_updates("perm5")
    rng = random.Random(5)
    seen: dict[str, dict[str, Any]] = {}
    paths = 0

    def explore(delivered: list[int]) -> None:
        nonlocal paths
        if len(delivered) == len(updates):
            paths += 1
            event = stored(world, "perm5")
            seen.setdefault(repr(event), event)
            return
        for index in range(len(updates)):
            if index in delivered:
                continue
            savepoint = world.begin_nested()
            assert ingest_call(world, ctx, updates[index]).outcome == "stored"
            if len(delivered) in (1, 3):  # an earlier update arrives again: a duplicate
                again = updates[rng.choice([*delivered, index])]
                assert ingest_call(world, ctx, again).outcome == "duplicate"
            explore([*delivered, index])
            savepoint.rollback()

    explore([])
    assert paths == 120
    assert len(seen) == 1, "different orders gave different events"
    event = next(iter(seen.values()))
    assert event["status"] == "completed"
    assert event["duration_s"] == 448
    assert event["occurred_at"] == "2026-11-23T07:14:05+00:00"
    assert event["ended_at"] == "2026-11-23T07:21:40+00:00"
    assert event["contact"] == "Matti Virtanen"  # the numbers survive the update without them
    assert event["seller"] == "anna"
    assert event["body"] == "Soittaa takaisin huomenna."
    assert event["properties"] == ["advisory", "customer_feedback"]
    assert event["raw_statuses"] == ["on-hold"]
    assert "provider statuses kept raw: on-hold" in event["match_note"]
    assert event["updates"] == 5


def test_status_only_moves_forward_and_terminal_states_never_regress(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(world, ctx, update("fwd", sequence=5, status="missed", direction="inbound"))
    for late in ("answered", "ringing"):
        ingest_call(world, ctx, update("fwd", sequence=9, status=late, direction="inbound"))
    assert stored(world, "fwd")["status"] == "missed"


def test_sequence_decides_between_terminal_statuses(world: Session, ctx: StageContext) -> None:
    # A PBX that first reports the miss and later that the caller left a voicemail.
    ingest_call(world, ctx, update("seq", sequence=4, status="voicemail", direction="inbound"))
    ingest_call(world, ctx, update("seq", sequence=3, status="missed", direction="inbound"))
    assert stored(world, "seq")["status"] == "voicemail"
    ingest_call(world, ctx, update("seq2", sequence=3, status="voicemail", direction="inbound"))
    ingest_call(world, ctx, update("seq2", sequence=4, status="missed", direction="inbound"))
    assert stored(world, "seq2")["status"] == "missed"


def test_conflicting_updates_without_sequence_resolve_the_same_way_in_any_order(
    world: Session, ctx: StageContext
) -> None:
    a: dict[str, Any] = {"status": "completed", "note": "version A", "duration_s": 10}
    b: dict[str, Any] = {"status": "completed", "note": "version B", "duration_s": 20}
    c: dict[str, Any] = {"status": "busy", "note": "version C"}
    results = set()
    for n, order in enumerate(itertools.permutations([a, b, c])):
        call_id = f"conflict-{n}"
        for fields in order:
            ingest_call(world, ctx, update(call_id, direction="inbound", **fields))
        event = stored(world, call_id)
        results.add((event["status"], event["body"], event["duration_s"]))
    assert len(results) == 1
    status, body, _ = results.pop()
    assert status == "completed"  # someone talked: more than "busy"
    assert body in ("version A", "version B")


def test_an_update_with_no_status_is_merged_and_the_event_has_no_status_yet(
    world: Session, ctx: StageContext
) -> None:
    outcome = ingest_call(
        world, ctx, update("nostatus", direction="inbound", **{"from": MATTI}, note="Muistio.")
    )
    assert outcome.outcome == "stored"
    event = stored(world, "nostatus")
    assert event["status"] is None
    assert event["contact"] == "Matti Virtanen"
    assert event["body"] == "Muistio."
    ingest_call(world, ctx, update("nostatus", status="answered"))
    assert stored(world, "nostatus")["status"] == "answered"


def test_an_unknown_status_is_kept_raw_and_never_drops_the_call(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(world, ctx, update("raw", status="transferred", direction="inbound"))
    event = stored(world, "raw")
    assert event["status"] == "transferred"  # nothing known yet: the raw status shows
    assert "provider statuses kept raw: transferred" in event["match_note"]
    ingest_call(world, ctx, update("raw", status="answered", direction="inbound"))
    ingest_call(world, ctx, update("raw", status="parked", direction="inbound"))
    event = stored(world, "raw")
    assert event["status"] == "answered"
    assert event["raw_statuses"] == ["parked", "transferred"]


def test_a_status_update_missing_the_numbers_keeps_them(world: Session, ctx: StageContext) -> None:
    ingest_call(
        world,
        ctx,
        update("nonum", status="ringing", direction="inbound", **{"from": MATTI, "to": "202"}),
    )
    ingest_call(world, ctx, update("nonum", status="completed", **{"from": "", "to": None}))
    event = stored(world, "nonum")
    assert (event["status"], event["contact"], event["seller"]) == (
        "completed",
        "Matti Virtanen",
        "mikko",
    )
    assert event["direction"] == "inbound"


def test_times_take_the_most_complete_information(world: Session, ctx: StageContext) -> None:
    # The ringing update has the start with its offset, the last one a naive start: the time
    # with the offset stays. The duration comes from the answer and end times when not given.
    ingest_call(
        world,
        ctx,
        update(
            "times",
            sequence=1,
            status="ringing",
            direction="inbound",
            started_at="2026-11-23T09:00:00+02:00",
        ),
    )
    ingest_call(
        world,
        ctx,
        update(
            "times",
            sequence=2,
            status="completed",
            started_at="2026-11-23T09:00:03",
            answered_at="2026-11-23T09:00:10+02:00",
            ended_at="2026-11-23T09:02:10+02:00",
        ),
    )
    event = stored(world, "times")
    assert event["occurred_at"] == "2026-11-23T07:00:00+00:00"
    assert event["duration_s"] == 120
    assert "had no UTC offset" not in event["match_note"]


def test_a_call_known_only_from_its_end_is_dated_by_its_talk(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(
        world,
        ctx,
        update("endonly", status="completed", ended_at="2026-11-23T10:10:00Z", duration_s=600),
    )
    assert stored(world, "endonly")["occurred_at"] == "2026-11-23T10:00:00+00:00"


def test_naive_times_are_read_in_the_configured_zone_and_noted(
    world: Session, ctx: StageContext
) -> None:
    ingest_call(
        world,
        ctx,
        update("naive", status="ringing", direction="inbound", started_at="2026-11-23T09:00:00"),
    )
    event = stored(world, "naive")
    assert event["occurred_at"] == "2026-11-23T07:00:00+00:00"
    assert "started_at had no UTC offset; read as Europe/Helsinki" in event["match_note"]


def test_an_answered_call_is_not_left_with_a_follow_up_from_an_earlier_miss(
    world: Session, ctx: StageContext
) -> None:
    base = {"direction": "inbound", "from": MATTI, "to": SWITCHBOARD}
    ingest_call(world, ctx, update("late-answer", sequence=2, status="missed", **base))
    event_id = world.scalar(select(CrmEvent.id).where(CrmEvent.source_id == "late-answer"))
    assert world.scalar(select(FollowUp.state).where(FollowUp.event_id == event_id)) == "open"
    ingest_call(world, ctx, update("late-answer", sequence=3, status="completed", **base))
    assert world.scalar(select(FollowUp.id).where(FollowUp.event_id == event_id)) is None


@pytest.mark.parametrize(
    ("updates", "status"),
    [
        ([{"status": "ringing"}, {"status": "busy"}, {"status": "answered"}], "busy"),
        ([{"status": "failed", "sequence": 1}, {"status": "completed"}], "failed"),
        ([{"status": "missed"}, {"status": "completed"}], "completed"),
        (
            [{"status": None}, {"status": ""}, {"status": "x-2", "sequence": 3}, {"status": "x-1"}],
            "x-2",
        ),
    ],
)
def test_fold_status(updates: list[dict[str, Any]], status: str) -> None:
    for order in itertools.permutations(updates):
        state = fold_updates(list(order))
        assert (state.get("status") or state["raw_status"]) == status


def test_fold_of_two_unknown_statuses_without_sequence_is_order_independent() -> None:
    updates = [{"status": "x-1", "note": "a"}, {"status": "x-2", "note": "b"}]
    assert fold_updates(updates) == fold_updates(updates[::-1])


# -- a call's first update makes its event in one INSERT ------------------------------------------

FIRST_UPDATES = {
    "answered, closing a follow-up": update(
        "first",
        status="completed",
        direction="inbound",
        **{"from": MATTI, "to": SWITCHBOARD},
        agent="201",
        started_at="2026-11-23T10:00:00+02:00",
        duration_s=61,
        note="Tarjous lähetetty.",
        properties=["advisory"],
        category="sales_action",
    ),
    "missed, opening a follow-up": update(
        "first",
        status="missed",
        direction="inbound",
        **{"from": MATTI, "to": SWITCHBOARD},
        started_at="2026-11-23T09:00:00+02:00",
    ),
    "unknown number, no direction, an unknown status": update(
        "first",
        status="x-parked",
        **{"from": "+358 40 900 0072", "to": SWITCHBOARD},
        answered_at="2026-11-23T11:00:00+02:00",
    ),
    "internal": update(
        "first", status="completed", **{"from": "201", "to": "202"}, ended_at="2026-11-23T12:00"
    ),
    "outbound with a recording to fetch": update(
        "first",
        status="completed",
        direction="outbound",
        **{"from": "201", "to": "+358 44 765 4321"},
        agent="anna",
        ended_at="2026-11-24T12:05:00",
        duration_s=300,
        recording={"url": "http://127.0.0.1:9/rec.wav", "filename": "rec.wav"},
    ),
}


def everything_of(db: Session, call_id: str) -> dict[str, Any]:
    """The event as a user sees it and every row the call made beside it."""
    event = db.scalars(select(CrmEvent).where(CrmEvent.source_id == call_id)).one()
    seen = stored(db, call_id)
    # Minus the ids and times of the moment: the rest must be equal.
    seen["details"] = {
        **event.details,
        "recordings": [
            {**r, "requested_at": bool(r["requested_at"])}
            for r in event.details.get("recordings", [])
        ],
    }
    seen["documents"] = [{**d, "id": None} for d in seen["documents"]]
    seen["match_note"], seen["link_state"] = event.match_note, event.link_state
    seen["rows"] = {
        table: db.execute(
            text(f"SELECT {columns} FROM {table} WHERE event_id = :id ORDER BY 1, 2"),
            {"id": event.id},
        ).all()
        for table, columns in {
            "event_party_key": "kind, value, position",
            "event_participant": "staff_id, 0",
            "event_property_link": "property_code, 0",
            "follow_up": "state, seller_id",
            "event_document": "role, filename",
            # The update's ledger row names its event (replay, export, delete-event read it).
            "inbound_message": "schema, source_kind",
        }.items()
    }
    return seen


@pytest.mark.parametrize("kind", FIRST_UPDATES)
def test_a_first_update_inserted_whole_makes_what_the_fold_makes(
    world: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The usual case skips reading the call's updates back: it must make the same event, with
    the same keys, participants, properties, follow-ups and recordings, as the fold does."""
    message = FIRST_UPDATES[kind]
    assert ingest_call(world, ctx, {**message, "call_id": "whole"}).outcome == "stored"

    # The same update again, under another call id, told that the ledger held earlier ones:
    # the event is created before the fold, which reads the ledger, as any later update does.
    from tasks.ingest import call as stage

    def seen_earlier(session: Session, **values: Any) -> tuple[int | None, bool]:
        inbound_id, _ = record_inbound_update(session, **values)
        return inbound_id, True

    monkeypatch.setattr(stage, "record_inbound_update", seen_earlier)
    assert ingest_call(world, ctx, {**message, "call_id": "folded"}).outcome == "stored"
    assert everything_of(world, "whole") == everything_of(world, "folded")


def test_a_late_update_of_a_deleted_event_makes_it_again_from_all_of_its_updates(
    world: Session, ctx: StageContext
) -> None:
    first, *later = five_updates("deleted")
    ingest_call(world, ctx, first)
    event_id = world.scalar(select(CrmEvent.id).where(CrmEvent.source_id == "deleted"))
    assert event_id is not None
    delete_event(world, event_id)
    for message in later:
        assert ingest_call(world, ctx, message).outcome == "stored"
    for message in five_updates("kept"):
        ingest_call(world, ctx, message)
    assert stored(world, "deleted") == stored(world, "kept")


def test_a_first_update_that_meets_an_event_inserted_meanwhile_is_folded_and_counted_once(
    world: Session, ctx: StageContext
) -> None:
    """Two first updates of one call at once: each saw no earlier one in the ledger, one
    inserted the event, the other's insert met it. That one must fold and move the counts as a
    later update does, not count the call again (here the other's ledger row is made invisible
    by deleting it, as it was to this update when it looked)."""
    answered = update(
        "meanwhile",
        sequence=2,
        status="answered",
        direction="inbound",
        **{"from": MATTI, "to": SWITCHBOARD},
        agent="201",
        started_at="2026-11-23T09:14:05+02:00",
    )
    ingest_call(world, ctx, answered)
    world.execute(text("DELETE FROM inbound_message WHERE source_id = 'meanwhile'"))
    completed = {**answered, "sequence": 3, "status": "completed", "duration_s": 448}
    assert ingest_call(world, ctx, completed).outcome == "stored"

    event = world.scalars(select(CrmEvent).where(CrmEvent.source_id == "meanwhile")).one()
    assert (event.status, event.duration_s) == ("completed", 448)
    counted = world.execute(
        text(
            "SELECT period, count FROM tally WHERE seller_id = :seller AND count <> 0"
            " ORDER BY period"
        ),
        {"seller": event.seller_id},
    ).all()
    assert [count for _, count in counted] == [1, 1], counted  # its week and its month, once
