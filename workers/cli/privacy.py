"""Personal data: ``erase contact|customer|number|address``, ``erase release``,
``export person``."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from workers.cli.common import (
    AddCommand,
    CommandError,
    InputError,
    Runtime,
    count,
    emit_json,
)


def cmd_erase(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import transaction
    from tasks.attach import remove_files
    from tasks.erasure import ErasureError, erase, find_person

    if args.subject == "release":
        return release(args, rt)
    values = [args.number, args.name] if args.subject == "contact" else [args.value]
    by = args.by or getpass.getuser()
    try:
        with transaction(rt.sessions) as session:
            person = find_person(session, rt.settings, args.subject, values)
            report = erase(session, rt.settings, person, by=by, dry_run=args.dry_run)
            if args.dry_run:
                session.rollback()
    except ErasureError as exc:
        raise InputError(str(exc)) from exc
    if not args.dry_run:
        remove_files(report.files)
    if args.json:
        emit_json(report.as_json())
        return 0
    from workers.render import table

    title = (
        f"would erase ({', '.join(report.data_kinds)}): nothing is changed (--dry-run)"
        if args.dry_run
        else f"erasure #{report.erasure_id} ({', '.join(report.data_kinds)}) by {by}"
    )
    table(title, ["table or store", "rows"], [[k, n] for k, n in sorted(report.counts.items())])
    if report.documents:
        table(
            "documents deleted" if not args.dry_run else "documents that would be deleted",
            ["document", "event", "role"],
            [[d["document"], d["event"], d["role"]] for d in report.documents],
        )
    return 0


def cmd_export_person(args: argparse.Namespace, rt: Runtime) -> int:
    from pathlib import Path

    from tasks.access_request import export_person
    from tasks.erasure import ErasureError, find_person

    if args.contact:
        subject, values = "contact", list(args.contact)
    elif args.number:
        subject, values = "number", [args.number]
    else:
        subject, values = "address", [args.address]
    try:
        with rt.sessions() as session:
            person = find_person(session, rt.settings, subject, values)
            export = export_person(session, rt.settings, person, Path(args.out))
    except ErasureError as exc:
        raise InputError(str(exc)) from exc
    except FileExistsError as exc:
        raise InputError(f"{exc}: give a new or empty folder") from exc
    except OSError as exc:  # a name too long, no permission, a file where a folder should be
        raise InputError(f"{args.out}: cannot be written: {exc.strerror or exc}") from exc
    if args.json:
        emit_json(export.as_json())
        return 0
    print(
        f"{args.out}: {export.events} event(s), {export.messages} message(s),"
        f" {export.documents} document(s); README.txt says what each file is"
    )
    return 0


def release(args: argparse.Namespace, rt: Runtime) -> int:
    from sqlalchemy import delete

    from models.db import transaction
    from models.privacy import ErasedIdentifier, Erasure

    with transaction(rt.sessions) as session:
        if session.get(Erasure, args.erasure) is None:
            raise CommandError(f"no erasure #{args.erasure}")
        released = session.execute(
            delete(ErasedIdentifier).where(ErasedIdentifier.erasure_id == args.erasure)
        ).rowcount  # type: ignore[attr-defined]
    if args.json:
        emit_json({"erasure": args.erasure, "released": released})
    else:
        print(f"erasure #{args.erasure}: messages naming the person are accepted again")
    return 0


def register(sub: Any, add: AddCommand) -> None:
    """Add the commands to the ``crm-events`` parser (called by ``workers.cli.build_parser``)."""
    erase = sub.add_parser(
        "erase",
        help="erase a person's personal data (GDPR article 17); --dry-run lists what would go",
        description="Erase a person's name, email addresses and phone numbers from every table, "
        "payload, document and view; delete their documents; keep their events, counted, "
        "pseudonymised (erased contact #N). The erasure is recorded without personal data, and "
        "later messages naming the person are refused until `erase release`.",
    )
    subjects = erase.add_subparsers(dest="subject", required=True)
    forms = {
        "contact": "a contact of a customer: CUSTOMER_NUMBER NAME",
        "customer": "a customer (a sole trader) and all of its contacts: CUSTOMER_NUMBER",
        "number": "a phone number, in any form: PHONE",
        "address": "an email address: EMAIL",
    }
    for subject, text in forms.items():
        p = subjects.add_parser(subject, help=text, description=text)
        p.set_defaults(handler=cmd_erase)
        if subject == "contact":
            p.add_argument("number", metavar="CUSTOMER_NUMBER")
            p.add_argument("name", metavar="NAME")
        else:
            p.add_argument("value", metavar=subject.upper() if subject != "number" else "PHONE")
        p.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
        p.add_argument("--by", help="who erases (recorded; default: the operating system's user)")
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p = subjects.add_parser(
        "release",
        help="accept messages naming the person of an erasure again (they are added back)",
        description="Forget the hashes of erasure #N's identifiers: a later message naming the "
        "person is accepted again, as when they become a customer's contact once more.",
    )
    p.set_defaults(handler=cmd_erase)
    p.add_argument("erasure", type=count, metavar="N")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    export = sub.add_parser(
        "export",
        help="a subject access request (GDPR article 15): everything held about a person",
    ).add_subparsers(dest="export_command", required=True)
    p = export.add_parser(
        "person",
        help="write everything held about a person to a folder: JSON and their documents",
        description="Their contact records, the events that name them, the messages that name "
        "them and the documents of those events, as JSON files and the documents' bytes in "
        "one folder, with a README.txt saying what each file is.",
    )
    p.set_defaults(handler=cmd_export_person)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--contact", nargs=2, metavar=("CUSTOMER_NUMBER", "NAME"))
    who.add_argument("--number", metavar="PHONE")
    who.add_argument("--address", metavar="EMAIL")
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    del add
