"""The base task: one session per execution, the error taxonomy, after-commit follow-ups.

Stage functions never commit; this class opens the transaction, commits or rolls back, records
the delivery's outcome in the same transaction, and only then enqueues follow-up work. It also
bounds what a message can do to its worker: a redelivered message is counted and parked as
``poison`` past ``CRM_MAX_DELIVERIES``, and one over the hard time limit is recorded as
``timeout``.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import random
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import worker_process_init, worker_ready
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from config.logging import add_to_log_context, log_context
from config.queues import REFRESH_SELLER_TASK, TASK_QUEUES
from config.settings import Settings, soft_time_limit
from models.base import utcnow
from models.db import (
    PING_AFTER_REST_S,
    create_db_engine,
    create_session_factory,
    transaction,
    upsert_insert,
)
from models.ledger import Delivery, DeliveryAttempt, FailedMessage, RejectedMessage
from tasks.context import StageContext
from tasks.errors import TRANSIENT_ERRORS, BadInput
from tasks.ledger import json_safe, kept_payload
from tasks.store import StageResult, claim_refresh, expire_refresh_request, record_delivery

log = logging.getLogger(__name__)

Stage = Callable[[Session, StageContext, Any], StageResult]

_engines: dict[tuple[int, str], tuple[Engine, sessionmaker[Session]]] = {}


def session_factory_for(settings: Settings) -> sessionmaker[Session]:
    """One engine per process and URL, created on first use (never shared across a fork)."""
    key = (os.getpid(), settings.effective_database_url)
    if key not in _engines:
        # A task retries a transaction that meets a lost connection: no ping on each one.
        engine = create_db_engine(settings, ping_after_rest_s=PING_AFTER_REST_S)
        _engines[key] = (engine, create_session_factory(engine, settings.count_internal_calls))
    return _engines[key][1]


#: Retries of a message whose outcome could not be recorded (the database unavailable): with the
#: backoff capped at CRM_RETRY_BACKOFF_MAX_S, weeks of waiting; Celery reads None as its default 3.
RECORD_RETRIES = 10_000


class CrmTask(Task):
    """Base class of every crm.* task."""

    #: Its arguments are shown summarised, never as they are (workers/exposure.py).
    Request = "workers.exposure:SummarisedRequest"

    acks_late = True
    reject_on_worker_lost = True
    # Over the hard time limit, the message goes back to its queue rather than being
    # acknowledged: the worker's main process first records it as a ``timeout`` failure
    # (on_failure), and its redelivery finds that outcome and is acknowledged without running.
    # Should that record fail, the message is not lost: it runs again, bounded by the counter.
    acks_on_timeout = False
    ignore_result = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task, unless this is a redelivery that must not run again.

        A first delivery costs nothing here. A redelivered message (the broker marks a message
        it puts back on its queue) is counted in ``delivery_attempt`` in its own committed
        transaction before the task runs, so the count survives the death of this process too.
        """
        with log_context(task_id=self.request.id, task_name=self.name):
            delivery_info = self.request.delivery_info or {}
            if delivery_info.get("redelivered") and not self.admit_redelivery(args, kwargs):
                return "failed"
            return super().__call__(*args, **kwargs)

    def admit_redelivery(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Count one redelivery; False when the message must not run again (acknowledged)."""
        task_id = self.request.id
        limit = self.settings.max_deliveries
        try:
            with transaction(self.sessions) as session:
                finished = session.get(Delivery, task_id)
                if finished is not None:
                    # Its outcome is recorded (a timeout recorded by the main process, or a
                    # worker that died between commit and acknowledgement): nothing left to do.
                    log.warning(
                        "%s %s redelivered after its outcome (%s) was recorded: not run again",
                        self.name,
                        task_id,
                        finished.outcome,
                    )
                    return False
                deliveries = count_delivery(session, task_id, self.name)
                if deliveries <= limit:
                    log.warning(
                        "%s %s redelivered (delivery %d of at most %d)",
                        self.name,
                        task_id,
                        deliveries,
                        limit,
                    )
                    return True
                reason = (
                    f"PoisonMessage: delivered {deliveries} times, more than CRM_MAX_DELIVERIES"
                    f"={limit}; each of the {deliveries - 1} earlier deliveries ended without an "
                    "outcome because the worker process running it died (killed, out of memory, "
                    "a crash), so it is not run again"
                )
                log.error("%s %s parked: %s", self.name, task_id, reason)
                add_failure(
                    session,
                    self.settings,
                    task_name=self.name,
                    task_id=task_id,
                    kind="poison",
                    exception=reason,
                    attempts=deliveries,
                    payload=payload_of(self, args, kwargs),
                    queue=delivery_info_queue(self.request.delivery_info),
                )
                return False
        except TRANSIENT_ERRORS as exc:
            # Not counted: the task runs and meets the same outage in its own transaction,
            # which retries with backoff; the counter resumes once the database answers.
            log.warning("%s %s: redelivery not counted: %s", self.name, task_id, exc)
            return True

    def routed_queue(self) -> str | None:
        """The queue this task is routed to (the main process has no delivery info at hand)."""
        routes = self.app.conf.task_routes
        route = routes.get(self.name) if isinstance(routes, dict) else None
        queue = route.get("queue") if isinstance(route, dict) else None
        return str(queue) if queue else None

    def on_failure(
        self,
        exc: Exception,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: Any,
    ) -> None:
        """Record a task killed at the hard time limit (called in the worker's main process).

        The pool process was killed, so nothing inside it could record anything: the main
        process does, with a connection of its own that it closes at once (its pool processes
        are forked from it and must not inherit an open connection).
        """
        if not isinstance(exc, TimeLimitExceeded):
            return
        settings = self.settings
        # Celery raises it with the limit that applied: the worker's, or a lower one the
        # message asked for (workers/transport/envelope.py never lets a message ask for more).
        limit = exc.args[0] if exc.args and isinstance(exc.args[0], int | float) else None
        if limit is None or limit >= settings.task_time_limit_s:
            applied = f"{settings.task_time_limit_s} s (CRM_TASK_TIME_LIMIT_S)"
        else:
            applied = f"{limit:g} s (the message's own)"
        reason = (
            f"TimeLimitExceeded: over the hard time limit of {applied}: the worker process"
            " running it was killed"
        )
        log.error("%s %s: %s", self.name, task_id, reason)
        options: dict[str, Any] = {"poolclass": NullPool}
        if not settings.effective_database_url.startswith("sqlite"):
            # This runs in the worker's event loop: an unreachable database must not stall it.
            options["connect_args"] = {"connect_timeout": 10}
        engine = create_db_engine(settings, **options)
        try:
            with transaction(create_session_factory(engine)) as session:
                finished = session.get(Delivery, task_id)
                if finished is not None:
                    # Its outcome was committed before the limit hit (the time ran out in
                    # what follows the commit, such as requesting a refresh): not a failure.
                    log.warning(
                        "%s %s: killed after its outcome (%s) was recorded",
                        self.name,
                        task_id,
                        finished.outcome,
                    )
                    return
                add_failure(
                    session,
                    settings,
                    task_name=self.name,
                    task_id=task_id,
                    kind="timeout",
                    exception=reason,
                    attempts=1,
                    payload=payload_of(self, args, kwargs),
                    queue=self.routed_queue(),
                )
        except Exception:
            # The message was put back on its queue: it runs again, bounded by the counter.
            log.exception("%s %s: the timeout could not be recorded", self.name, task_id)
        finally:
            engine.dispose()

    @property
    def settings(self) -> Settings:
        settings: Settings = self.app.conf.crm_settings
        return settings

    @property
    def sessions(self) -> sessionmaker[Session]:
        return session_factory_for(self.settings)

    def context(self) -> StageContext:
        return StageContext(self.settings, self.request.id, self.name)

    def backoff(self) -> float:
        """Exponential backoff with full jitter, capped (spreads a thundering herd)."""
        ceiling = min(self.settings.retry_backoff_max_s, 2 ** (self.request.retries + 1))
        return random.uniform(0.5, float(ceiling))

    @contextmanager
    def run_stage(
        self,
        message: Any,
        *,
        retriable: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
        gave_up: Callable[[BaseException], None] | None = None,
    ) -> Iterator[StageFailure]:
        """Run a task's work in the block; whatever goes wrong ends as the message's one outcome.

        Bad input is recorded as a rejection; a ``retriable`` error is retried with backoff and,
        once the retries are spent, recorded as a failure (then ``gave_up(exc)``); the soft
        time limit is recorded as a timeout, not retried; anything else is a bug, recorded and
        raised. After the block, ``failure.outcome`` is "rejected" or "failed" when the work
        did not finish (it is empty when it did). Every task runs its work this way.
        """
        failure = StageFailure()
        try:
            yield failure
        except Retry:
            raise
        except BadInput as exc:
            self.recorded(partial(self.record_rejection, exc.kept(message), exc.reason, exc.errors))
            failure.outcome = "rejected"
        except retriable as exc:
            self.retry_or_record(message, exc)
            failure.outcome = "failed"
            if gave_up is not None:
                gave_up(exc)
        except SoftTimeLimitExceeded as exc:
            # Interrupted at the soft time limit: rolled back, recorded, not retried (it would
            # most likely overrun again); replay it once the cause is known.
            self.recorded(partial(self.record_failure, message, exc, kind="timeout"))
            failure.outcome = "failed"
        except Exception as exc:
            self.recorded(partial(self.record_failure, message, exc, kind="bug"))
            raise

    def run_ingest(self, stage: Stage, message: Any) -> str:
        """Run one ingest stage in one transaction, its delivery recorded with its change."""
        with self.run_stage(message) as failure, transaction(self.sessions) as session:
            result = stage(session, self.context(), message)
            record_delivery(
                session,
                task_id=self.request.id,
                task_name=self.name,
                outcome=result.outcome,
                event_id=result.event_id,
                detail=result.detail,
            )
            # Last, so that a refresh pending meanwhile waits for this commit no longer than
            # it must (tasks.store.claim_refresh).
            sellers = sorted(result.sellers_to_refresh)
            claimed = [s for s in sellers if claim_refresh(session, s, in_change=True)]
        if failure:
            return failure.outcome
        add_to_log_context(
            event_id=result.event_id,
            seller=",".join(map(str, sellers)) if sellers else None,
        )
        self.send_refreshes(claimed)
        self.after_commit(result)
        return result.outcome

    def recorded(self, record: Callable[[], None]) -> None:
        """Record a message's outcome (a rejection, a failure), or run the message again later.

        A message is acknowledged only once its outcome is in the database: when the database
        cannot take the record now (restarting, unreachable), the message is retried with
        backoff, practically without a bound (``RECORD_RETRIES``), instead of being acknowledged
        with no trace.
        """
        try:
            record()
        except TRANSIENT_ERRORS as exc:
            log.warning(
                "%s %s: outcome not recorded, the database is unavailable; retrying: %s",
                self.name,
                self.request.id,
                exc,
            )
            raise self.retry(exc=exc, countdown=self.backoff(), max_retries=RECORD_RETRIES) from exc

    def send_refreshes(self, claimed: list[int]) -> None:
        """Enqueue the refreshes the change's transaction claimed. The change is committed
        whatever happens here: a refresh that cannot be sent now (broker or database
        unavailable, the time limit) is left to the refresh sweep, which finds its stale claim
        (``crm.refresh.sweep``); the counts moved with the change already."""
        for seller_id in claimed:
            try:
                send_refresh(self.app, self.sessions, seller_id)
            except Exception as exc:
                log.warning(
                    "%s %s: refresh of seller %s not requested, left to the sweep: %r",
                    self.name,
                    self.request.id,
                    seller_id,
                    exc,
                )

    def after_commit(self, result: StageResult) -> None:
        """What a task enqueues once its change is committed, besides the refreshes."""

    def retry_or_record(self, message: Any, exc: BaseException) -> None:
        if self.request.retries < self.settings.max_retries:
            log.warning("%s: transient error, retrying: %s", self.name, exc)
            raise self.retry(
                exc=exc, countdown=self.backoff(), max_retries=self.settings.max_retries
            )
        self.recorded(partial(self.record_failure, message, exc, kind="transient"))

    def record_rejection(self, message: Any, reason: str, errors: dict[str, Any]) -> None:
        log.info("%s rejected %s: %s", self.name, self.request.id, reason)
        with transaction(self.sessions) as session:
            session.add(
                RejectedMessage(
                    task_name=self.name,
                    task_id=self.request.id,
                    reason=json_safe(reason),
                    errors=json_safe(errors),
                    payload=kept_payload(session, self.settings, message),
                )
            )
            record_delivery(
                session,
                task_id=self.request.id,
                task_name=self.name,
                outcome="rejected",
                detail=json_safe(reason),
            )

    def record_failure(self, message: Any, exc: BaseException, *, kind: str) -> None:
        log.error("%s failed (%s) %s: %r", self.name, kind, self.request.id, exc, exc_info=exc)
        if isinstance(exc, SoftTimeLimitExceeded):
            exception = (
                "SoftTimeLimitExceeded: interrupted at the soft time limit"
                f" ({soft_time_limit(self.settings.task_time_limit_s)} s), before the hard limit"
                f" of {self.settings.task_time_limit_s} s (CRM_TASK_TIME_LIMIT_S)"
            )
        else:
            exception = f"{type(exc).__name__}: {exc}"
        with transaction(self.sessions) as session:
            add_failure(
                session,
                self.settings,
                task_name=self.name,
                task_id=self.request.id,
                kind=kind,
                exception=exception,
                traceback="".join(traceback.format_exception(exc)),
                attempts=self.request.retries + 1,
                payload=message,
                queue=delivery_info_queue(self.request.delivery_info),
            )


@dataclass
class StageFailure:
    """How a task's work ended when it did not finish (``CrmTask.run_stage``)."""

    outcome: str = ""

    def __bool__(self) -> bool:
        return bool(self.outcome)


def add_failure(
    session: Session,
    settings: Settings,
    *,
    task_name: str,
    task_id: str | None,
    kind: str,
    exception: str,
    attempts: int,
    payload: Any,
    queue: str | None,
    traceback: str = "",
) -> None:
    """A failed message and its delivery's ``failed`` outcome, in the caller's transaction (the
    payload bounded, see ``tasks.ledger.kept_payload``)."""
    session.add(
        FailedMessage(
            task_name=task_name,
            task_id=task_id,
            kind=kind,
            exception=json_safe(exception[:5000]),
            traceback=json_safe(traceback[-20000:]),
            attempts=attempts,
            payload=kept_payload(session, settings, payload),
            queue=queue,
        )
    )
    record_delivery(
        session,
        task_id=task_id,
        task_name=task_name,
        outcome="failed",
        detail=json_safe(f"{kind}: {exception}"[:2000]),
    )


def count_delivery(session: Session, task_id: str, task_name: str) -> int:
    """Count one redelivery of ``task_id``; returns its deliveries so far, the first included.

    The first delivery is never written (it would cost every message a round trip), so the
    first redelivery stores 2.
    """
    table = DeliveryAttempt.__table__
    now = utcnow()
    statement = (
        upsert_insert(session, table)
        .values(task_id=task_id, task_name=task_name, deliveries=2, last_delivered_at=now)
        .on_conflict_do_update(
            index_elements=["task_id"],
            set_={"deliveries": table.c.deliveries + 1, "last_delivered_at": now},
        )
        .returning(table.c.deliveries)
    )
    return int(session.execute(statement).scalar_one())


def payload_of(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A task's arguments as the ledger keeps them, the form ``crm-events replay`` sends back.

    A task of one parameter (every ingest task, the seller refresh) is recorded as that value;
    any other as an object of its parameters by name (the reports, the reconcile).
    """
    try:
        bound = inspect.signature(task.run).bind(*args, **kwargs)
    except TypeError:
        return {"args": list(args), "kwargs": kwargs}
    bound.apply_defaults()
    if len(bound.arguments) == 1:
        return next(iter(bound.arguments.values()))
    return dict(bound.arguments)


def delivery_info_queue(delivery_info: dict[str, Any] | None) -> str | None:
    """The queue a message came from (our queues are bound with their own name as the key)."""
    routing_key = (delivery_info or {}).get("routing_key")
    return str(routing_key) if routing_key else None


@worker_ready.connect
def check_broker_when_ready(sender: Any = None, **_: Any) -> None:
    """Warn at worker start-up when the Redis broker could lose messages (docs/operations.md)."""
    from workers.broker_check import warn_about_broker

    settings = getattr(getattr(sender, "app", None), "conf", {}).get("crm_settings")
    if isinstance(settings, Settings):
        warn_about_broker(settings)


#: The garbage collector's thresholds in a pool process (Python's default: 700, 10, 10). A batch
#: of 500 calls allocates hundreds of thousands of objects that reference counting frees; at the
#: default, the collector looked through them some 500 times per 5,000 rows for the few cycles
#: among them (a tenth of the CPU or more, in process). Cycles still go within 10,000 allocations.
GC_THRESHOLDS = (10_000, 10, 10)


@worker_process_init.connect
def collect_less_often(**_: Any) -> None:
    """In a new pool process: what it inherited (the modules, the app: never garbage) is frozen
    out of the collector's full passes, and the collector runs less often (``GC_THRESHOLDS``)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


#: How long a requested refresh waits before it runs. Changes committed meanwhile find the
#: request still pending and ride along, so a burst of events for one seller costs one refresh
#: instead of one each; short enough to keep the view fresh within a second.
REFRESH_COALESCE_S = 0.2


#: Publishing a refresh gives up after these retries (about 2 s): the ingest's change is already
#: committed, and the sweep requests what a dead broker kept from being sent.
REFRESH_PUBLISH_RETRY = {
    "max_retries": 3,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 1.0,
}


def request_refresh(app: Any, sessions: sessionmaker[Session], seller_id: int) -> bool:
    """Enqueue ``crm.refresh.seller`` unless one is already queued (coalescing); after commit.

    When the refresh cannot be published, the claim is marked stale (best effort), so the next
    change requests it at once, and the sweep does when no change comes.
    """
    with transaction(sessions) as session:
        claimed = claim_refresh(session, seller_id)
    if claimed:
        send_refresh(app, sessions, seller_id)
    return claimed


def send_refresh(app: Any, sessions: sessionmaker[Session], seller_id: int) -> None:
    """Enqueue the refresh of a claim committed; a claim whose refresh cannot be published is
    marked stale (best effort) and the error raised."""
    try:
        app.send_task(
            REFRESH_SELLER_TASK,
            args=[seller_id],
            queue=TASK_QUEUES[REFRESH_SELLER_TASK],
            countdown=REFRESH_COALESCE_S,
            retry=True,
            retry_policy=REFRESH_PUBLISH_RETRY,
        )
    except Exception:
        with suppress(Exception), transaction(sessions) as session:
            expire_refresh_request(session, seller_id)
        raise
