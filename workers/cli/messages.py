"""Messages in and out: ``publish``, ``rejected``, ``failed``, ``replay``."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.queues import INGEST_TASKS
from workers.cli.common import (
    AddCommand,
    CommandError,
    InputError,
    Runtime,
    emit_json,
    seconds,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def cmd_publish(args: argparse.Namespace, rt: Runtime) -> int:
    from workers.publish import PublishError, publish_files, wait_for

    try:
        published = publish_files(
            rt.publisher, rt.settings, args.kind, [Path(p) for p in args.files]
        )
    except PublishError as exc:
        raise CommandError(str(exc)) from exc
    rows: list[dict[str, Any]] = [
        {"task_id": p.task_id, "task": p.task_name, "source": p.source} for p in published
    ]
    status = 0
    if args.wait is not None:
        done = wait_for(rt.sessions, [p.task_id for p in published], args.wait)
        for row in rows:
            delivery = done.get(row["task_id"])
            row["outcome"] = delivery.outcome if delivery else "pending"
            row["event_id"] = delivery.event_id if delivery else None
            row["detail"] = delivery.detail if delivery else ""
        missing = sum(1 for r in rows if r["outcome"] == "pending")
        if missing:
            print(
                f"timed out after {args.wait:g} s: {missing} message(s) not processed",
                file=sys.stderr,
            )
            status = 3
    if args.json:
        emit_json(rows)
    else:
        from workers.render import table

        columns = ["source", "task_id"] + (
            ["outcome", "event_id", "detail"] if args.wait is not None else []
        )
        table(
            f"published {len(rows)} {args.kind} message(s)",
            columns,
            [[r.get(c) for c in columns] for r in rows],
        )
    return status


def cmd_rejected(args: argparse.Namespace, rt: Runtime) -> int:
    from sqlalchemy import select

    from models.ledger import RejectedMessage

    with rt.sessions() as session:
        rows = [
            {
                "id": f"rejected:{r.id}",
                "task": r.task_name,
                "task_id": r.task_id,
                "reason": r.reason,
                "errors": r.errors,
                "rejected_at": r.rejected_at.isoformat(),
                "replayed_at": r.replayed_at.isoformat() if r.replayed_at else None,
                "payload": r.payload,
            }
            for r in session.scalars(select(RejectedMessage).order_by(RejectedMessage.id))
        ]
    if args.json:
        emit_json(rows)
    else:
        from workers.render import brief, table

        table(
            f"{len(rows)} rejected message(s)",
            ["id", "task", "when", "reason"],
            [[r["id"], r["task"], r["rejected_at"][:19], brief(r["reason"])] for r in rows],
        )
    return 0


FAILURE_KINDS = ("transient", "bug", "timeout", "poison")


def cmd_failed(args: argparse.Namespace, rt: Runtime) -> int:
    from sqlalchemy import select

    from models.ledger import FailedMessage

    query = select(FailedMessage).order_by(FailedMessage.id)
    if args.kind:
        query = query.where(FailedMessage.kind == args.kind)
    with rt.sessions() as session:
        rows = [
            {
                "id": f"failed:{r.id}",
                "task": r.task_name,
                "task_id": r.task_id,
                "kind": r.kind,
                "exception": r.exception,
                "attempts": r.attempts,
                "queue": r.queue,
                "failed_at": r.failed_at.isoformat(),
                "replayed_at": r.replayed_at.isoformat() if r.replayed_at else None,
                "payload": r.payload,
            }
            for r in session.scalars(query)
        ]
    if args.json:
        emit_json(rows)
    else:
        from workers.render import brief, table

        table(
            f"{len(rows)} failed message(s)",
            ["id", "task", "kind", "when", "replayed", "exception"],
            [
                [
                    r["id"],
                    r["task"],
                    r["kind"],
                    r["failed_at"][:19],
                    (r["replayed_at"] or "")[:19],
                    brief(r["exception"]),
                ]
                for r in rows
            ],
        )
    return 0


def cmd_replay(args: argparse.Namespace, rt: Runtime) -> int:
    from sqlalchemy import select

    from models.ledger import FailedMessage

    if bool(args.id) == bool(args.all):
        raise InputError("give one id (rejected:N or failed:N) or --all")
    if args.kind and not args.all:
        raise InputError("--kind goes with --all")
    if args.all:
        query = select(FailedMessage.id).where(FailedMessage.replayed_at.is_(None))
        if args.kind:
            query = query.where(FailedMessage.kind == args.kind)
        with rt.sessions() as session:
            ids = [f"failed:{n}" for n in session.scalars(query.order_by(FailedMessage.id))]
    else:
        ids = [args.id]
    from workers.cli.bulk import progress_bar

    replayed = []
    # --all: a progress bar and one summary line, not a line per message.
    with progress_bar(len(ids) if args.all else 0, waiting=False) as bar:
        for ledger_id in ids:
            task_id = replay_one(rt, ledger_id, only_pending=args.all)
            bar.published(1)
            if task_id is not None:
                if not args.all:
                    print(f"replayed {ledger_id} as task {task_id}", file=sys.stderr)
                replayed.append({"id": ledger_id, "task_id": task_id})
    if args.all:
        print(f"replayed {len(replayed)} failed message(s)", file=sys.stderr)
    if args.json:
        emit_json(replayed)
    return 0


def replay_one(rt: Runtime, ledger_id: str, *, only_pending: bool) -> str | None:
    """Publish a rejected or failed message again as a new task; returns its task id.

    The row is marked replayed before publishing (so two ``replay --all`` never both send it)
    and unmarked again if publishing fails, so a broker outage loses no replay.
    """
    from config.queues import TASK_QUEUES
    from models.base import utcnow
    from models.db import transaction
    from models.ledger import FailedMessage, RejectedMessage
    from models.limits import row_id
    from tasks.ledger import whole_payload
    from tasks.retention import is_deleted_payload
    from workers.app import named_queue

    kind, _, number = ledger_id.partition(":")
    if kind not in ("rejected", "failed") or row_id(number) is None:
        raise InputError("an id is rejected:N or failed:N (see `crm-events rejected` / `failed`)")

    def locked(session: Session) -> RejectedMessage | FailedMessage | None:
        if kind == "rejected":
            return session.get(RejectedMessage, int(number), with_for_update=True)
        return session.get(FailedMessage, int(number), with_for_update=True)

    with transaction(rt.sessions) as session:
        row = locked(session)
        if row is None:
            raise CommandError(f"no {ledger_id}")
        if only_pending and row.replayed_at is not None:
            return None
        if isinstance(row, RejectedMessage) and is_refused_body(row.payload):
            raise CommandError(
                f"{ledger_id} was refused undecoded ({row.reason[:200]}): it is not a message"
                " that can be sent again; its body is kept base64-encoded in the row"
                " (`crm-events rejected --json`)"
            )
        if is_deleted_payload(row.payload):
            raise CommandError(
                f"{ledger_id} cannot be replayed: its payload was deleted on"
                f" {row.payload.get('on')} after {row.payload.get('days')} days"
                " (retention, CRM_RETAIN_REJECTED_DAYS / CRM_RETAIN_FAILED_DAYS)"
            )
        try:
            payload = whole_payload(session, rt.settings, row.payload)
        except LookupError as exc:
            raise CommandError(f"{ledger_id} cannot be replayed: {exc}") from exc
        previous = row.replayed_at
        row.replayed_at = utcnow()
        task_name = row.task_name
        queue = row.queue if isinstance(row, FailedMessage) else None
    task_id = str(uuid.uuid4())
    call_args, call_kwargs = replay_arguments(rt.app, task_name, payload)
    # Our tasks go to their contract queue; any other back to the queue it was delivered from
    # (as a Queue: a name alone must be one of this app's queues).
    destination: Any = TASK_QUEUES.get(task_name)
    if destination is None and queue:
        destination = named_queue(queue)
    try:
        rt.app.send_task(
            task_name,
            args=call_args,
            kwargs=call_kwargs,
            task_id=task_id,
            queue=destination,
        )
    except Exception:
        with transaction(rt.sessions) as session:
            row = locked(session)
            if row is not None:
                row.replayed_at = previous
        raise
    return task_id


def is_refused_body(payload: Any) -> bool:
    """A row the worker's consumer wrote for a message it refused undecoded
    (workers/transport/consumer.py)."""
    return isinstance(payload, dict) and {"body_b64", "body_sha256"} <= payload.keys()


def replay_arguments(app: Any, task_name: str, payload: Any) -> tuple[list[Any], dict[str, Any]]:
    """The call that recorded ``payload`` (see ``workers.base.payload_of``)."""
    import inspect

    task = app.tasks.get(task_name)
    takes_one = task is None or len(inspect.signature(task.run).parameters) == 1
    if isinstance(payload, dict) and not takes_one:
        return [], payload
    return [payload], {}


def register(sub: Any, add: AddCommand) -> None:
    p = add(
        "publish", cmd_publish, "publish messages from JSON files or .eml files", json_flag=True
    )
    p.add_argument("kind", choices=sorted(INGEST_TASKS))
    p.add_argument("files", nargs="+")
    p.add_argument(
        "--wait", type=seconds, metavar="SECONDS", help="wait until every message is processed"
    )

    add("rejected", cmd_rejected, "messages rejected as bad input, with reasons", json_flag=True)
    p = add("failed", cmd_failed, "messages whose processing failed", json_flag=True)
    p.add_argument("--kind", choices=FAILURE_KINDS, help="only failures of this kind")
    p = add(
        "replay",
        cmd_replay,
        "publish a rejected or failed message again, as a new task",
        json_flag=True,
    )
    p.add_argument("id", metavar="ID", nargs="?", help="rejected:N or failed:N")
    p.add_argument(
        "--all", action="store_true", help="every failed message not replayed yet (not rejected)"
    )
    p.add_argument("--kind", choices=FAILURE_KINDS, help="with --all: only failures of this kind")
