"""Batches: many messages in one transaction, each with its own outcome; a bad or broken one
never sinks the others, and the counts move once, exactly."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import CrmEvent
from models.ledger import Delivery, FailedMessage, RejectedMessage
from models.parties import Staff
from models.targets import Tally
from tasks import batch as batch_stage
from tasks.batch import ingest_batch
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.maintenance import reconcile
from tests.messages import outbound_call

QUEUES = {"crm.ingest.call": "crm.ingest.call"}


def batch(kind: str, messages: list[Any]) -> dict[str, Any]:
    return {"schema": "crm.batch/1", "source_system": "import", "kind": kind, "messages": messages}


def run(db: Session, ctx: StageContext, payload: Any, task_id: str = "b-1") -> Any:
    context = StageContext(ctx.settings, task_id, "crm.ingest.batch")
    return ingest_batch(db, context, payload, queue_of=QUEUES.get)


def outcomes(db: Session, task_id: str) -> dict[str, tuple[str, str]]:
    return {
        d.task_id: (d.outcome, d.detail)
        for d in db.scalars(select(Delivery).where(Delivery.task_id.like(f"{task_id}/%")))
    }


def week_tally(db: Session, category: str = "crm_event", period: str = "2026-W48") -> int:
    anna = db.scalar(select(Staff.id).where(Staff.username == "anna"))
    count = db.scalar(
        select(Tally.count).where(
            Tally.seller_id == anna, Tally.category_code == category, Tally.period == period
        )
    )
    return count or 0


def test_each_message_has_its_own_outcome(world: Session, ctx: StageContext) -> None:
    first = outbound_call("bt-1", "2026-11-24T09:00:00+02:00", sequence=1, status="answered")
    messages = [
        first,
        outbound_call("bt-2", "2026-11-25T09:00:00+02:00"),
        {**first, "sequence": 2, "status": "completed", "duration_s": 90},  # merges into bt-1
        first,  # sent twice
        {"schema": "crm.call/1", "source_system": "pbx", "colour": "red"},
        "not even an object",
    ]
    result = run(world, ctx, batch("call", messages))
    assert dict(result.outcomes) == {"stored": 3, "duplicate": 1, "rejected": 2}
    assert result.detail == "call batch of 6: duplicate 1, rejected 2, stored 3"
    found = outcomes(world, "b-1")
    assert [found[f"b-1/{i}"][0] for i in range(6)] == [
        "stored",
        "stored",
        "stored",
        "duplicate",
        "rejected",
        "rejected",
    ]
    rejected = world.scalars(select(RejectedMessage).order_by(RejectedMessage.id)).all()
    # Each rejection is the message's own, replayable alone to its own task.
    assert [(r.task_id, r.task_name) for r in rejected] == [
        ("b-1/4", "crm.ingest.call"),
        ("b-1/5", "crm.ingest.call"),
    ]
    assert rejected[0].payload == messages[4]
    event = world.scalar(select(CrmEvent).where(CrmEvent.source_id == "bt-1"))
    assert event is not None and (event.status, event.duration_s) == ("completed", 90)
    assert week_tally(world) == 2
    assert reconcile(world, ctx).drift == 0


@pytest.mark.parametrize("kind", ["call", "visit"])
def test_a_value_no_database_keeps_rejects_its_message_alone(
    world: Session, ctx: StageContext, kind: str
) -> None:
    """JSON carries NaN and lone UTF-16 surrogates, which no text or JSON column keeps: the
    message holding one is rejected with the reason, the batch's other messages are stored."""
    good = outbound_call("bt-ok", "2026-11-24T09:00:00+02:00")
    if kind == "visit":
        good = {
            "schema": "crm.visit/1",
            "source_system": "field-app",
            "visit_id": "bt-ok",
            "seller": "anna",
            "customer_number": "10001",
            "started_at": "2026-11-24T10:00:00+02:00",
            "subject": "Käynti",
        }
    text, number = ("note", "duration_s") if kind == "call" else ("memo", "location")
    messages = [
        {**good, text: "lone \ud800 surrogate"},
        good,
        {**good, number: float("nan")},
        float("nan"),
        "\udfff",
    ]
    result = run(world, ctx, batch(kind, messages), task_id="b-u")
    assert dict(result.outcomes) == {"stored": 1, "rejected": 4}
    found = outcomes(world, "b-u")
    assert found["b-u/1"][0] == "stored"
    reasons = {
        r.task_id: r.reason
        for r in world.scalars(select(RejectedMessage).where(RejectedMessage.task_id.like("b-u/%")))
    }
    assert f"{text}: Contains a lone UTF-16 surrogate." in reasons["b-u/0"]
    assert f"{number}: nan is not a JSON number." in reasons["b-u/2"]
    assert "must be a JSON object, got float" in reasons["b-u/3"]
    assert "must be a JSON object, got str" in reasons["b-u/4"]


def test_a_message_that_breaks_rolls_back_alone(
    world: Session, ctx: StageContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug met by one message: its savepoint is rolled back, its count with it, and it is
    recorded as failed; the messages before and after it are stored. A bug met by the
    set-based stage of new calls first rolls that stage back, whatever it wrote, and the batch
    goes message by message."""
    task_name, stage = batch_stage.STAGES["call"]
    bulk = batch_stage.BULK_STAGES["call"]

    def breaks_on_bt_b(session: Session, context: StageContext, message: Any) -> Any:
        result = stage(session, context, message)  # writes the event and moves its counts
        if message["call_id"] == "bt-b":
            raise ZeroDivisionError("a bug")
        return result

    def bulk_breaks(session: Session, context: StageContext, messages: Any, leaving: Any) -> Any:
        bulk(session, context, messages, leaving)  # writes every event
        raise KeyError("a bug in the set-based stage")

    monkeypatch.setitem(batch_stage.STAGES, "call", (task_name, breaks_on_bt_b))
    monkeypatch.setitem(batch_stage.BULK_STAGES, "call", bulk_breaks)
    messages = [
        outbound_call(f"bt-{name}", "2026-11-24T09:00:00+02:00") for name in ("a", "b", "c")
    ]
    result = run(world, ctx, batch("call", messages), task_id="b-2")
    assert dict(result.outcomes) == {"stored": 2, "failed": 1}
    assert outcomes(world, "b-2")["b-2/1"][0] == "failed"
    [failed] = world.scalars(select(FailedMessage)).all()
    assert (failed.task_id, failed.kind, failed.queue) == ("b-2/1", "bug", "crm.ingest.call")
    assert "ZeroDivisionError: a bug" in failed.exception
    stored = set(world.scalars(select(CrmEvent.source_id).where(CrmEvent.source_id.like("bt-%"))))
    assert stored == {"bt-a", "bt-c"}
    assert week_tally(world) == 2
    assert reconcile(world, ctx).drift == 0


def test_counts_move_once_whatever_the_batch_does(world: Session, ctx: StageContext) -> None:
    """A visit reclassified and then cancelled within one batch moves its counts to where it
    ends, not once per message."""
    visit = {
        "schema": "crm.visit/1",
        "source_system": "field-app",
        "visit_id": "bt-visit",
        "seller": "anna",
        "customer_number": "10001",
        "started_at": "2026-11-24T10:00:00+02:00",
        "subject": "Käynti",
    }
    result = run(
        world,
        ctx,
        batch(
            "visit",
            [
                {**visit, "updated_at": "2026-11-24T11:00:00+02:00"},
                {**visit, "updated_at": "2026-11-24T12:00:00+02:00", "category": "sales_action"},
                {**visit, "updated_at": "2026-11-24T13:00:00+02:00", "category": "sales_action"},
            ],
        ),
        task_id="b-3",
    )
    assert dict(result.outcomes) == {"stored": 3}
    assert week_tally(world, "customer_visit") == 0
    assert week_tally(world, "sales_action") == 1
    assert reconcile(world, ctx).drift == 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (batch("meeting", [{}]), "kind: Must be one of"),
        (batch("call", []), "messages: Length must be between 1 and 1000"),
        (batch("call", [{}] * 1001), "messages: Length must be between 1 and 1000"),
        ({"schema": "crm.batch/1", "kind": "call", "messages": "x"}, "messages: Not a valid list"),
    ],
)
def test_a_batch_that_is_not_one_is_rejected_whole(
    world: Session, ctx: StageContext, payload: Any, reason: str
) -> None:
    with pytest.raises(BadInput) as caught:
        run(world, ctx, payload)
    assert reason in caught.value.reason


def test_the_documented_batch_is_taken(world: Session, ctx: StageContext) -> None:
    """docs/messages.md's example of crm.batch/1, as the worker takes it."""
    import json
    import re

    from tests.conftest import ROOT

    text = (ROOT / "docs" / "messages.md").read_text(encoding="utf-8")
    section = text[text.index("## Batches: crm.batch/1") :]
    [example] = re.findall(r"^```json\n(.*?)^```", section, re.MULTILINE | re.DOTALL)[:1]
    result = run(world, ctx, json.loads(example), task_id="b-doc")
    assert dict(result.outcomes) == {"stored": 2}
