"""``crm-events import cdr FILE.csv``: publish an Asterisk Master.csv as ``crm.call/1`` updates.

Each CDR row becomes one update of ``crm.ingest.call`` (the legs of one call, sharing a
``linkedid``, merge into one event). Rows that cannot be a call update are reported with their
line number and not published; the others are. Importing the same file again changes nothing:
every row is then a duplicate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from models.schemas.call import SCHEMA, CallMessageSchema
from models.schemas.common import MessageInvalid, load_message
from tasks.telephony.adapters import AdapterError, CdrContext, asterisk_cdr_to_call, read_cdr_csv
from workers.cli.common import InputError, emit_json

CALL_TASK = "crm.ingest.call"


def cdr_messages(
    text: str, context: CdrContext, source: str
) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """(source label, message) for every usable row, and an error row for every other one."""
    messages: list[tuple[str, dict[str, Any]]] = []
    errors: list[dict[str, Any]] = []
    for row in read_cdr_csv(text):
        label = f"{source}:{row.line}"
        if row.fields is None:
            errors.append({"source": label, "line": row.line, "error": row.error})
            continue
        try:
            message = asterisk_cdr_to_call(row.fields, context)
            load_message(CallMessageSchema(), message, SCHEMA)
        except AdapterError as exc:
            errors.append({"source": label, "line": row.line, "error": exc.reason})
            continue
        except MessageInvalid as exc:
            errors.append({"source": label, "line": row.line, "error": exc.reason})
            continue
        messages.append((label, message))
    return messages, errors


def cmd_import_cdr(args: argparse.Namespace, runtime: Any) -> int:
    from workers.publish import publish, wait_for

    path = Path(args.file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from exc
    if args.time_zone:
        try:
            ZoneInfo(args.time_zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise InputError(f"unknown time zone {args.time_zone!r}") from exc
    settings = runtime.settings
    context = CdrContext(
        source_system=args.source_system,
        own_numbers=settings.own_numbers,
        phone_region=settings.phone_region,
        time_zone=args.time_zone,
    )
    # Asterisk writes caller names as the bytes it got; an undecodable one must not stop a file.
    text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
    messages, errors = cdr_messages(text, context, path.name)
    rows: list[dict[str, Any]] = []
    for label, message in messages:
        published = publish(runtime.app, CALL_TASK, message, label)
        rows.append({"source": label, "call_id": message["call_id"], "task_id": published.task_id})
    status = 0
    if args.wait is not None and rows:
        done = wait_for(runtime.sessions, [r["task_id"] for r in rows], args.wait)
        for row in rows:
            delivery = done.get(row["task_id"])
            row["outcome"] = delivery.outcome if delivery else "pending"
            row["event_id"] = delivery.event_id if delivery else None
            row["detail"] = delivery.detail if delivery else ""
        missing = sum(1 for r in rows if r["outcome"] == "pending")
        if missing:
            print(
                f"timed out after {args.wait:g} s: {missing} row(s) not processed", file=sys.stderr
            )
            status = 3
    for error in errors:
        print(f"{error['source']}: not imported: {error['error']}", file=sys.stderr)
    if errors and status == 0:
        status = 1
    if args.json:
        emit_json({"published": rows, "errors": errors})
    else:
        from workers.render import table

        columns = ["source", "call_id", "task_id"] + (
            ["outcome", "event_id", "detail"] if args.wait is not None else []
        )
        table(
            f"{len(rows)} CDR row(s) published, {len(errors)} not imported",
            columns,
            [[r.get(c) for c in columns] for r in rows],
        )
    return status


def _subcommands(sub: Any, name: str, help_text: str) -> Any:
    """The sub-command group ``name`` (e.g. ``import``), created unless another part made it."""
    parser = sub.choices.get(name)
    if parser is None:
        return sub.add_parser(name, help=help_text).add_subparsers(
            dest=f"{name}_command", required=True
        )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError(f"crm-events {name} has no sub-commands")


def register(sub: Any, add: Any) -> None:
    """Add ``import cdr`` to the ``crm-events`` parser."""
    imports = _subcommands(sub, "import", "import data from files")
    p = imports.add_parser(
        "cdr",
        help="publish the call records of an Asterisk Master.csv as call updates",
        description="Each row becomes one crm.call/1 update; rows that are not call records "
        "are reported with their line number. See docs/telephony.md.",
    )
    p.set_defaults(handler=cmd_import_cdr)
    p.add_argument("file", metavar="FILE.csv")
    p.add_argument(
        "--source-system", default="asterisk", help="the PBX's name as source (default: asterisk)"
    )
    p.add_argument(
        "--time-zone",
        metavar="ZONE",
        help="zone of the file's times (UTC for usegmtime=yes); default: read in CRM_TIME_ZONE "
        "and noted on the events",
    )
    p.add_argument(
        "--wait", type=float, metavar="SECONDS", help="wait until every row is processed"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
