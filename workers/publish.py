"""Publishing messages from files (``crm-events publish``) and waiting for their outcomes."""

from __future__ import annotations

import base64
import email
import email.parser
import email.policy
import email.utils
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from celery import Celery
from sqlalchemy import String, any_, bindparam, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker

from config.queues import BATCH_TASK, INGEST_TASKS, TASK_QUEUES
from config.settings import Settings
from models.db import chunked, is_postgresql
from models.jsondoc import read_json
from models.ledger import Delivery
from models.schemas.batch import SCHEMA as BATCH_SCHEMA
from models.schemas.batch import item_id


class PublishError(Exception):
    """A file could not be turned into messages (not JSON, unreadable, …)."""


@dataclass
class Published:
    task_id: str
    task_name: str
    source: str


def messages_from_file(kind: str, path: Path, settings: Settings) -> list[Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PublishError(f"{path}: {exc.strerror or exc}") from exc
    if kind == "email" and path.suffix.lower() == ".eml":
        return [email_message_from_raw(data, settings)]
    try:
        loaded = read_json(data)
    except ValueError as exc:
        raise PublishError(f"{path}: {exc}") from exc
    return loaded if isinstance(loaded, list) else [loaded]


def email_message_from_raw(
    raw: bytes, settings: Settings, source_system: str = "cli"
) -> dict[str, Any]:
    """Wrap a raw .eml as ``crm.email/1``; the envelope recipient is the CRM address it names,
    else the first configured CRM address (the message was BCC'd to us)."""
    # Headers only: the worker parses the body (a hostile MIME tree must not stop the command).
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    addresses = [
        a.lower()
        for _, a in email.utils.getaddresses(parsed.get_all("To", []) + parsed.get_all("Cc", []))
    ]
    crm = [a for a in addresses if _is_crm(a, settings)]
    senders = email.utils.getaddresses(parsed.get_all("From", []))
    return {
        "schema": "crm.email/1",
        "source_system": source_system,
        "raw_b64": base64.b64encode(raw).decode("ascii"),
        "mail_from": senders[0][1] if senders else None,
        "rcpt_to": crm or list(settings.crm_addresses[:1]),
    }


def _is_crm(address: str, settings: Settings) -> bool:
    local, _, domain = address.partition("@")
    return f"{local.partition('+')[0]}@{domain}" in settings.crm_addresses


def publish(app: Celery, task_name: str, message: Any, source: str) -> Published:
    task_id = str(uuid.uuid4())
    app.send_task(task_name, args=[message], task_id=task_id, queue=TASK_QUEUES[task_name])
    return Published(task_id, task_name, source)


def publish_files(app: Celery, settings: Settings, kind: str, paths: list[Path]) -> list[Published]:
    """Every message of every file, each file read before any is published: a file that
    cannot be read stops the command with nothing sent, not after the files before it."""
    task_name = INGEST_TASKS[kind]
    read = [(path, messages_from_file(kind, path, settings)) for path in paths]
    return [
        publish(app, task_name, message, f"{path.name}#{index + 1}")
        for path, messages in read
        for index, message in enumerate(messages)
    ]


class Outcome(NamedTuple):
    """A message's delivery row, as read by :func:`wait_for` (plain values, no ORM object)."""

    task_id: str
    task_name: str
    outcome: str
    event_id: int | None
    detail: str
    finished_at: datetime


class ItemOutcome(NamedTuple):
    """What an import reports of each message of its batches: the columns it shows."""

    task_id: str
    outcome: str
    event_id: int | None
    detail: str


RowT = TypeVar("RowT", Outcome, ItemOutcome)


def _outcome_statements(row_type: type[tuple[Any, ...]]) -> tuple[Any, Any]:
    """The delivery rows' columns of ``row_type`` by task id: with an IN list, and with one
    array parameter (PostgreSQL). Core columns, read as plain rows: the outcomes of a backfill's
    100,000 messages were as many ORM objects, loaded while the workers had nothing left to do."""
    table = Delivery.__table__
    columns = [table.c[name] for name in row_type._fields]  # type: ignore[attr-defined]
    task_id = table.c.task_id
    return (
        select(*columns).where(task_id.in_(bindparam("ids", expanding=True))),
        select(*columns).where(task_id == any_(bindparam("ids", type_=ARRAY(String)))),
    )


_STATEMENTS = {row_type: _outcome_statements(row_type) for row_type in (Outcome, ItemOutcome)}


def wait_for(
    sessions: sessionmaker[Session],
    task_ids: list[str],
    timeout: float,
    row_type: type[RowT] = Outcome,  # type: ignore[assignment]
) -> dict[str, RowT]:
    """Poll the delivery records until every task id has an outcome or ``timeout`` passes;
    each read as ``row_type`` (an import reads fewer columns than ``Outcome``: the time a
    message finished cost two fifths of reading 100,000 outcomes)."""
    deadline = time.monotonic() + timeout
    done: dict[str, RowT] = {}
    pending = set(task_ids)
    by_list, by_array = _STATEMENTS[row_type]
    while True:
        ordered = sorted(pending)
        with sessions() as session:
            if is_postgresql(session):
                # One array parameter: the same short statement whatever the number of ids,
                # where an IN list of 500 placeholders was built and parsed again at each poll.
                chunks: list[Sequence[str]] = [ordered]
                statement = by_array
            else:
                chunks = list(chunked(ordered))
                statement = by_list
            for chunk in chunks:
                for row in session.execute(statement, {"ids": chunk}):
                    done[row[0]] = row_type(*row)
        pending -= set(done)
        if not pending or time.monotonic() >= deadline:
            return done
        time.sleep(0.1)


@dataclass
class PublishedBatch:
    """One ``crm.batch/1`` message: its task id, and the id each message in it is known by."""

    task_id: str
    item_ids: list[str]


def publish_batches(
    app: Celery,
    kind: str,
    messages: list[Any],
    *,
    source_system: str,
    size: int,
    on_published: Any = None,
) -> list[PublishedBatch]:
    """Publish ``messages`` of one kind as ``crm.batch/1`` messages of at most ``size`` each."""
    batches = []
    for start in range(0, len(messages), size):
        chunk = messages[start : start + size]
        task_id = str(uuid.uuid4())
        app.send_task(
            BATCH_TASK,
            args=[
                {
                    "schema": BATCH_SCHEMA,
                    "source_system": source_system,
                    "kind": kind,
                    "messages": chunk,
                }
            ],
            task_id=task_id,
            queue=TASK_QUEUES[BATCH_TASK],
        )
        batches.append(PublishedBatch(task_id, [item_id(task_id, i) for i in range(len(chunk))]))
        if on_published is not None:
            on_published(len(chunk))
    return batches


def wait_for_batches(
    sessions: sessionmaker[Session],
    batches: list[PublishedBatch],
    timeout: float,
    on_done: Any = None,
) -> dict[str, ItemOutcome]:
    """Wait until every batch has run (or ``timeout`` passes); the outcome of each message of
    the batches that ran, by its id.

    A batch's messages are read as soon as it has run (its row and theirs commit together),
    while the others still run, rather than all of them after the last one.
    """
    deadline = time.monotonic() + timeout
    outcomes: dict[str, ItemOutcome] = {}
    pending = {b.task_id: b for b in batches}
    while pending:
        ran = [
            pending.pop(task_id) for task_id in wait_for(sessions, sorted(pending), 0, ItemOutcome)
        ]
        if ran:
            items = [i for b in ran for i in b.item_ids]
            outcomes.update(wait_for(sessions, items, 0, ItemOutcome))
        if on_done is not None:
            for batch in ran:
                on_done(len(batch.item_ids))
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    return outcomes
