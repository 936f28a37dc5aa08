"""Batch stage: many messages of one kind in one transaction, each with its own outcome.

The new calls of a call batch and the new emails of an email batch are stored set-based first
(``tasks.ingest.call_batch``, ``tasks.ingest.email_batch``): a few statements for the whole
batch instead of a dozen or more per message, with the same events, follow-ups, documents,
counts and per-message outcomes as below; so are, on PostgreSQL, the next updates of linked
calls stored before. What that stage leaves (an email stored before, a call update it cannot
merge, a recording, a possible lead, an invitation, a message that does not validate) runs
message by message as follows. If a concurrent writer changed what it read, its savepoint is
rolled back and it runs once more; if that happens again, or it meets a bug, every message of
the batch runs message by message. A call batch first takes the lock of every call it names
(``tasks.store.lock_calls``).

A backfill (a year of CDRs, a JSON Lines export) or a burst from a producer arrives as
``crm.batch/1`` messages. Each message of a batch runs through its kind's own stage, in a
savepoint of the batch's one transaction, and gets its own delivery row under its own id
(``<batch task id>/<index>``): stored, duplicate, outdated, rejected (with a
``rejected_message`` row, replayable alone) or failed (a bug, with a ``failed_message`` row).
A bad or broken message rolls back its savepoint only; the others commit together, and the
broker message is acknowledged only after that commit. A transient error (the database gone)
rolls the whole batch back, to be retried as one: no message of it was counted, and the
ledger makes those that were committed before a crash duplicates when it runs again.
"""

from __future__ import annotations

import logging
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from config.queues import CALL_TASK, EMAIL_TASK, PARTY_TASK, TARGET_TASK, VISIT_TASK
from models.db import is_postgresql
from models.ledger import FailedMessage, RejectedMessage
from models.schemas.batch import item_id, load_batch_message
from tasks.context import StageContext
from tasks.errors import TRANSIENT_ERRORS, BadInput
from tasks.ingest.call import CallStageResult, ingest_call
from tasks.ingest.call_batch import ingest_new_calls
from tasks.ingest.email import ingest_email
from tasks.ingest.email_batch import ingest_new_emails
from tasks.ingest.party import ingest_party
from tasks.ingest.visit import ingest_visit
from tasks.ledger import json_safe, kept_payload
from tasks.match import forget_internal_numbers
from tasks.store import (
    DEFERRED_TALLIES,
    BatchRaced,
    BulkResult,
    StageResult,
    TallyKey,
    apply_tally_deltas,
    lock_calls,
    record_deliveries,
    record_delivery,
)
from tasks.targets import ingest_target

log = logging.getLogger(__name__)

Stage = Callable[[Session, StageContext, Any], StageResult]

#: kind -> (the task name its messages have on their own, the stage).
STAGES: dict[str, tuple[str, Stage]] = {
    "call": (CALL_TASK, ingest_call),
    "email": (EMAIL_TASK, ingest_email),
    "visit": (VISIT_TASK, ingest_visit),
    "party": (PARTY_TASK, ingest_party),
    "target": (TARGET_TASK, ingest_target),
}

#: (session, context, the messages with their indexes, called before writing when it leaves any)
BulkStage = Callable[[Session, StageContext, list[tuple[int, Any]], Callable[[], None]], BulkResult]

#: kind -> its set-based stage for the messages it can take (the rest go message by message).
BULK_STAGES: dict[str, BulkStage] = {"call": ingest_new_calls, "email": ingest_new_emails}


@dataclass
class BatchResult(StageResult):
    """The batch's outcome, its messages' counts, and what to do after its commit."""

    outcomes: Counter[str] = field(default_factory=Counter)
    recordings_to_fetch: list[dict[str, Any]] = field(default_factory=list)


def ingest_batch(
    session: Session,
    ctx: StageContext,
    payload: Any,
    *,
    queue_of: Callable[[str], str | None],
    fatal: tuple[type[BaseException], ...] = (),
) -> BatchResult:
    """Run every message of a ``crm.batch/1`` through its stage; see the module's docstring.

    ``queue_of(task_name)`` names the queue a failed message is replayed to; ``fatal``
    exceptions (the worker's time limit) end the whole batch, like a transient error.
    """
    batch = load_batch_message(payload)
    return run_batch(
        session,
        ctx,
        batch["kind"],
        batch["messages"],
        lambda index: item_id(ctx.task_id, index),
        queue_of=queue_of,
        fatal=fatal,
    )


def run_batch(
    session: Session,
    ctx: StageContext,
    kind: str,
    messages: list[Any],
    id_of: Callable[[int], str],
    *,
    queue_of: Callable[[str], str | None],
    fatal: tuple[type[BaseException], ...] = (),
) -> BatchResult:
    """Run ``messages`` of one kind as a batch, the message at index i known as ``id_of(i)``
    (its delivery row, its rejection): a ``crm.batch/1``'s, or call messages that a call task
    took from its queue (``workers.transport.drain``)."""
    task_name, stage = STAGES[kind]
    result = BatchResult("done")
    # Counts move once, at the end, in key order: the tally rows of a busy seller are then
    # held for the commit only, not for the whole batch while other batches wait on them.
    deltas: list[tuple[TallyKey, int]] = []
    session.info[DEFERRED_TALLIES] = deltas
    if kind == "call":  # every call of the batch first, before its savepoints (tasks.store)
        lock_calls(session, _calls_named(messages))
    try:
        pending = list(enumerate(messages))
        if (bulk := BULK_STAGES.get(kind)) is not None:
            pending = _run_bulk(session, ctx, bulk, pending, task_name, result, fatal, id_of)
        if pending:
            # Taken again if the set-based stage took it: rolling its savepoint back let it go.
            _one_batch_at_a_time(session)
        for index, message in pending:
            message_id = id_of(index)
            item = StageContext(ctx.settings, message_id, task_name)
            before = deltas[:]
            outcome = _run_one(session, item, stage, message, result, queue_of(task_name), fatal)
            if outcome in ("rejected", "failed"):
                deltas[:] = before  # its moves were rolled back with its savepoint
            result.outcomes[outcome] += 1
    finally:
        session.info.pop(DEFERRED_TALLIES, None)
    apply_tally_deltas(session, deltas)
    result.detail = f"{kind} batch of {len(messages)}: " + ", ".join(
        f"{outcome} {count}" for outcome, count in sorted(result.outcomes.items())
    )
    return result


def _calls_named(messages: list[Any]) -> set[tuple[str, str]]:
    """The (source system, call id) of each message that names one; the rest are rejected."""
    return {
        (message["source_system"], message["call_id"])
        for message in messages
        if isinstance(message, dict)
        and isinstance(message.get("source_system"), str)
        and isinstance(message.get("call_id"), str)
    }


def _run_bulk(
    session: Session,
    ctx: StageContext,
    bulk: BulkStage,
    pending: list[tuple[int, Any]],
    task_name: str,
    result: BatchResult,
    fatal: tuple[type[BaseException], ...],
    id_of: Callable[[int], str],
) -> list[tuple[int, Any]]:
    """Run the set-based stage in a savepoint; the messages it left, or all when it gave up.

    A concurrent writer it met (``BatchRaced``: a party change, a re-link or a recording
    rewriting a stored call's event; writers of the same calls wait on their locks first) has
    committed by then (the lock or insert that met it waited for that), so the stage runs once
    more and reads what it wrote. Raced again, or stopped by what the batch itself holds, it
    gives up.
    """
    for attempt in (1, 2):
        try:
            with session.begin_nested():
                taken = bulk(session, ctx, pending, lambda: _one_batch_at_a_time(session))
                record_deliveries(
                    session,
                    (
                        (id_of(i), task_name, done.outcome, done.event_id, done.detail)
                        for i, done in sorted(taken.results.items())
                    ),
                )
            break
        except (*TRANSIENT_ERRORS, *fatal):
            raise  # the whole batch again, later
        except BatchRaced as exc:
            _forget(session)
            if attempt == 1 and exc.again:
                log.info("batch %s runs its set-based stage again: %s", ctx.task_id, exc)
                continue
            log.info("batch %s goes message by message: %s", ctx.task_id, exc)
            return pending
        except Exception as exc:
            _forget(session)
            log.error(
                "batch %s: the set-based stage failed, message by message instead: %r",
                ctx.task_id,
                exc,
                exc_info=exc,
            )
            return pending
    deferred = session.info[DEFERRED_TALLIES]
    deferred.extend(taken.deltas)
    for done in taken.results.values():
        result.outcomes[done.outcome] += 1
        result.sellers_to_refresh |= done.sellers_to_refresh
    left = set(taken.left)
    return [(index, message) for index, message in pending if index in left]


def _run_one(
    session: Session,
    ctx: StageContext,
    stage: Stage,
    message: Any,
    result: BatchResult,
    queue: str | None,
    fatal: tuple[type[BaseException], ...],
) -> str:
    try:
        with session.begin_nested():
            outcome = stage(session, ctx, message)
            record_delivery(
                session,
                task_id=ctx.task_id,
                task_name=ctx.task_name,
                outcome=outcome.outcome,
                event_id=outcome.event_id,
                detail=outcome.detail,
            )
    except (*TRANSIENT_ERRORS, *fatal):
        raise  # the whole batch again, later
    except BadInput as exc:
        _forget(session)
        session.add(
            RejectedMessage(
                task_name=ctx.task_name,
                task_id=ctx.task_id,
                reason=json_safe(exc.reason),
                errors=json_safe(exc.errors),
                payload=kept_payload(session, ctx.settings, exc.kept(message)),
            )
        )
        record_delivery(
            session,
            task_id=ctx.task_id,
            task_name=ctx.task_name,
            outcome="rejected",
            detail=json_safe(exc.reason),
        )
        return "rejected"
    except Exception as exc:
        # A bug met by this message alone: its savepoint is rolled back, the others go on.
        _forget(session)
        log.error("%s %s failed in its batch: %r", ctx.task_name, ctx.task_id, exc, exc_info=exc)
        exception = f"{type(exc).__name__}: {exc}"
        session.add(
            FailedMessage(
                task_name=ctx.task_name,
                task_id=ctx.task_id,
                kind="bug",
                exception=json_safe(exception[:5000]),
                traceback=json_safe("".join(traceback.format_exception(exc))[-20000:]),
                attempts=1,
                payload=kept_payload(session, ctx.settings, message),
                queue=queue,
            )
        )
        record_delivery(
            session,
            task_id=ctx.task_id,
            task_name=ctx.task_name,
            outcome="failed",
            detail=json_safe(f"bug: {exception}"[:2000]),
        )
        return "failed"
    result.sellers_to_refresh |= outcome.sellers_to_refresh
    if isinstance(outcome, CallStageResult):
        result.recordings_to_fetch += outcome.recordings_to_fetch
    return outcome.outcome


#: Namespace of the advisory lock that lets one batch at a time write (``"BAT"``).
BATCH_LOCK_NAMESPACE = 0x424154


def _one_batch_at_a_time(session: Session) -> None:
    """Wait until no other batch is going message by message, and hold that until this commits.

    Each message of a batch takes the locks its stage takes (a customer's follow-ups, the party
    keys of an unlinked event) and holds them until the batch commits. Two batches taking them in
    their messages' order would wait on each other, deadlock, and run again and again; one at a
    time they cannot, and a single message waiting on a batch waits for one batch only. It is
    taken before any of those locks: before the set-based stage writes when it leaves messages,
    else before the first message goes alone.

    Batches that the set-based stage takes whole do not take it: that stage takes its locks
    class by class (ledger and event keys in the batch's order, party keys, customers, then
    tallies, each sorted), so two of them wait on each other at most, and a backfill's batches
    write side by side, one per pool process. SQLite runs one writing transaction at a time
    anyway.
    """
    if is_postgresql(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:ns, 0)"), {"ns": BATCH_LOCK_NAMESPACE})


def _forget(session: Session) -> None:
    """What the session remembered during a message that was rolled back may not hold."""
    forget_internal_numbers(session)
