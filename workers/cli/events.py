"""Reading and keeping the events: ``events``, ``history``, ``seller-view``, ``stats``,
``catalogue``, ``reconcile``, ``retention``, ``delete-event``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from workers.cli.common import (
    AddCommand,
    CommandError,
    InputError,
    Runtime,
    count,
    emit_json,
    iso_date,
    period,
)


def cmd_events(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.search import events_query, filters_from, resolve_filters
    from tasks.views import events_json

    with rt.sessions() as session:
        filters = resolve_filters(session, filters_from(vars(args)))
        query = events_query(filters, rt.settings.zone).limit(args.limit)
        events = events_json(session, list(session.scalars(query)), rt.settings.zone)
    if args.json:
        emit_json(events)
    else:
        from workers.render import events_table

        events_table(f"{len(events)} event(s)", events)
    return 0


def cmd_history(args: argparse.Namespace, rt: Runtime) -> int:
    from sqlalchemy import select

    from models.parties import Customer
    from tasks.history import customer_history

    with rt.sessions() as session:
        customer = session.scalar(select(Customer).where(Customer.customer_number == args.customer))
        if customer is None:
            raise CommandError(f"no customer {args.customer}")
        history = customer_history(session, customer, rt.settings.zone)
    if args.json:
        emit_json(history)
        return 0
    from workers.render import console, status_words, table

    console.print(
        f"[bold]{history['customer_number']} {history['name']}[/bold]"
        f" · responsible seller {history['seller'] or '–'}"
    )
    table(
        "contacts",
        ["name", "addresses", "phones"],
        [[c["name"], ", ".join(c["emails"]), ", ".join(c["phones"])] for c in history["contacts"]],
    )
    table(
        "who on the staff has been in touch",
        ["staff", "name", "events", "last"],
        [[s["username"], s["name"], s["events"], s["last"][:10]] for s in history["staff"]],
    )
    # A timeline rather than a table: subjects, file names and thread keys are shown whole.
    from rich.text import Text

    console.print(Text(f"history (newest first): {len(history['events'])} event(s)", "bold"))
    for e in history["events"]:
        head = Text(e["occurred_at"][:16].replace("T", " ") + "  ", "bold")
        head.append(e["category"] + (" (cancelled)" if e["cancelled"] else "") + "  ")
        head.append(e["subject"] or "", "bold")
        console.print(head)
        facts = [status_words(e), f"staff: {', '.join(e['staff']) or '–'}"]
        if e["project_number"] or e["project_name"]:
            project = " ".join(p for p in (e["project_number"], e["project_name"]) if p)
            facts.append(f"project: {project}")
        if e["offer_number"] or e["offer_url"]:
            offer = " ".join(p for p in (e["offer_number"], e["offer_url"]) if p)
            facts.append(f"offer: {offer}")
        if e["contacts"]:
            facts.append(f"contacts: {', '.join(e['contacts'])}")
        files = [d["filename"] for d in e["documents"] if d["role"] != "raw_message"]
        if files:
            facts.append(f"documents: {', '.join(files)}")
        if e["follow_up"]:
            facts.append(f"follow-up: {e['follow_up']['state']}")
        if e["thread_key"]:
            facts.append(f"thread: {e['thread_key']}")
        console.print(Text("    " + " · ".join(facts)))
    return 0


def cmd_seller_view(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import snapshot
    from tasks.periods import view_moment
    from tasks.views import seller_cards, staff_by_username, zone_of

    with snapshot(rt.sessions) as session:
        staff = staff_by_username(session, args.username)
        if staff is None:
            raise CommandError(f"no staff member {args.username!r}")
        moment = view_moment(args.period, zone_of(staff))
        cards = seller_cards(session, staff, now=moment, cards=rt.settings.seller_cards)
        from tasks.work import seller_tasks

        due = seller_tasks(session, staff, moment.astimezone(zone_of(staff)).date())
    if args.json:
        emit_json(cards)
    else:
        from workers.render import seller_view, tasks_table

        seller_view(staff.username, staff.name, cards)
        if due:
            tasks_table("Tehtävät / tasks overdue or due within a week", due)
    return 0


def cmd_stats(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.stats import statistics

    with rt.sessions() as session:
        rows = statistics(session, args.by, args.period, rt.settings.zone)
    if args.json:
        emit_json(rows)
    else:
        from workers.render import table

        table(
            f"events by {args.by}" + (f" in {args.period}" if args.period else ""),
            [args.by, "name", "events"],
            [[r[args.by], r["name"], r["events"]] for r in rows],
        )
    return 0


def cmd_catalogue(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import transaction
    from models.jsondoc import read_json
    from tasks.catalogue import apply_catalogue, catalogue_document
    from tasks.errors import BadInput

    if args.action in ("show", "export"):
        with rt.sessions() as session:
            document = catalogue_document(session)
        if args.json or args.action == "export":
            emit_json(document)
        else:
            from workers.render import table

            table(
                "classes (laji)",
                ["code", "fi", "en"],
                [[c["code"], c["fi"], c["en"]] for c in document["classes"]],
            )
            table(
                "types (tyyppi)",
                ["code", "fi", "en"],
                [[c["code"], c["fi"], c["en"]] for c in document["types"]],
            )
            table(
                "properties (ominaisuus)",
                ["code", "fi", "en"],
                [[c["code"], c["fi"], c["en"]] for c in document["properties"]],
            )
            table(
                "categories (kategoria)",
                ["code", "fi", "en", "class", "type", "allow_selection", "sales_target"],
                [
                    [
                        c["code"],
                        c["fi"],
                        c["en"],
                        c["default_class"],
                        c["default_type"],
                        c["allow_selection"],
                        c["sales_target"],
                    ]
                    for c in document["categories"]
                ],
            )
        return 0
    if not args.file:
        raise InputError("catalogue apply needs a FILE")
    try:
        document = read_json(Path(args.file).read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{args.file}: {exc}") from exc
    try:
        with transaction(rt.sessions) as session:
            result = apply_catalogue(session, document, rt.settings.seller_cards)
            held_back = result.destructive and not args.force
            if args.dry_run or held_back:
                session.rollback()
    except BadInput as exc:  # the file's content is what is wrong
        raise InputError(f"{args.file}: {exc.reason}") from exc
    applied = not (args.dry_run or held_back)
    if args.json:
        emit_json(
            {
                "dry_run": args.dry_run,
                "applied": applied and bool(result.changes),
                "destructive": result.destructive,
                "changes": result.changes,
                "impacts": result.impacts,
            }
        )
    else:
        for change in result.changes or ["no changes"]:
            print(change)
        for impact in result.impacts:
            print(f"  impact: {impact}")
    if held_back and not args.dry_run:
        raise InputError(
            f"{args.file}: not applied: the change takes something away (see the impact above); "
            "give --force to apply it"
        )
    return 0


def cmd_retention(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import transaction
    from tasks.attach import remove_files
    from tasks.retention import apply_retention

    with transaction(rt.sessions) as session:
        report = apply_retention(session, rt.settings, dry_run=args.dry_run)
    remove_files(report.files)
    if args.json:
        emit_json(report.as_json())
        return 0
    from workers.render import table

    table(
        report.summary,
        ["kind", "kept for", "deleted" if not args.dry_run else "would go", "bytes freed"],
        [
            [
                k.kind,
                f"{k.days} days" if k.days is not None else "ever",
                k.deleted if k.days is not None else "",
                k.bytes_freed if k.days is not None else "",
            ]
            for k in report.kinds
        ],
    )
    return 0


def cmd_reconcile(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import snapshot
    from tasks.maintenance import reconcile

    with snapshot(rt.sessions) as session:
        run = reconcile(session)
        result = {
            "run": run.id,
            "keys_checked": run.keys_checked,
            "drift": run.drift,
            "details": run.details,
        }
    if args.json:
        emit_json(result)
        return 0
    print(f"checked {run.keys_checked} tally keys; drift {run.drift}")
    if run.details:
        from workers.render import table

        table(
            "drift found and repaired (stored → recomputed from the events)",
            ["seller", "category", "period", "stored", "expected"],
            [
                [d["seller"], d["category"], d["period"], d["stored"], d["expected"]]
                for d in run.details
            ],
        )
    return 0


def cmd_delete_event(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import transaction
    from tasks.maintenance import delete_event
    from workers.base import request_refresh

    with transaction(rt.sessions) as session:
        summary, sellers = delete_event(session, args.id)
    for seller_id in sellers:
        request_refresh(rt.app, rt.sessions, seller_id)
    if args.json:
        emit_json({"deleted": summary})
    else:
        print(
            f"deleted event {summary['id']} ({summary['source_kind']} {summary['source_id']},"
            f" {summary['category']}, {summary['occurred_at'][:16]})",
            file=sys.stderr,
        )
    return 0


def register(sub: Any, add: AddCommand) -> None:
    p = add("events", cmd_events, "search events", json_flag=True)
    by_name = "its code, or its Finnish or English name"
    for flag, metavar, text in (
        ("--customer", "NUMBER", "the customer's number in the ERP (10001)"),
        ("--seller", "USERNAME", "the seller the events count for (anna)"),
        ("--class", "CLASS", f"the class (laji): {by_name} (sales, Myynti)"),
        ("--type", "TYPE", f"the type (tyyppi): {by_name}"),
        ("--category", "CATEGORY", f"the category (kategoria): {by_name}"),
        ("--property", "PROPERTY", f"a property (ominaisuus): {by_name}"),
        ("--source", "SYSTEM", "the system that sent them: pbx-hki, field-app, an email gateway"),
        ("--source-kind", "KIND", "the kind of event: call, email, visit or meeting"),
        ("--text", "WORDS", "words in the subject or text"),
        ("--thread", "KEY", "an email thread's key (thread_key in --json)"),
        ("--project", "NUMBER", "the ERP's project number the events belong to"),
        ("--offer", "NUMBER", "the offer number the events concern"),
        ("--state", "STATE", "the CRM status (tila): open, scheduled, done or cancelled"),
    ):
        p.add_argument(
            flag,
            metavar=metavar,
            help=text,
            dest=flag[2:].replace("-", "_") + ("_" if flag == "--class" else ""),
        )
    p.add_argument("--since", type=iso_date, metavar="DATE", help="from this day (YYYY-MM-DD)")
    p.add_argument("--until", type=iso_date, metavar="DATE", help="to this day, inclusive")
    p.add_argument("--unlinked", action="store_true", help="only unlinked and ambiguous events")
    p.add_argument(
        "--limit", type=count, default=1000, metavar="N", help="at most N events (default 1000)"
    )

    p = add("history", cmd_history, "a customer's history", json_flag=True)
    p.add_argument("customer", metavar="CUSTOMER_NUMBER")

    p = add("seller-view", cmd_seller_view, "the seller's cards", json_flag=True)
    p.add_argument("username", help="the seller's username")
    p.add_argument(
        "--period",
        type=period,
        help="the cards as they stood at the end of a past week (2026-W48) or month (2026-11); "
        "default: now",
    )

    p = add("stats", cmd_stats, "statistics", json_flag=True)
    p.add_argument(
        "--by", required=True, choices=["class", "type", "category", "property", "seller"]
    )
    p.add_argument("--period", type=period)

    p = add("catalogue", cmd_catalogue, "the classification settings", json_flag=True)
    actions = p.add_subparsers(dest="action", required=True, metavar="{show,export,apply}")
    json_help = "print one JSON document on stdout"
    show = actions.add_parser(
        "show",
        help="the classes, types, properties and categories, as tables",
        description="The classification settings in force: classes (laji), types (tyyppi), "
        "properties (ominaisuus) and categories (kategoria) with their defaults.",
    )
    # SUPPRESS: a --json given before the action (catalogue --json show) is not reset here.
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)
    actions.add_parser(
        "export",
        help="the settings as one JSON document, the form apply reads",
        description="The classification settings as one JSON document on stdout: edit it and "
        "give it to catalogue apply.",
    )
    apply = actions.add_parser(
        "apply",
        help="make the settings those of a JSON file (see catalogue export)",
        description="Make the classification settings those of FILE (the form catalogue "
        "export prints) and list each change; with --dry-run, list them and change nothing.",
    )
    apply.add_argument("file", nargs="?", metavar="FILE", help="the settings, as JSON")
    apply.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would change and its impact (targets that stop counting, events that "
        "keep their class or type, cards that change), change nothing",
    )
    apply.add_argument(
        "--force",
        action="store_true",
        help="apply a change that takes something away (targets that stop counting, existing "
        "events left with a class or type new events no longer get)",
    )
    apply.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)

    add(
        "reconcile",
        cmd_reconcile,
        "recompute every tally from the events and report drift",
        json_flag=True,
    )
    p = add(
        "retention",
        cmd_retention,
        "delete now what is older than its retention setting (CRM_RETAIN_*_DAYS)",
        json_flag=True,
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be deleted, delete nothing"
    )
    p = add(
        "delete-event",
        cmd_delete_event,
        "delete an event; its counts move off the seller's tallies and cards",
        json_flag=True,
    )
    p.add_argument("id", type=count, metavar="EVENT_ID")
