"""The Celery tasks: one thin wrapper per stable task name over the stage functions of ``tasks/``.

Each task opens its session through the base class (``workers.base.CrmTask``), runs one stage,
commits, records the delivery's outcome and only then enqueues follow-up work. Nothing below
``tasks/`` knows of Celery: the stages are plain functions over a ``Session``. The names are the
contract of DESIGN §5 (``workers.queues`` routes them).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.orm import Session

from config.logging import add_to_log_context
from config.queues import (
    BATCH_TASK,
    CALL_QUEUE,
    CALL_TASK,
    DOCUMENT_TASK,
    EMAIL_QUEUE,
    EMAIL_TASK,
    PARTY_TASK,
    RECONCILE_TASK,
    REFRESH_SELLER_TASK,
    REFRESH_SWEEP_TASK,
    RETENTION_TASK,
    TARGET_REPORT_TASK,
    TARGET_TASK,
    TASK_QUEUES,
    VISIT_TASK,
    WORK_TASK_TASK,
)
from models.db import snapshot, transaction
from models.events import CrmEvent
from tasks.attach import remove_files
from tasks.batch import BatchResult, ingest_batch, run_batch
from tasks.errors import TRANSIENT_ERRORS
from tasks.ingest.call import CallStageResult, ingest_call
from tasks.ingest.document import ingest_document
from tasks.ingest.email import ingest_email
from tasks.ingest.party import ingest_party
from tasks.ingest.visit import ingest_visit
from tasks.maintenance import reconcile
from tasks.refresh import publish_notification, refresh_seller, sellers_to_sweep
from tasks.reports import send_due_reports
from tasks.retention import apply_retention
from tasks.store import StageResult, claim_refresh, clear_refresh_request, record_delivery
from tasks.targets import ingest_target
from tasks.telephony.recordings import (
    RETRIABLE,
    TASK_NAME,
    RecordingRefused,
    RecordingUnavailable,
    download,
    load_request,
    mark_recording,
    pending_entry,
    store_recording,
)
from tasks.work import ingest_task
from workers.base import CrmTask, Stage, request_refresh, soft_time_limit
from workers.transport.compression import decompressed_limit
from workers.transport.drain import Drained, drain, drains, restore_drained_of
from workers.transport.envelope import Limits

log = logging.getLogger(__name__)


# -- ingest --------------------------------------------------------------------------------------


class DrainingTask(CrmTask):
    """An ingest task that takes the messages of its kind queued behind it, when there are any,
    and stores them with its own as one batch (``workers.transport.drain``)."""

    #: The batch stage's kind, the queue, and the setting of how many it takes at most.
    kind: str
    queue: str

    def drain_limit(self) -> int:
        raise NotImplementedError

    def admit_redelivery(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        # Run again because its process died: what that run had taken from the queue goes back
        # first, each message marked redelivered (and so counted, and run alone).
        if drains(self.settings, self.drain_limit()):
            try:
                restore_drained_of(self.app, self.name, self.request.id)
            except TRANSIENT_ERRORS as exc:  # left to the visibility timeout, as before
                log.warning(
                    "%s %s: drained messages not put back: %r", self.name, self.request.id, exc
                )
        return super().admit_redelivery(args, kwargs)

    def drain(self) -> Drained | None:
        """The messages queued behind this one (none on a redelivery or a retry)."""
        settings = self.settings
        limit = self.drain_limit()
        if not drains(settings, limit) or self.request.retries:
            return None
        if (self.request.delivery_info or {}).get("redelivered"):
            return None
        limits = Limits.of(
            settings, soft_time_limit(settings.task_time_limit_s), decompressed_limit(settings)
        )
        try:
            return drain(self.app, self.queue, self.name, self.request.id, limit, limits)
        except TRANSIENT_ERRORS as exc:
            log.warning("%s %s: queued messages not taken: %r", self.name, self.request.id, exc)
            return None

    def run_with_drained(self, stage: Stage, message: Any) -> str:
        """Run ``message`` alone through ``stage``, or with the messages queued behind it."""
        drained = self.drain()
        if drained is None:
            return self.run_ingest(stage, message)
        return self.run_drained(message, drained)

    def run_drained(self, message: Any, drained: Drained) -> str:
        """This message and the drained ones as one batch; the drained acknowledged after the
        commit, or put back in their queue when it does not come."""
        ids = [self.request.id, *drained.task_ids]
        committed = False
        try:
            with self.run_stage(message) as failure, transaction(self.sessions) as session:
                result = run_batch(
                    session,
                    self.context(),
                    self.kind,
                    [message, *drained.messages],
                    ids.__getitem__,
                    queue_of=TASK_QUEUES.get,
                    fatal=(SoftTimeLimitExceeded, TimeLimitExceeded),
                )
                sellers = sorted(result.sellers_to_refresh)
                claimed = [s for s in sellers if claim_refresh(session, s, in_change=True)]
            committed = not failure
        finally:
            if not committed:
                drained.put_back()
        if failure:
            return failure.outcome
        try:
            drained.ack()
        except TRANSIENT_ERRORS as exc:
            # Committed: put back later by the visibility timeout, they find their outcomes.
            log.warning(
                "%s %s: drained messages not acknowledged: %r", self.name, self.request.id, exc
            )
        add_to_log_context(drained=len(drained.tags))
        log.info("%s %s: %s", self.name, self.request.id, result.detail)
        self.send_refreshes(claimed)
        if result.recordings_to_fetch:
            enqueue_recording_fetches(self.app, result.recordings_to_fetch)
        return "done"


class CallTask(DrainingTask):
    """The call task: takes the calls queued behind it; after the commit, requests the fetch of
    new recording URLs."""

    kind = "call"
    queue = CALL_QUEUE

    def drain_limit(self) -> int:
        return self.settings.call_drain

    def after_commit(self, result: StageResult) -> None:
        if isinstance(result, CallStageResult) and result.recordings_to_fetch:
            enqueue_recording_fetches(self.app, result.recordings_to_fetch)


@shared_task(name=CALL_TASK, base=CallTask, bind=True)
def ingest_call_task(self: CallTask, message: Any) -> str:
    """crm.ingest.call: one call status update (DESIGN §5), with those queued behind it."""
    return self.run_with_drained(ingest_call, message)


class EmailTask(DrainingTask):
    """The email task: takes the emails queued behind it."""

    kind = "email"
    queue = EMAIL_QUEUE

    def drain_limit(self) -> int:
        return self.settings.email_drain


class BatchTask(CrmTask):
    """The batch task: after the commit, requests the fetch of its calls' recordings."""

    def after_commit(self, result: StageResult) -> None:
        if isinstance(result, BatchResult) and result.recordings_to_fetch:
            enqueue_recording_fetches(self.app, result.recordings_to_fetch)


@shared_task(name=BATCH_TASK, base=BatchTask, bind=True)
def ingest_batch_task(self: BatchTask, message: Any) -> str:
    """crm.ingest.batch: one ``crm.batch/1`` of messages of one kind, each with its outcome."""
    stage = partial(
        ingest_batch, queue_of=TASK_QUEUES.get, fatal=(SoftTimeLimitExceeded, TimeLimitExceeded)
    )
    return self.run_ingest(stage, message)


@shared_task(name=EMAIL_TASK, base=EmailTask, bind=True)
def ingest_email_task(self: EmailTask, message: Any) -> str:
    """crm.ingest.email: one raw email with its envelope (DESIGN §5), with those queued behind
    it."""
    return self.run_with_drained(ingest_email, message)


@shared_task(name=PARTY_TASK, base=CrmTask, bind=True)
def ingest_party_task(self: CrmTask, message: Any) -> str:
    """crm.ingest.party: one customer, contact or staff upsert (DESIGN §5)."""
    return self.run_ingest(ingest_party, message)


@shared_task(name=VISIT_TASK, base=CrmTask, bind=True)
def ingest_visit_task(self: CrmTask, message: Any) -> str:
    """crm.ingest.visit: one customer visit report (DESIGN §5)."""
    return self.run_ingest(ingest_visit, message)


@shared_task(name=DOCUMENT_TASK, base=CrmTask, bind=True)
def ingest_document_task(self: CrmTask, message: Any) -> str:
    """crm.ingest.document: documents added to a stored event (queue crm.ingest.email)."""
    return self.run_ingest(ingest_document, message)


@shared_task(name=WORK_TASK_TASK, base=CrmTask, bind=True)
def ingest_work_task(self: CrmTask, message: Any) -> str:
    """crm.ingest.task: a work task on a stored event (queue crm.ingest.party)."""
    return self.run_ingest(ingest_task, message)


@shared_task(name=TARGET_TASK, base=CrmTask, bind=True)
def ingest_target_task(self: CrmTask, message: Any) -> str:
    """crm.ingest.target: one sales target from the ERP (master data, queue crm.ingest.party)."""
    return self.run_ingest(ingest_target, message)


# -- refresh ------------------------------------------------------------------------------------


@shared_task(name=REFRESH_SELLER_TASK, base=CrmTask, bind=True)
def refresh_seller_task(self: CrmTask, seller_id: int) -> str:
    """crm.refresh.seller: tell the live screens that a seller's view changed."""
    add_to_log_context(seller=seller_id)
    ctx = self.context()
    with self.run_stage(seller_id) as failure:
        # Clear the request first, in its own transaction: any change committed after this
        # point claims a new refresh, and any change before it is visible to the reads below.
        with transaction(self.sessions) as session:
            clear_refresh_request(session, seller_id)
        with transaction(self.sessions) as session:
            notification = refresh_seller(session, ctx, seller_id)
    if failure:
        return failure.outcome
    if notification is not None:
        try:
            publish_notification(ctx, notification)
        except TRANSIENT_ERRORS as exc:
            log.warning("seller notification not published: %s", exc)
    return "done"


@shared_task(name=REFRESH_SWEEP_TASK, base=CrmTask, bind=True)
def sweep_refreshes_task(self: CrmTask) -> str:
    """crm.refresh.sweep (beat, every minute): request the refreshes that were never sent.

    A change is committed, its counts with it, before its refresh is requested; when the broker
    was unavailable at that moment, or the process died in between, the claim it took stays in
    ``refresh_request`` and goes stale. This requests a refresh for those sellers (the usual
    claim keeps it from doubling one that is on its way), so the live screens hear of the change
    within a minute or two. The counts themselves never wait for it.
    """
    try:
        with transaction(self.sessions) as session:
            sellers = sellers_to_sweep(session)
        requested = [s for s in sellers if request_refresh(self.app, self.sessions, s)]
    except Exception as exc:  # the next tick tries again
        log.warning("refresh sweep did not run: %r", exc)
        return "failed"
    if requested:
        log.warning("refresh sweep requested the refresh of sellers %s", requested)
    return f"requested {len(requested)}"


# -- reports and maintenance ----------------------------------------------------------------


@shared_task(name=TARGET_REPORT_TASK, base=CrmTask, bind=True)
def send_target_reports_task(
    self: CrmTask, kind: str, period: str | None = None, manager: str | None = None
) -> str:
    """crm.reports.targets: send each manager the reports due in their zone, once each.

    Beat passes only ``kind``; an operator may name a ``period`` (and a ``manager``) to send a
    particular report, still at most once.
    """
    arguments = {"kind": kind, "period": period, "manager": manager}
    with self.run_stage(arguments) as failure:
        outcome = send_due_reports(
            self.sessions, self.settings, kind, period=period, manager=manager
        )
    if failure:
        return failure.outcome
    if outcome.failed:
        # The whole task is retried: reports already sent are skipped by their claims.
        self.retry_or_record(arguments, outcome.failed[0][1])
        return "failed"
    detail = f"sent {len(outcome.sent)}, skipped {len(outcome.skipped)}"
    if outcome.sent:
        detail += ": " + ", ".join(outcome.sent)
    with transaction(self.sessions) as session:
        record_delivery(
            session, task_id=self.request.id, task_name=self.name, outcome="done", detail=detail
        )
    return detail


@shared_task(name=RECONCILE_TASK, base=CrmTask, bind=True)
def reconcile_task(self: CrmTask) -> str:
    """crm.maintenance.reconcile: nightly proof that the tallies have not drifted."""
    with self.run_stage({}) as failure, snapshot(self.sessions) as session:
        run = reconcile(session, self.context())
    if failure:
        return failure.outcome
    return f"checked {run.keys_checked} keys, drift {run.drift}"


@shared_task(name=RETENTION_TASK, base=CrmTask, bind=True)
def retention_task(self: CrmTask) -> str:
    """crm.maintenance.retention: nightly, delete what is older than its retention setting.

    The deletions and the run's report (the delivery's detail) commit together; the document
    files of the filesystem store are removed after that commit.
    """
    with self.run_stage({}) as failure, transaction(self.sessions) as session:
        report = apply_retention(session, self.settings)
        record_delivery(
            session,
            task_id=self.request.id,
            task_name=self.name,
            outcome="done",
            detail=report.summary,
        )
    if failure:
        return failure.outcome
    remove_files(report.files)
    log.info("%s", report.summary)
    return report.summary


# -- call recordings --------------------------------------------------------------------------


def enqueue_recording_fetches(app: Any, requests: list[dict[str, Any]]) -> None:
    """After the call's commit: one ``crm.ingest.recording`` per URL.

    A failure here loses nothing: the URL stays listed as pending on the event and the call's
    next update requests it again (``REQUEST_AGAIN_AFTER``).
    """
    for request in requests:
        try:
            app.send_task(TASK_NAME, args=[request], queue=TASK_QUEUES[TASK_NAME])
        except Exception as exc:  # the broker is down: the event says "pending"
            log.warning("could not request the recording of event %s: %s", request["event_id"], exc)


class RecordingTask(CrmTask):
    """Downloads outside any transaction; the event is locked only to attach the result."""

    def fetch(self, payload: Any) -> str:
        with self.run_stage(
            payload, retriable=RETRIABLE, gave_up=partial(self._gave_up, payload)
        ) as failure:
            return self._fetch(payload)
        return failure.outcome

    def _fetch(self, payload: Any) -> str:
        settings = self.settings
        request = load_request(payload)
        event_id, url = request["event_id"], request["url"]
        with transaction(self.sessions) as session:
            if pending_entry(session, event_id, url) is None:
                detail = "the recording is stored already, or its call is gone"
                self._delivered(session, "duplicate", event_id, detail)
                return "duplicate"
        if not settings.recording_fetch:
            with transaction(self.sessions) as session:
                mark_recording(session, settings, event_id, url, "link", "fetching is off")
                self._delivered(session, "done", event_id, "fetching is off: kept as a link")
            return "done"
        try:
            downloaded = download(url, settings)
        except RecordingRefused as exc:
            with transaction(self.sessions) as session:
                mark_recording(session, settings, event_id, url, "refused", exc.reason)
            self.record_rejection(
                payload, f"recording not fetched: {exc.reason}", {"url": [exc.reason]}
            )
            return "rejected"
        with transaction(self.sessions) as session:
            detail = store_recording(session, settings, event_id, url, downloaded)
            self._delivered(session, "stored", event_id, detail)
        return "stored"

    def _gave_up(self, payload: Any, exc: BaseException) -> None:
        """The retries are spent: the event says so, not "pending" for ever."""
        if isinstance(payload, dict) and isinstance(exc, RecordingUnavailable):
            with transaction(self.sessions) as session:
                mark_recording(
                    session,
                    self.settings,
                    int(payload["event_id"]),
                    str(payload["url"]),
                    "failed",
                    f"gave up after {self.request.retries + 1} attempts: {exc.reason}",
                )

    def _delivered(self, session: Session, outcome: str, event_id: int, detail: str) -> None:
        record_delivery(
            session,
            task_id=self.request.id,
            task_name=self.name,
            outcome=outcome,
            # The event may have been deleted meanwhile: the delivery then names none.
            event_id=event_id if session.get(CrmEvent, event_id) is not None else None,
            detail=detail,
        )


@shared_task(name=TASK_NAME, base=RecordingTask, bind=True)
def fetch_recording_task(self: RecordingTask, request: Any) -> str:
    """crm.ingest.recording: fetch one call recording by URL and attach it to its event."""
    return self.fetch(request)
