"""The ``crm-events`` command line (DESIGN §10, a contract).

Every listing takes ``--json`` and then prints exactly one JSON document on stdout; logs and
progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any, NoReturn

from celery.exceptions import SecurityError
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from config.logging import configure_logging
from config.settings import ConfigError, Settings, load_settings
from models.db import create_db_engine, create_session_factory, transaction
from tasks.errors import BadInput
from workers.queues import INGEST_TASKS, QUEUES

Handler = Callable[[argparse.Namespace, "Runtime"], int]


class CommandError(Exception):
    """The command could not do its work (a thing named that does not exist, a refusal, a
    failure): one line on stderr, exit status 1."""


class InputError(CommandError):
    """The command line or a file it reads is wrong (malformed, contradictory, missing):
    one line on stderr, exit status 2, as for bad configuration."""


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line on stderr (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def count(text: str) -> int:
    """A whole number from 0 (a limit, a target)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def period(text: str) -> str:
    """An ISO week (2026-W48) or a month (2026-11)."""
    from tasks.periods import validate_period

    try:
        validate_period(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a period {text!r} ({exc})") from None
    return text


class Runtime:
    """Lazily built engine, sessions and Celery app for one command invocation."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._app: Any = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_db_engine(self.settings)
        return self._engine

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            self._sessions = create_session_factory(self.engine)
        return self._sessions

    @property
    def app(self) -> Any:
        if self._app is None:
            from workers.app import create_app

            self._app = create_app(self.settings)
        return self._app


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2, default=str) + "\n")


# -- commands ---------------------------------------------------------------------------------


def cmd_init_db(args: argparse.Namespace, rt: Runtime) -> int:
    from models.migrate import install_default_catalogue, upgrade

    upgrade(rt.engine)
    with transaction(rt.sessions) as session:
        added = install_default_catalogue(session)
    if args.json:
        emit_json(
            {
                "database": rt.engine.url.render_as_string(hide_password=True),
                "catalogue_added": added,
            }
        )
    else:
        print(f"schema at head; catalogue rows added: {len(added)}", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace, rt: Runtime) -> int:
    argv = ["worker", *args.celery_args]
    if not any(
        a in ("-Q", "--queues") or a.startswith(("-Q", "--queues=")) for a in args.celery_args
    ):
        argv += ["-Q", ",".join(QUEUES)]
    if not any(a.startswith(("-l", "--loglevel")) for a in args.celery_args):
        argv += ["--loglevel", rt.settings.log_level]
    if rt.settings.embedded_broker:
        # The filesystem transport has no broadcast for gossip/mingle; heartbeats need events.
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    run_celery(rt.app.worker_main, argv)
    return 0


def run_celery(command: Callable[[list[str]], Any], argv: list[str]) -> None:
    """Run a Celery command line (worker, beat): its option errors are input errors."""
    import click

    try:
        command(argv)
    except click.exceptions.UsageError as exc:
        raise InputError(exc.format_message()) from exc


def cmd_beat(args: argparse.Namespace, rt: Runtime) -> int:
    rt.settings.data_dir.mkdir(parents=True, exist_ok=True)
    argv = ["beat", "--pidfile", "", *args.celery_args]
    if not any(a.startswith(("-l", "--loglevel")) for a in args.celery_args):
        argv += ["--loglevel", rt.settings.log_level]
    run_celery(rt.app.start, argv)
    return 0


LOOPBACK_ADDRESSES = ("127.0.0.1", "::1", "localhost")


def cmd_flower(args: argparse.Namespace, rt: Runtime) -> int:
    """Flower shows every task's arguments (customer data) and can shut workers down: it runs
    behind basic auth (CRM_FLOWER_BASIC_AUTH), or, with ``--no-auth``, on loopback only."""
    celery_args = list(args.celery_args)
    if any(a.startswith(("--basic-auth", "--basic_auth")) for a in celery_args):
        raise InputError(
            "give the Flower credentials in CRM_FLOWER_BASIC_AUTH, not on the command line"
            " (where the process list shows them)"
        )
    argv = ["flower", *celery_args]
    if rt.settings.flower_basic_auth:
        if args.no_auth:
            raise InputError("--no-auth contradicts CRM_FLOWER_BASIC_AUTH; drop one of them")
        # In-process: the password never becomes part of a process's command line.
        argv.append(f"--basic-auth={rt.settings.flower_basic_auth}")
    elif args.no_auth:
        addresses = [
            a.split("=", 1)[1] if "=" in a else celery_args[i + 1]
            for i, a in enumerate(celery_args)
            if a.startswith("--address") and ("=" in a or i + 1 < len(celery_args))
        ]
        if any(address not in LOOPBACK_ADDRESSES for address in addresses):
            raise InputError("--no-auth serves Flower on loopback only (127.0.0.1 or ::1)")
        if not addresses:
            argv.append("--address=127.0.0.1")
    else:
        raise InputError(
            "Flower needs credentials: set CRM_FLOWER_BASIC_AUTH=user:password, or pass"
            " --no-auth to serve it without them on 127.0.0.1 only (docs/security.md)"
        )
    run_celery(rt.app.start, argv)
    return 0


def cmd_publish(args: argparse.Namespace, rt: Runtime) -> int:
    from workers.publish import PublishError, publish_files, wait_for

    try:
        published = publish_files(rt.app, rt.settings, args.kind, [Path(p) for p in args.files])
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


def cmd_demo(args: argparse.Namespace, rt: Runtime) -> int:
    from workers.demo import run_demo

    return run_demo(
        rt, examples=Path(args.examples) if args.examples else None, timeout=args.timeout
    )


def _events_query(args: argparse.Namespace, zone: Any) -> Any:
    from models.events import CrmEvent, EventPropertyLink
    from models.parties import Customer, Staff

    query = select(CrmEvent)
    if args.customer:
        query = query.join(Customer, Customer.id == CrmEvent.customer_id).where(
            Customer.customer_number == args.customer
        )
    if args.seller:
        query = query.join(Staff, Staff.id == CrmEvent.seller_id).where(
            Staff.username == args.seller
        )
    for attribute, column in (
        ("class_", CrmEvent.class_code),
        ("type", CrmEvent.type_code),
        ("category", CrmEvent.category_code),
        ("source", CrmEvent.source_system),
    ):
        value = getattr(args, attribute)
        if value:
            query = query.where(column == value)
    if args.property:
        query = query.where(
            CrmEvent.id.in_(
                select(EventPropertyLink.event_id).where(
                    EventPropertyLink.property_code == args.property
                )
            )
        )
    if args.since:
        query = query.where(CrmEvent.occurred_at >= _day_start(args.since, zone))
    if args.until:
        query = query.where(CrmEvent.occurred_at < _day_start(args.until, zone, next_day=True))
    if args.text:
        # ILIKE on the columns: served by the pg_trgm GIN indexes on PostgreSQL.
        escaped = args.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        query = query.where(
            CrmEvent.subject.ilike(pattern, escape="\\") | CrmEvent.body.ilike(pattern, escape="\\")
        )
    if args.unlinked:
        query = query.where(CrmEvent.link_state.in_(("unlinked", "ambiguous")))
    if args.thread:
        query = query.where(CrmEvent.thread_key == args.thread)
    return query.order_by(CrmEvent.occurred_at.desc(), CrmEvent.id.desc()).limit(args.limit)


def _day_start(text: str, zone: Any, next_day: bool = False) -> Any:
    from datetime import datetime, time, timedelta

    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise InputError(f"not a date (YYYY-MM-DD): {text!r}") from exc
    if next_day:
        day += timedelta(days=1)
    return datetime.combine(day, time.min, tzinfo=zone)


def cmd_events(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.views import events_json

    with rt.sessions() as session:
        events = events_json(
            session, list(session.scalars(_events_query(args, rt.settings.zone))), rt.settings.zone
        )
    if args.json:
        emit_json(events)
    else:
        from workers.render import events_table

        events_table(f"{len(events)} event(s)", events)
    return 0


def cmd_history(args: argparse.Namespace, rt: Runtime) -> int:
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
    from workers.render import console, table

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
        facts = [f"staff: {', '.join(e['staff']) or '–'}"]
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
    from tasks.views import seller_cards, staff_by_username

    with rt.sessions() as session:
        staff = staff_by_username(session, args.username)
        if staff is None:
            raise CommandError(f"no staff member {args.username!r}")
        cards = seller_cards(session, staff, cards=rt.settings.seller_cards)
    if args.json:
        emit_json(cards)
    else:
        from workers.render import seller_view

        seller_view(staff.username, staff.name, cards)
    return 0


def cmd_targets_set(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.targets import set_target

    kind, value = ("weekly", args.weekly) if args.weekly is not None else ("monthly", args.monthly)
    valid_from = args.valid_from or date.today()
    with transaction(rt.sessions) as session:
        sellers = set_target(session, args.username, args.category, kind, value, valid_from)
    from workers.base import request_refresh

    for seller_id in sellers:
        request_refresh(rt.app, rt.sessions, seller_id)
    print(
        f"{args.username}: {args.category} {kind} target {value} from {valid_from}", file=sys.stderr
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


def cmd_report(args: argparse.Namespace, rt: Runtime) -> int:
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
        reports = [build_target_report(session, m, args.kind, args.period) for m in managers]
    written: list[str] = []
    for manager, report in zip(managers, reports, strict=True):
        if args.out:
            written += [str(p) for p in write_report_files(report, Path(args.out))]
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


def cmd_rejected(args: argparse.Namespace, rt: Runtime) -> int:
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
        from workers.render import table

        table(
            f"{len(rows)} rejected message(s)",
            ["id", "task", "when", "reason"],
            [[r["id"], r["task"], r["rejected_at"][:19], r["reason"][:100]] for r in rows],
        )
    return 0


FAILURE_KINDS = ("transient", "bug", "timeout", "poison")


def cmd_failed(args: argparse.Namespace, rt: Runtime) -> int:
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
        from workers.render import table

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
                    r["exception"][:100],
                ]
                for r in rows
            ],
        )
    return 0


def cmd_replay(args: argparse.Namespace, rt: Runtime) -> int:
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
    replayed = []
    for ledger_id in ids:
        task_id = replay_one(rt, ledger_id, only_pending=args.all)
        if task_id is not None:
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
    import uuid

    from kombu import Queue

    from models.base import utcnow
    from models.ledger import FailedMessage, RejectedMessage
    from tasks.ledger import whole_payload
    from workers.queues import TASK_QUEUES

    kind, _, number = ledger_id.partition(":")
    if kind not in ("rejected", "failed") or not number.isdigit():
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
        destination = Queue(queue, routing_key=queue)
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


def cmd_catalogue(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.catalogue import apply_catalogue, catalogue_document

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
        document = json.loads(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{args.file}: {exc}") from exc
    try:
        with transaction(rt.sessions) as session:
            changes = apply_catalogue(session, document)
            if args.dry_run:
                session.rollback()
    except BadInput as exc:  # the file's content is what is wrong
        raise InputError(f"{args.file}: {exc.reason}") from exc
    if args.json:
        emit_json({"dry_run": args.dry_run, "changes": changes})
    else:
        for change in changes or ["no changes"]:
            print(change)
    return 0


def cmd_reconcile(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.maintenance import reconcile, snapshot

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


def cmd_smtp_gateway(args: argparse.Namespace, rt: Runtime) -> int:
    from workers.smtp_gateway import run

    return run(rt.settings, rt.app, rt.sessions, args)


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="crm-events", description="CRM events worker and tools")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, handler: Handler, help_text: str, *, json_flag: bool = False
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        return p

    add(
        "init-db",
        cmd_init_db,
        "create or upgrade the schema and install the default catalogue",
        json_flag=True,
    )
    for name, handler, text in (
        ("worker", cmd_worker, "run a worker (all queues unless -Q narrows)"),
        ("beat", cmd_beat, "run the scheduler"),
        (
            "flower",
            cmd_flower,
            "run the monitoring UI behind basic auth (CRM_FLOWER_BASIC_AUTH)",
        ),
    ):
        p = add(name, handler, text + "; further options go to Celery")
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="serve Flower without credentials, on 127.0.0.1 only",
    )

    p = add(
        "publish", cmd_publish, "publish messages from JSON files or .eml files", json_flag=True
    )
    p.add_argument("kind", choices=sorted(INGEST_TASKS))
    p.add_argument("files", nargs="+")
    p.add_argument(
        "--wait", type=float, metavar="SECONDS", help="wait until every message is processed"
    )

    p = add("demo", cmd_demo, "the embedded end-to-end run on the bundled examples")
    p.add_argument("--examples", help="folder of example messages (default: the bundled examples)")
    p.add_argument("--timeout", type=float, default=120.0)

    p = add("events", cmd_events, "search events", json_flag=True)
    for flag in (
        "--customer",
        "--seller",
        "--type",
        "--category",
        "--property",
        "--source",
        "--since",
        "--until",
        "--text",
        "--thread",
    ):
        p.add_argument(flag)
    p.add_argument("--class", dest="class_")
    p.add_argument("--unlinked", action="store_true", help="only unlinked and ambiguous events")
    p.add_argument("--limit", type=count, default=1000)

    p = add("history", cmd_history, "a customer's history", json_flag=True)
    p.add_argument("customer", metavar="CUSTOMER_NUMBER")

    p = add("seller-view", cmd_seller_view, "the seller's cards", json_flag=True)
    p.add_argument("username")

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
    p = targets.add_parser("progress", help="targets vs actuals")
    p.set_defaults(handler=cmd_targets_progress)
    p.add_argument("--seller")
    p.add_argument("--period", type=period)
    p.add_argument("--json", action="store_true")

    p = add("stats", cmd_stats, "statistics", json_flag=True)
    p.add_argument(
        "--by", required=True, choices=["class", "type", "category", "property", "seller"]
    )
    p.add_argument("--period", type=period)

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

    p = add("catalogue", cmd_catalogue, "the classification settings", json_flag=True)
    p.add_argument("action", choices=["show", "export", "apply"])
    p.add_argument("file", nargs="?")
    p.add_argument("--dry-run", action="store_true")

    add(
        "reconcile",
        cmd_reconcile,
        "recompute every tally from the events and report drift",
        json_flag=True,
    )
    p = add(
        "delete-event",
        cmd_delete_event,
        "delete an event; its counts move off the seller's tallies and cards",
        json_flag=True,
    )
    p.add_argument("id", type=int, metavar="EVENT_ID")

    p = add("smtp-gateway", cmd_smtp_gateway, "receive mail for the CRM addresses and enqueue it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8025)
    p.add_argument("--lmtp", action="store_true", help="speak LMTP (RFC 2033) instead of SMTP")

    # Master data: import parties, triage, link (workers/cli_parties.py).
    from workers.cli_parties import register as register_party_commands

    register_party_commands(sub, add)
    # Telephony: `http-gateway` and `import cdr` (workers/http_gateway.py, workers/cdr_import.py);
    # after the master-data commands, whose `import` group it joins.
    from workers.cdr_import import register as register_telephony_commands

    register_telephony_commands(sub, add)
    return parser


#: Commands whose unknown options are Celery's (``crm-events worker -Q crm.refresh -c 4``).
PASSTHROUGH_COMMANDS = ("worker", "beat", "flower")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in PASSTHROUGH_COMMANDS:
        args.celery_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(settings)
    runtime = Runtime(settings)
    try:
        return int(args.handler(args, runtime) or 0)
    except InputError as exc:
        print(f"crm-events: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"crm-events: {exc}", file=sys.stderr)
        return 1
    except BadInput as exc:
        print(f"crm-events: {exc.reason}", file=sys.stderr)
        return 1
    except SecurityError as exc:
        # A key, certificate or trusted store of CRM_SIGNING_* that cannot be used.
        print(f"crm-events: message signing: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A failure of the system (a server gone, a bug): one line for the user, and where it
        # happened for whoever runs it again with CRM_LOG_LEVEL=DEBUG.
        logging.getLogger("crm.cli").debug("%s failed", args.command, exc_info=True)
        print(
            f"crm-events: {args.command} failed: {type(exc).__name__}: {exc}"[:2000].splitlines()[0]
            + " (CRM_LOG_LEVEL=DEBUG shows where)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
