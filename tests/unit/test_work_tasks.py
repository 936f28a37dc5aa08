"""Work tasks on events: by a crm.task/1 message (made, changed and closed by its task_id), by
hand, and the seller view's list of what is overdue or due within a week."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import date
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.events import WorkTask
from models.parties import Staff
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.call import ingest_call
from tasks.work import add_task, ingest_task, seller_tasks, set_done, task_rows
from tests.messages import outbound_call

TODAY = date(2026, 11, 25)


def staff(db: Session, username: str) -> Staff:
    found = db.scalar(select(Staff).where(Staff.username == username))
    assert found is not None
    return found


def task_message(**fields: Any) -> dict[str, Any]:
    return {
        "schema": "crm.task/1",
        "source_system": "erp",
        "task_id": "erp-task-881",
        "event": {"kind": "call", "source_system": "pbx-hki", "id": "wt-1"},
        "title": "Lähetä tarjous huoltosopimuksesta",
        **fields,
    }


def test_a_task_message_makes_changes_and_closes_one_task(
    world: Session, ctx: StageContext
) -> None:
    call = ingest_call(world, ctx, outbound_call("wt-1", "2026-11-24T09:00:00+02:00"))
    made = ingest_task(world, ctx, task_message(due="2026-11-27"))
    assert (made.outcome, made.event_id) == ("stored", call.event_id)
    [task] = world.scalars(select(WorkTask)).all()
    # No assignee named: the event's seller (anna, agent 201) has it.
    assert (task.assignee_id, task.due_date, task.state) == (
        staff(world, "anna").id,
        date(2026, 11, 27),
        "open",
    )
    assert ingest_task(world, ctx, task_message(due="2026-11-27")).outcome == "duplicate"

    later = replace(ctx, task_id=str(uuid.uuid4()))
    changed = ingest_task(world, later, task_message(assignee="mikko", due="2026-11-30"))
    assert changed.detail == f"task {task.id} updated"
    world.refresh(task)
    assert (task.assignee_id, task.due_date) == (staff(world, "mikko").id, date(2026, 11, 30))

    closed = replace(ctx, task_id=str(uuid.uuid4()))
    ingest_task(world, closed, task_message(assignee="mikko", due="2026-11-30", done=True))
    world.refresh(task)
    assert (task.state, task.done_by) == ("done", "erp")
    assert len(world.scalars(select(WorkTask)).all()) == 1


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"event": {"kind": "call", "source_system": "pbx-hki", "id": "nope"}}, "no event for"),
        ({"assignee": "nobody"}, "no staff member 'nobody' to assign the task to"),
        ({"title": ""}, "title: Length must be between 1 and 500."),
    ],
)
def test_a_task_that_cannot_be_made_says_why(
    world: Session, ctx: StageContext, fields: dict[str, Any], said: str
) -> None:
    ingest_call(world, ctx, outbound_call("wt-1", "2026-11-24T09:00:00+02:00"))
    with pytest.raises(BadInput) as raised:
        ingest_task(world, ctx, task_message(**fields))
    assert said in raised.value.reason


def test_the_seller_view_lists_overdue_and_soon_due_tasks(
    world: Session, ctx: StageContext
) -> None:
    call = ingest_call(world, ctx, outbound_call("wt-2", "2026-11-24T09:00:00+02:00"))
    assert call.event_id is not None
    anna = staff(world, "anna")
    for title, due in (
        ("later", date(2026, 12, 20)),  # beyond the week: not on the view
        ("soon", date(2026, 11, 30)),
        ("overdue", date(2026, 11, 20)),
        ("no date", None),
        ("done already", date(2026, 11, 21)),
    ):
        add_task(world, call.event_id, title, due=due, created_by="cli:test", settings=ctx.settings)
    done = world.scalar(select(WorkTask).where(WorkTask.title == "done already"))
    assert done is not None
    set_done(world, done.id, True, "cli:test")

    shown = seller_tasks(world, anna, TODAY)
    assert [(t["title"], t["overdue"]) for t in shown] == [("overdue", True), ("soon", False)]
    listed = [t["title"] for t in task_rows(world, assignee="anna", state="all", today=TODAY)]
    assert listed == ["overdue", "done already", "soon", "later", "no date"]
    set_done(world, done.id, False, "cli:test")  # opened again: overdue now
    assert [t["title"] for t in seller_tasks(world, anna, TODAY)][:2] == ["overdue", "done already"]
