"""Sales targets and the managers' reports: ``targets set|list|progress``, ``report targets``."""

from __future__ import annotations

import argparse
import sys
from datetime import date
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


def cmd_targets_set(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import transaction
    from tasks.targets import set_target

    kind, value = ("weekly", args.weekly) if args.weekly is not None else ("monthly", args.monthly)
    valid_from = args.valid_from or date.today()
    with transaction(rt.sessions) as session:
        sellers = set_target(
            session, args.username, args.category, kind, value, valid_from, changed_by=cli_user()
        )
    from workers.base import request_refresh

    for seller_id in sellers:
        request_refresh(rt.app, rt.sessions, seller_id)
    print(
        f"{args.username}: {args.category} {kind} target {value} from {valid_from}", file=sys.stderr
    )
    return 0


def cli_user() -> str:
    """Who set a target from the command line: ``cli:<login name>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (a container's bare user id)
        return "cli"


def cmd_targets_changes(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.targets import target_changes

    with rt.sessions() as session:
        rows = target_changes(session, args.seller)
    if args.json:
        emit_json(rows)
    else:
        from workers.render import table

        table(
            "Tavoitemuutokset / target changes (oldest first)",
            ["seller", "category", "kind", "valid from", "was", "now", "by", "when"],
            [
                [
                    r["seller"],
                    r["category"],
                    r["kind"],
                    r["valid_from"],
                    "–" if r["old_value"] is None else r["old_value"],
                    r["new_value"],
                    r["changed_by"],
                    r["changed_at"][:16].replace("T", " "),
                ]
                for r in rows
            ],
        )
    return 0


def cmd_targets_list(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.targets import target_history

    with rt.sessions() as session:
        rows = target_history(session, args.seller)
    if args.json:
        emit_json(rows)
    else:
        from workers.render import table

        table(
            "Tavoitteet / targets (each applies until the next of its kind starts)",
            ["seller", "category", "kind", "target", "valid from", "valid until", "set by"],
            [
                [
                    r["seller"],
                    r["category"],
                    r["kind"],
                    r["value"],
                    r["valid_from"],
                    r["valid_until"] or "–",
                    r["source"],
                ]
                for r in rows
            ],
        )
    return 0


def cmd_targets_progress(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.views import targets_progress

    with rt.sessions() as session:
        rows = targets_progress(session, seller=args.seller, period=args.period)
    if args.json:
        emit_json(rows)
    else:
        from workers.render import progress

        progress(rows)
    return 0


def cmd_report(args: argparse.Namespace, rt: Runtime) -> int:
    from sqlalchemy import select

    from models.parties import Staff
    from tasks.periods import period_kind
    from tasks.reports import (
        REPORT_SEND_ERRORS,
        build_target_report,
        send_report_once,
        write_report_files,
    )

    if args.period and period_kind(args.period) != args.kind:
        raise InputError(f"{args.period} is not a {args.kind} period")
    with rt.sessions() as session:
        query = select(Staff).where(Staff.role == "manager").order_by(Staff.username)
        if args.manager:
            query = select(Staff).where(Staff.username == args.manager)
        managers = session.scalars(query).all()
        if not managers:
            raise CommandError(
                f"no manager {args.manager!r}" if args.manager else "no manager to report to"
            )
        if managers[0].role != "manager":
            known = session.scalars(
                select(Staff.username).where(Staff.role == "manager").order_by(Staff.username)
            ).all()
            raise CommandError(
                f"{args.manager} is a {managers[0].role}, not a manager; reports go to the "
                f"managers: {', '.join(known) or 'none'}"
            )
        reports = [build_target_report(session, m, args.kind, args.period) for m in managers]
    written: list[str] = []
    for manager, report in zip(managers, reports, strict=True):
        if args.out:
            try:
                written += [str(p) for p in write_report_files(report, Path(args.out))]
            except OSError as exc:  # a file where the folder should be, no permission, …
                raise InputError(f"{args.out}: not a folder the report can be written to: "
                                 f"{exc.strerror or exc}") from exc  # fmt: skip
        if args.send:
            if not report.manager_email:
                raise CommandError(f"manager {report.manager} has no email address")
            try:
                outcome = send_report_once(
                    rt.sessions, rt.settings, manager, args.kind, report.period
                )
            except REPORT_SEND_ERRORS as exc:
                raise CommandError(f"report to {report.manager} not sent: {exc}") from exc
            print(
                f"{report.manager} {args.kind} {report.period}: "
                + ("sent" if outcome == "sent" else "already sent, not sent again"),
                file=sys.stderr,
            )
    for path in written:
        print(path)
    if not args.out and not args.send:
        sys.stdout.write(reports[0].csv_text)
    return 0


def register(sub: Any, add: AddCommand) -> None:
    targets = sub.add_parser("targets", help="sales targets").add_subparsers(
        dest="targets_command", required=True
    )
    p = targets.add_parser("set", help="set a target")
    p.set_defaults(handler=cmd_targets_set)
    p.add_argument("username")
    p.add_argument("category")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--weekly", type=count)
    group.add_argument("--monthly", type=count)
    p.add_argument("--from", dest="valid_from", metavar="DATE", type=iso_date)
    p = targets.add_parser("list", help="every target with its validity (the history)")
    p.set_defaults(handler=cmd_targets_list)
    p.add_argument("--seller")
    p.add_argument("--json", action="store_true")
    p = targets.add_parser(
        "changes",
        help="every target set or changed: was, now, by whom, when",
        description="every target set or changed, oldest first: the value before (– for a new "
        "target) and after, who set it (cli:<user> or the sending system) and when; a target "
        "set again with the start date of an earlier one replaces its value, and shows here",
    )
    p.set_defaults(handler=cmd_targets_changes)
    p.add_argument("--seller", help="one seller's username")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = targets.add_parser("progress", help="targets vs actuals")
    p.set_defaults(handler=cmd_targets_progress)
    p.add_argument("--seller")
    p.add_argument("--period", type=period)
    p.add_argument("--json", action="store_true")

    report = sub.add_parser("report", help="reports").add_subparsers(
        dest="report_command", required=True
    )
    p = report.add_parser(
        "targets",
        help="build (and send) a target report",
        description="build a manager's target report: the period (default: the one just closed"
        " in the manager's zone) and the current one so far; --out writes HTML, PNG and CSV,"
        " --send mails it (at most once per manager, kind and period)",
    )
    p.set_defaults(handler=cmd_report)
    p.add_argument("--kind", required=True, choices=["weekly", "monthly"])
    p.add_argument("--period", type=period, help="2026-W48 (weekly) or 2026-11 (monthly)")
    p.add_argument("--manager", help="one manager's username (default: every manager)")
    p.add_argument("--out", metavar="DIR", help="write the HTML, PNG and CSV files here")
    p.add_argument("--send", action="store_true", help="send by email (SMTP from CRM_SMTP_*)")
