"""Master-data commands of ``crm-events``: ``import parties``, ``triage`` and ``link``.

Like every listing, each takes ``--json`` and then prints exactly one JSON document on stdout;
progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

from workers.cli.common import AddCommand, Runtime, count, emit_json, source_system


def cmd_import_parties(args: argparse.Namespace, rt: Runtime) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from models.db import transaction
    from tasks.context import StageContext
    from tasks.party_import import ImportFileError, apply_plan, read_party_file
    from workers.base import request_refresh

    path = Path(args.file)
    try:
        plan = read_party_file(path, args.source_system)
    except ImportFileError as exc:
        return refuse(f"{path}: {exc}; nothing imported")
    summary: dict[str, Any] = {
        "file": str(path),
        "format": plan.format,
        "rows": len(plan.rows) + len(plan.errors),
        "dry_run": args.dry_run,
        "errors": [e.as_json() for e in plan.errors],
        "imported": {},
        "relinked_events": [],
    }
    if plan.errors:
        # Nothing is imported from a file with a bad row: fix the rows and import it again.
        if args.json:
            emit_json(summary)
        for error in plan.errors:
            print(f"row {error.row}: {error.reason}", file=sys.stderr)
        print(
            f"{path}: {len(plan.errors)} bad row(s) of {summary['rows']}; nothing imported",
            file=sys.stderr,
        )
        return 1
    if args.dry_run:
        if args.json:
            emit_json(summary)
        print(f"{path}: {len(plan.rows)} row(s) valid; nothing imported (dry run)", file=sys.stderr)
        return 0
    ctx = StageContext(rt.settings, task_id=f"import-{uuid.uuid4()}", task_name="import parties")
    progress = Progress(
        TextColumn("importing {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with progress:
        bar = progress.add_task(path.name, total=len(plan.rows))
        # One transaction: every row or none (a database error rolls the whole file back).
        with transaction(rt.sessions) as session:
            result = apply_plan(session, ctx, plan, lambda: progress.advance(bar))
    for seller_id in sorted(result.sellers):
        request_refresh(rt.app, rt.sessions, seller_id)
    summary["imported"] = result.imported
    summary["relinked_events"] = result.relinked
    if args.json:
        emit_json(summary)
    counts = ", ".join(f"{n} {kind}" for kind, n in result.imported.items() if n)
    print(
        f"{path}: imported {counts or 'nothing'}; re-linked {len(result.relinked)} event(s)",
        file=sys.stderr,
    )
    return 0


def cmd_triage(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.triage import triage_rows

    with rt.sessions() as session:
        rows = triage_rows(session, rt.settings.zone, limit=args.limit)
    if args.json:
        emit_json(rows)
        return 0
    from workers.render import brief, table

    table(
        f"{len(rows)} event(s) to triage (unlinked or ambiguous), newest first",
        ["id", "when", "source", "state", "tried", "candidates", "seller", "why"],
        [
            [
                r["id"],
                r["occurred_at"][:16].replace("T", " "),
                f"{r['source_kind']} {r['source']}",
                r["link_state"] + (" · lead" if r["lead"] else ""),
                ", ".join(r["tried"]["numbers"] + r["tried"]["addresses"]),
                ", ".join(_candidate(c) for c in r["candidates"]),
                r["seller"],
                brief(r["match_note"]),
            ]
            for r in rows
        ],
    )
    print("link one by hand: crm-events link EVENT --customer N [--contact …]", file=sys.stderr)
    return 0


def _candidate(candidate: dict[str, Any]) -> str:
    if "contact_id" in candidate:
        return f"#{candidate['contact_id']} {candidate.get('name', '')}".strip()
    return f"customer id {candidate.get('customer_id')}"


def cmd_link(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import transaction
    from tasks.triage import LinkError, link_by_hand, with_match_facts
    from tasks.views import events_json
    from workers.base import request_refresh

    try:
        with transaction(rt.sessions) as session:
            linked = link_by_hand(session, rt.settings, args.event, args.customer, args.contact)
            row = with_match_facts(
                session, [linked.event], events_json(session, [linked.event], rt.settings.zone)
            )[0]
    except LinkError as exc:
        return refuse(str(exc))
    for seller_id in sorted(linked.sellers):
        request_refresh(rt.app, rt.sessions, seller_id)
    if args.json:
        emit_json(row)
    else:
        print(
            f"event {row['id']}: customer {row['customer_number']}"
            + (f", contact {row['contact']}" if row["contact"] else "")
            + f", seller {row['seller'] or '–'}, category {row['category']} (linked by hand)",
            file=sys.stderr,
        )
    return 0


def refuse(reason: str) -> int:
    """A user error, reported like ``workers.cli.CommandError``: stderr, exit status 1.

    (Raising that class from here would not reach ``main`` when the command line runs as
    ``python -m workers.cli``, where ``main``'s module is ``__main__``.)
    """
    print(f"crm-events: {reason}", file=sys.stderr)
    return 1


def register(sub: Any, add: AddCommand) -> None:
    """Add the commands to the ``crm-events`` parser (called by ``workers.cli.build_parser``)."""
    imports = sub.add_parser("import", help="import master data").add_subparsers(
        dest="import_command", required=True
    )
    p = imports.add_parser(
        "parties",
        help="import customers, contacts and staff from a CSV or JSON file",
        description="Validate every row first; a file with a bad row imports nothing. "
        "The CSV columns are listed in docs/master-data.md.",
    )
    p.set_defaults(handler=cmd_import_parties)
    p.add_argument("file", metavar="FILE", help="a .csv or .json file")
    p.add_argument(
        "--source-system",
        type=source_system,
        default="import",
        help="recorded as the rows' source (default: import)",
    )
    p.add_argument("--dry-run", action="store_true", help="only validate; import nothing")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    p = add(
        "triage",
        cmd_triage,
        "unlinked and ambiguous events, with what was tried",
        json_flag=True,
    )
    p.add_argument("--limit", type=count, default=1000)

    p = add("link", cmd_link, "link an event to a customer (and contact) by hand", json_flag=True)
    p.add_argument("event", metavar="EVENT", type=count, help="the event id")
    p.add_argument("--customer", required=True, metavar="N", help="the customer number")
    p.add_argument("--contact", help="the contact: id, email address or full name")
