"""The processes: ``init-db``, ``worker``, ``beat``, ``flower``, ``demo``, ``smtp-gateway``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from config.queues import QUEUES
from workers.cli.common import (
    AddCommand,
    InputError,
    Runtime,
    emit_json,
    port,
    run_celery,
)


def cmd_init_db(args: argparse.Namespace, rt: Runtime) -> int:
    from models.migrate import init_database

    added = init_database(rt.engine, rt.sessions)
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


def require_current_schema(rt: Runtime) -> None:
    """Refuse to start on a schema this release does not know (an upgrade without init-db);
    a database that does not answer yet is the worker's to wait for, as at any other time."""
    from sqlalchemy.exc import OperationalError

    from models.migrate import schema_behind

    try:
        behind = schema_behind(rt.engine)
    except OperationalError:
        return
    if behind:
        raise InputError(f"{behind}: run crm-events init-db first (docs/operations.md, Upgrading)")


#: Celery's options that name queues: to consume (``-Q``) and to leave out (``-X``).
QUEUE_OPTIONS = {"-Q": "-Q", "--queues": "-Q", "-X": "-X", "--exclude-queues": "-X"}


def named_queues(celery_args: list[str]) -> list[tuple[str, str]]:
    """(option, queue) for each queue that ``-Q``/``--queues``/``-X``/``--exclude-queues`` names,
    in each of Celery's spellings (``-Q a,b``, ``-Qa,b``, ``--queues=a,b``)."""
    named: list[tuple[str, str]] = []
    for position, arg in enumerate(celery_args):
        name, equals, value = arg.partition("=")
        if name in QUEUE_OPTIONS and equals:
            option = QUEUE_OPTIONS[name]
        elif arg in QUEUE_OPTIONS:
            option, value = QUEUE_OPTIONS[arg], "".join(celery_args[position + 1 : position + 2])
        elif arg[:2] in ("-Q", "-X") and not arg.startswith("--"):
            option, value = arg[:2], arg[2:]
        else:
            continue
        if not value.strip(" ,"):
            raise InputError(f"{option} names no queue; the queues are {', '.join(QUEUES)}")
        # As Celery splits them: at each comma, spaces kept (" crm.refresh" is another name).
        named += [(option, queue) for queue in value.split(",")]
    return named


def check_queues(celery_args: list[str]) -> None:
    """Every queue -Q and -X name is one of ours, and some queue is left to consume."""
    named = named_queues(celery_args)
    for option, queue in named:
        if queue not in QUEUES:
            raise InputError(
                f"{option}: no queue {queue[:80]!r}; the queues are {', '.join(QUEUES)}"
            )
    consumed = {queue for option, queue in named if option == "-Q"} or set(QUEUES)
    if not consumed - {queue for option, queue in named if option == "-X"}:
        raise InputError("-X leaves no queue to consume")


def cmd_worker(args: argparse.Namespace, rt: Runtime) -> int:
    check_queues(args.celery_args)
    require_current_schema(rt)
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
    if rt.settings.effective_broker_url.startswith("redis://"):
        # Flower knows kombu's own transports only (its Broker page, /api/queues/length); it
        # consumes nothing, so the worker's Redis transport (workers/transport) is not needed.
        rt.app.conf.broker_transport = None
    run_celery(rt.app.start, argv)
    return 0


def cmd_demo(args: argparse.Namespace, rt: Runtime) -> int:
    from workers.demo import run_demo

    if args.examples and not (Path(args.examples) / "parties.json").is_file():
        raise InputError(f"{args.examples}: not a folder of example messages (no parties.json)")
    return run_demo(
        rt,
        examples=Path(args.examples) if args.examples else None,
        timeout=args.timeout,
        serve=not args.no_serve,
    )


def cmd_smtp_gateway(args: argparse.Namespace, rt: Runtime) -> int:
    from workers.gateways.smtp import run

    return run(rt.settings, rt.app, rt.sessions, args)


class _CeleryHelp(argparse.Action):
    """``-h``/``--help`` of a command that passes its further options to Celery: this command's
    help, then Celery's own options for it (they are as much this command's)."""

    def __init__(self, option_strings: list[str], dest: str, celery_command: str) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="show this help and Celery's options for this command, then exit",
        )
        self.celery_command = celery_command

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from config.settings import ConfigError, load_settings
        from workers.app import create_app

        parser.print_help()
        print(
            f"\nCelery's options, given after {self.celery_command} and passed on to Celery:\n",
            flush=True,
        )
        try:
            app = create_app(load_settings())
        except ConfigError as exc:
            parser.exit(2, f"{exc}\n")
        with contextlib.suppress(SystemExit):
            app.start([self.celery_command, "--help"])
        parser.exit()


def register(sub: Any, add: AddCommand) -> None:
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
        p = add(name, handler, text + "; further options go to Celery", add_help=False)
        p.add_argument("-h", "--help", action=_CeleryHelp, celery_command=name)
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="serve Flower without credentials, on 127.0.0.1 only",
    )

    p = add("demo", cmd_demo, "the embedded end-to-end run on the bundled examples")
    p.add_argument("--examples", help="folder of example messages (default: the bundled examples)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument(
        "--no-serve",
        action="store_true",
        help="end after the run (in a terminal, the demo otherwise serves the screens)",
    )

    p = add("smtp-gateway", cmd_smtp_gateway, "receive mail for the CRM addresses and enqueue it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port, default=8025)
    p.add_argument("--lmtp", action="store_true", help="speak LMTP (RFC 2033) instead of SMTP")
