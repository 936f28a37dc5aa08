"""``crm-events import cdr FILE.csv``: publish an Asterisk Master.csv as ``crm.call/1`` updates.

Each CDR row becomes one ``crm.call/1`` update (the legs of one call, sharing a ``linkedid``,
merge into one event), sent in ``crm.batch/1`` batches to ``crm.ingest.batch``. Rows that are not
call records are reported with their line number and not published; the others are, and the
worker validates them as it validates every message (a row it cannot take is rejected there,
with the reason, rather than validated twice).
Importing the same file again changes nothing: every row is then a duplicate.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.settings import known_zone
from workers.cli.bulk import DEFAULT_BATCH_SIZE, batch_size
from workers.cli.common import InputError, emit_json, seconds, source_system, subcommands

if TYPE_CHECKING:
    from tasks.telephony.adapters import CdrContext


def cdr_messages(
    text: str, context: CdrContext, source: str
) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """(source label, message) for every usable row, and an error row for every other one."""
    errors: list[dict[str, Any]] = []
    return list(read_cdr_messages(text, context, source, errors)), errors


def read_cdr_messages(
    text: str, context: CdrContext, source: str, errors: list[dict[str, Any]]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source label, message) for each usable row as it is read; an error row for every other
    one is added to ``errors``."""
    from tasks.telephony.adapters import AdapterError, cdr_to_call, read_cdr_csv

    for row in read_cdr_csv(text):
        label = f"{source}:{row.line}"
        if row.fields is None:
            errors.append({"source": label, "line": row.line, "error": row.error})
            continue
        try:
            message = cdr_to_call(row.fields, context)
        except AdapterError as exc:
            errors.append({"source": label, "line": row.line, "error": exc.reason})
            continue
        yield label, message


def cmd_import_cdr(args: argparse.Namespace, runtime: Any) -> int:
    from tasks.telephony.adapters import CdrContext
    from workers.cli.bulk import Item, print_report, run_stream, status_of

    path = Path(args.file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from exc
    if args.time_zone:
        try:
            known_zone(args.time_zone)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
    settings = runtime.settings
    context = CdrContext(
        source_system=args.source_system,
        own_numbers=settings.own_numbers,
        phone_region=settings.phone_region,
        time_zone=args.time_zone,
    )
    # Asterisk writes caller names as the bytes it got; an undecodable one must not stop a file.
    text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
    errors: list[dict[str, Any]] = []
    items = (
        Item(label, "call", message, message["call_id"])
        for label, message in read_cdr_messages(text, context, path.name, errors)
    )
    report = run_stream(
        runtime,
        "call",
        items,
        errors,
        source_system=args.source_system,
        size=args.batch_size,
        wait=args.wait,
        total=text.count("\n") + 1,
    )
    if args.json:
        emit_json({"published": report.rows("call_id"), "errors": errors})
        return status_of(report)
    return print_report(report, "CDR row(s)")


def register(sub: Any, add: Any) -> None:
    """Add ``import cdr`` to the ``crm-events`` parser."""
    imports = subcommands(sub, "import", "import data from files")
    p = imports.add_parser(
        "cdr",
        help="publish the call records of an Asterisk Master.csv as call updates",
        description="Each row becomes one crm.call/1 update; rows that are not call records "
        "are reported with their line number. See docs/telephony.md.",
    )
    p.set_defaults(handler=cmd_import_cdr)
    p.add_argument("file", metavar="FILE.csv")
    p.add_argument(
        "--source-system",
        type=source_system,
        default="asterisk",
        help="the PBX's name as source (default: asterisk)",
    )
    p.add_argument(
        "--time-zone",
        metavar="ZONE",
        help="zone of the file's times (UTC for usegmtime=yes); default: read in CRM_TIME_ZONE "
        "and noted on the events",
    )
    p.add_argument(
        "--wait", type=seconds, metavar="SECONDS", help="wait until every row is processed"
    )
    p.add_argument(
        "--batch-size",
        type=batch_size,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"rows per crm.batch/1 message (default {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
