"""An event's documents: ``document get`` copies one out of the document store."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from workers.cli.common import AddCommand, CommandError, InputError, Runtime, count


def cmd_document_get(args: argparse.Namespace, rt: Runtime) -> int:
    from sqlalchemy import select

    from models.documents import EventDocument
    from tasks.attach import blob_chunks

    with rt.sessions() as session:
        documents = session.scalars(
            select(EventDocument)
            .where(EventDocument.event_id == args.event)
            .order_by(EventDocument.id)
        ).all()
    if not documents:
        raise CommandError(f"event {args.event} has no documents (or there is no such event)")
    wanted = args.document
    found = [d for d in documents if str(d.id) == wanted] or [
        d for d in documents if d.filename == wanted
    ]
    if len(found) != 1:
        listed = ", ".join(f"{d.id} ({d.filename})" for d in documents)
        why = "names more than one" if found else "is none"
        raise CommandError(f"{wanted!r} {why} of event {args.event}'s documents: {listed}")
    document = found[0]
    if document.sha256 is None:
        raise CommandError(
            f"document {document.id} ({document.filename}) was not stored: {document.note}"
        )
    chunks = blob_chunks(rt.sessions, rt.settings, document.sha256, document.size)
    if args.out == "-":
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return 0
    # The stored name is already sanitised (no folders, no control characters).
    target = Path(args.out) if args.out else Path(document.filename)
    if target.is_dir():
        target = target / document.filename
    if target.exists() and not args.force:
        raise InputError(f"{target} exists: give --force to replace it, or another --out")
    if target.exists() and not target.is_file():
        # --force replaces a file; a device, a pipe or a socket is no file to replace.
        raise InputError(f"{target} is not a file: give a file or a folder")
    partial = target.with_name(f".{target.name}.part")
    try:
        try:
            handle = partial.open("wb")
        except OSError as exc:
            raise InputError(f"{target}: cannot be written: {exc.strerror or exc}") from exc
        with handle:
            written = 0
            for chunk in chunks:
                handle.write(chunk)
                written += len(chunk)
        if written != document.size:
            raise CommandError(
                f"document {document.id}: {written} bytes read, {document.size} expected; the "
                "document store is missing part of it"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    print(
        f"{target} ({document.media_type}, {document.size} bytes, {document.role})",
        file=sys.stderr,
    )
    return 0


def register(sub: Any, add: AddCommand) -> None:
    documents = sub.add_parser("document", help="an event's documents").add_subparsers(
        dest="document_command", required=True
    )
    p = documents.add_parser(
        "get",
        help="copy a document of an event out of the document store",
        description="copy a document of an event (a recording, an attachment, the raw email, a "
        "memo, a photo) out of the document store: by its id or its file name, as the event's "
        "JSON lists them (crm-events events --json, documents)",
    )
    p.set_defaults(handler=cmd_document_get)
    p.add_argument("event", type=count, metavar="EVENT", help="the event's id")
    p.add_argument("document", metavar="DOCUMENT", help="the document's id or file name")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="where to write it: a file, a folder, or - for standard output (default: its own "
        "name in the current folder)",
    )
    p.add_argument("--force", action="store_true", help="replace a file that exists")
