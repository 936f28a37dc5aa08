"""Work tasks: something to do about an event (send the offer, call the customer back), for a
staff member, by a due date, open or done. Set by ``crm.task/1`` messages, ``crm-events task``
and the API; the seller view lists a seller's overdue tasks and those due within a week."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.base import utcnow
from models.events import CrmEvent, WorkTask
from models.invalid import BadInput
from models.parties import Customer, Staff
from tasks.context import StageContext
from tasks.match import find_staff
from tasks.references import referenced_event
from tasks.store import StageResult, record_inbound, upsert_key

#: How far ahead the seller view lists open tasks (besides the overdue ones).
DUE_SOON = timedelta(days=7)
STATES = ("open", "done")


def _assignee(session: Session, settings: Settings, reference: str | None) -> Staff | None:
    """The staff member a task is for: username, email address or extension, as messages
    name staff everywhere (``tasks.match.find_staff``)."""
    if reference is None:
        return None
    staff = find_staff(session, reference, settings)
    if staff is None:
        raise BadInput(f"no staff member {reference!r} to assign the task to")
    return staff


def add_task(
    session: Session,
    event_id: int,
    title: str,
    *,
    assignee: str | None = None,
    due: date | None = None,
    created_by: str,
    settings: Settings,
) -> WorkTask:
    """A new open task on the event; for its seller unless ``assignee`` names another."""
    event = session.get(CrmEvent, event_id)
    if event is None:
        raise BadInput(f"no event {event_id}")
    if not title.strip():
        raise BadInput("a task needs a title: what is to be done")
    staff = _assignee(session, settings, assignee)
    task = WorkTask(
        event_id=event.id,
        assignee_id=staff.id if staff else event.seller_id,
        title=title.strip()[:500],
        due_date=due,
        state="open",
        created_by=created_by,
        created_at=utcnow(),
    )
    session.add(task)
    session.flush()
    return task


def set_done(session: Session, task_id: int, done: bool, by: str) -> WorkTask:
    """Close a task by hand (``done``) or open it again."""
    task = session.get(WorkTask, task_id)
    if task is None:
        raise BadInput(f"no task {task_id}")
    task.state = "done" if done else "open"
    task.done_at = utcnow() if done else None
    task.done_by = by if done else None
    session.flush()
    return task


def task_rows(
    session: Session,
    *,
    assignee: str | None = None,
    state: str | None = "open",
    today: date | None = None,
    due_by: date | None = None,
) -> list[dict[str, Any]]:
    """Tasks with their event and who has them, overdue first, then by due date."""
    today = today or date.today()
    query = (
        select(WorkTask, CrmEvent.subject, Staff.username, Customer.customer_number)
        .join(CrmEvent, CrmEvent.id == WorkTask.event_id)
        .outerjoin(Staff, Staff.id == WorkTask.assignee_id)
        .outerjoin(Customer, Customer.id == CrmEvent.customer_id)
    )
    if assignee:
        if session.scalar(select(Staff.id).where(Staff.username == assignee)) is None:
            raise BadInput(f"no staff member with the username {assignee!r}")
        query = query.where(Staff.username == assignee)
    if state in STATES:
        query = query.where(WorkTask.state == state)
    if due_by is not None:
        query = query.where(WorkTask.due_date.is_not(None), WorkTask.due_date <= due_by)
    rows = [
        {
            "id": task.id,
            "event_id": task.event_id,
            "event_subject": subject,
            "customer_number": customer_number,
            "title": task.title,
            "assignee": username,
            "due": task.due_date.isoformat() if task.due_date else None,
            "state": task.state,
            "overdue": task.state == "open" and task.due_date is not None and task.due_date < today,
            "created_by": task.created_by,
            "created_at": task.created_at.isoformat(),
            "done_at": task.done_at.isoformat() if task.done_at else None,
            "done_by": task.done_by,
        }
        for task, subject, username, customer_number in session.execute(query)
    ]
    rows.sort(key=lambda r: (not r["overdue"], r["due"] or "9999-12-31", r["id"]))
    return rows


def seller_tasks(
    session: Session, seller: Staff, today: date | None = None
) -> list[dict[str, Any]]:
    """The seller view's tasks: open ones overdue or due within :data:`DUE_SOON`."""
    today = today or date.today()
    return task_rows(session, assignee=seller.username, today=today, due_by=today + DUE_SOON)


def ingest_task(session: Session, ctx: StageContext, payload: Any) -> StageResult:
    """``crm.task/1``: a task on a stored event, made or changed (by ``task_id``)."""
    # The schema is imported here, not with the module: the command line's listings read
    # through this module and start sooner without marshmallow (docs/design.md).
    from models.schemas.common import load_message, shared_schema
    from models.schemas.task import SCHEMA, TaskMessageSchema

    message = load_message(shared_schema(TaskMessageSchema), payload, SCHEMA)
    event = referenced_event(session, message["event"], "tasks")
    inbound = record_inbound(
        session,
        idempotency_key=upsert_key("task", ctx, payload),
        schema=SCHEMA,
        source_kind="task",
        source_system=message["source_system"],
        source_id=message.get("task_id") or f"event:{event.id}",
        payload=payload,
        event_id=event.id,
    )
    if inbound is None:
        return StageResult("duplicate", event.id, "this task message was already accepted")
    task = None
    if message.get("task_id"):
        task = session.scalar(
            select(WorkTask).where(
                WorkTask.source_system == message["source_system"],
                WorkTask.source_id == message["task_id"],
            )
        )
    created = task is None
    if task is None:
        task = add_task(
            session,
            event.id,
            message["title"],
            assignee=message.get("assignee"),
            due=message.get("due"),
            created_by=message["source_system"],
            settings=ctx.settings,
        )
        task.source_system = message["source_system"]
        task.source_id = message.get("task_id")
    else:
        staff = _assignee(session, ctx.settings, message.get("assignee"))
        task.event_id = event.id
        task.title = message["title"].strip()[:500]
        task.assignee_id = staff.id if staff else event.seller_id
        task.due_date = message.get("due")
    if message["done"] != (task.state == "done"):
        set_done(session, task.id, message["done"], message["source_system"])
    session.flush()
    sellers = {s for s in (task.assignee_id, event.seller_id) if s is not None}
    verb = "created" if created else "updated"
    return StageResult("stored", event.id, f"task {task.id} {verb}", sellers_to_refresh=sellers)
