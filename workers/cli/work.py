"""Work tasks on events: ``task add``, ``task done``, ``task undone``, ``task list``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from workers.cli.common import AddCommand, Runtime, count, emit_json, iso_date


def cmd_task_add(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import transaction
    from tasks.work import add_task
    from workers.cli.targets import cli_user

    with transaction(rt.sessions) as session:
        task = add_task(
            session,
            args.event,
            args.title,
            assignee=args.assignee,
            due=args.due,
            created_by=cli_user(),
            settings=rt.settings,
        )
        shown = f"task {task.id} on event {args.event}" + (f", due {args.due}" if args.due else "")
    print(shown, file=sys.stderr)
    return 0


def _set(args: argparse.Namespace, rt: Runtime, done: bool) -> int:
    from models.db import transaction
    from tasks.work import set_done
    from workers.cli.targets import cli_user

    with transaction(rt.sessions) as session:
        task = set_done(session, args.task, done, cli_user())
        print(f"task {task.id}: {task.state}", file=sys.stderr)
    return 0


def cmd_task_done(args: argparse.Namespace, rt: Runtime) -> int:
    return _set(args, rt, True)


def cmd_task_undone(args: argparse.Namespace, rt: Runtime) -> int:
    return _set(args, rt, False)


def cmd_task_list(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.work import task_rows

    with rt.sessions() as session:
        rows = task_rows(session, assignee=args.assignee, state=args.state)
    if args.json:
        emit_json(rows)
        return 0
    from workers.render import tasks_table

    tasks_table(f"Tehtävät / tasks ({args.state})", rows)
    return 0


def register(sub: Any, add: AddCommand) -> None:
    tasks = sub.add_parser("task", help="work tasks on events").add_subparsers(
        dest="task_command", required=True
    )
    p = tasks.add_parser(
        "add",
        help="add a work task to an event",
        description="add a work task to an event (send the offer, call back): for the event's "
        "seller unless --assignee names another, by --due",
    )
    p.set_defaults(handler=cmd_task_add)
    p.add_argument("event", type=count, metavar="EVENT", help="the event's id")
    p.add_argument("--title", required=True, help="what is to be done")
    p.add_argument(
        "--assignee",
        metavar="STAFF",
        help="who is to do it: username, email address or extension (default: the seller)",
    )
    p.add_argument("--due", type=iso_date, metavar="DATE", help="the day it is due (2026-12-10)")
    for name, handler, text in (
        ("done", cmd_task_done, "mark a task done (close it by hand)"),
        ("undone", cmd_task_undone, "open a task marked done again"),
    ):
        p = tasks.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler)
        p.add_argument("task", type=count, metavar="TASK", help="the task's id (task list)")
    p = tasks.add_parser(
        "list",
        help="work tasks, overdue first",
        description="work tasks with their event, overdue first, then by due date",
    )
    p.set_defaults(handler=cmd_task_list)
    p.add_argument("--assignee", metavar="USERNAME", help="one staff member's tasks")
    p.add_argument("--state", choices=["open", "done", "all"], default="open", help="default: open")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
