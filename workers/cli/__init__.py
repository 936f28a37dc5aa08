"""The ``crm-events`` command line (DESIGN §10, a contract).

Every listing takes ``--json`` and then prints exactly one JSON document on stdout; logs and
progress go to stderr. One module per group of commands; each adds its commands to the parser
with ``register(sub, add)``; the commands parse, call ``tasks/``, and print. A command module
imports the database layer, Celery and ``tasks/`` inside its commands, never at its top: building
the parser loads none of them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from config.logging import configure_logging
from config.settings import ConfigError, load_settings
from workers.cli import (
    bulk,
    documents,
    events,
    messages,
    parties,
    privacy,
    processes,
    service,
    targets,
    telephony,
    work,
)
from workers.cli.common import (
    CommandError,
    Handler,
    InputError,
    Parser,
    Runtime,
    emit_json,
)

__all__ = ["CommandError", "InputError", "Runtime", "build_parser", "emit_json", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="crm-events", description="CRM events worker and tools")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str,
        handler: Handler,
        help_text: str,
        *,
        json_flag: bool = False,
        add_help: bool = True,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=add_help)
        p.set_defaults(handler=handler)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        return p

    # The order of --help; telephony's `import cdr` joins the `import` group of parties.
    for group in (
        processes,
        service,
        messages,
        events,
        documents,
        work,
        targets,
        parties,
        privacy,
        telephony,
        bulk,
    ):
        group.register(sub, add)
    return parser


def _schema_behind(runtime: Runtime, exc: Exception) -> str | None:
    """For a database error: whether the schema is older than this release (an upgrade
    without init-db), the usual cause of a missing table or column."""
    if not type(exc).__module__.startswith("sqlalchemy"):
        return None
    try:
        from models.migrate import schema_behind

        return schema_behind(runtime.engine)
    except Exception:  # the database itself is the problem: the error says so already
        return None


#: Commands whose unknown options are Celery's (``crm-events worker -Q crm.refresh -c 4``).
PASSTHROUGH_COMMANDS = ("worker", "beat", "flower")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # --help ends here, before anything heavy loads
    # Imported once a command runs: the command line starts without the database layer, the
    # worker or Celery, so that --help and a mistyped command answer at once. Bad input is
    # models.invalid's (tasks.errors names it BadInput, beside the broker's errors, which a
    # listing need not load; nor need it load the message schemas).
    from models.invalid import MessageInvalid as BadInput

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
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _is_signing_error(exc):
            # A key, certificate or trusted store of CRM_SIGNING_* that cannot be used.
            print(f"crm-events: message signing: {exc}", file=sys.stderr)
            return 2
        behind = _schema_behind(runtime, exc)
        if behind:
            print(f"crm-events: {behind}: run crm-events init-db", file=sys.stderr)
            return 2
        # A failure of the system (a server gone, a bug): one line for the user, and where it
        # happened for whoever runs it again with CRM_LOG_LEVEL=DEBUG.
        logging.getLogger("crm.cli").debug("%s failed", args.command, exc_info=True)
        print(
            f"crm-events: {args.command} failed: {type(exc).__name__}: {exc}"[:2000].splitlines()[0]
            + " (CRM_LOG_LEVEL=DEBUG shows where)",
            file=sys.stderr,
        )
        return 1


def _is_signing_error(exc: BaseException) -> bool:
    """Celery's SecurityError, without loading Celery for the commands that never use it (a
    command that signs messages has loaded it)."""
    celery_exceptions = sys.modules.get("celery.exceptions")
    return celery_exceptions is not None and isinstance(exc, celery_exceptions.SecurityError)
