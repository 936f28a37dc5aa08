"""The base task: one session per execution, the error taxonomy, after-commit follow-ups.

Stage functions never commit; this class opens the transaction, commits or rolls back, records
the delivery's outcome in the same transaction, and only then enqueues follow-up work.
"""

from __future__ import annotations

import logging
import os
import random
import traceback
from collections.abc import Callable
from typing import Any

from celery import Task
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from models.db import create_db_engine, create_session_factory, transaction
from models.ledger import FailedMessage, RejectedMessage
from tasks.context import StageContext
from tasks.errors import TRANSIENT_ERRORS, BadInput
from tasks.store import StageResult, claim_refresh, record_delivery

log = logging.getLogger(__name__)

Stage = Callable[[Session, StageContext, Any], StageResult]

_engines: dict[tuple[int, str], tuple[Engine, sessionmaker[Session]]] = {}


def session_factory_for(settings: Settings) -> sessionmaker[Session]:
    """One engine per process and URL, created on first use (never shared across a fork)."""
    key = (os.getpid(), settings.effective_database_url)
    if key not in _engines:
        engine = create_db_engine(settings)
        _engines[key] = (engine, create_session_factory(engine))
    return _engines[key][1]


class CrmTask(Task):
    """Base class of every crm.* task."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True

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

    def run_ingest(self, stage: Stage, message: Any) -> str:
        """Run one ingest stage in one transaction and classify whatever goes wrong."""
        try:
            with transaction(self.sessions) as session:
                result = stage(session, self.context(), message)
                record_delivery(
                    session,
                    task_id=self.request.id,
                    task_name=self.name,
                    outcome=result.outcome,
                    event_id=result.event_id,
                    detail=result.detail,
                )
        except BadInput as exc:
            self.record_rejection(message, exc.reason, exc.errors)
            return "rejected"
        except TRANSIENT_ERRORS as exc:
            self.retry_or_record(message, exc)
            return "failed"
        except Exception as exc:
            self.record_failure(message, exc, kind="bug")
            raise
        self.after_commit(result)
        return result.outcome

    def after_commit(self, result: StageResult) -> None:
        for seller_id in sorted(result.sellers_to_refresh):
            request_refresh(self.app, self.sessions, seller_id)

    def retry_or_record(self, message: Any, exc: BaseException) -> None:
        if self.request.retries < self.settings.max_retries:
            log.warning("%s: transient error, retrying: %s", self.name, exc)
            raise self.retry(
                exc=exc, countdown=self.backoff(), max_retries=self.settings.max_retries
            )
        self.record_failure(message, exc, kind="transient")

    def record_rejection(self, message: Any, reason: str, errors: dict[str, Any]) -> None:
        log.info("%s rejected %s: %s", self.name, self.request.id, reason)
        with transaction(self.sessions) as session:
            session.add(
                RejectedMessage(
                    task_name=self.name,
                    task_id=self.request.id,
                    reason=_json_safe(reason),
                    errors=_json_safe(errors),
                    payload=_json_safe(message),
                )
            )
            record_delivery(
                session,
                task_id=self.request.id,
                task_name=self.name,
                outcome="rejected",
                detail=_json_safe(reason),
            )

    def record_failure(self, message: Any, exc: BaseException, *, kind: str) -> None:
        log.error("%s failed (%s) %s: %r", self.name, kind, self.request.id, exc, exc_info=exc)
        with transaction(self.sessions) as session:
            session.add(
                FailedMessage(
                    task_name=self.name,
                    task_id=self.request.id,
                    kind=kind,
                    exception=_json_safe(f"{type(exc).__name__}: {exc}"[:5000]),
                    traceback=_json_safe("".join(traceback.format_exception(exc))[-20000:]),
                    attempts=self.request.retries + 1,
                    payload=_json_safe(message),
                )
            )
            record_delivery(
                session,
                task_id=self.request.id,
                task_name=self.name,
                outcome="failed",
                detail=_json_safe(f"{kind}: {type(exc).__name__}: {exc}"[:2000]),
            )


#: How long a requested refresh waits before it runs. Changes committed meanwhile find the
#: request still pending and ride along, so a burst of events for one seller costs one refresh
#: instead of one each; short enough to keep the view fresh within a second.
REFRESH_COALESCE_S = 0.2


def request_refresh(app: Any, sessions: sessionmaker[Session], seller_id: int) -> bool:
    """Enqueue ``crm.refresh.seller`` unless one is already queued (coalescing); after commit."""
    with transaction(sessions) as session:
        claimed = claim_refresh(session, seller_id)
    if claimed:
        app.send_task(
            "crm.refresh.seller",
            args=[seller_id],
            queue="crm.refresh",
            countdown=REFRESH_COALESCE_S,
        )
    return claimed


def _json_safe(value: Any) -> Any:
    """A payload as a JSON document the database can keep, whatever the sender put in it.

    PostgreSQL's JSONB cannot hold a NUL in a string: NULs are shown as U+2400 (␀) instead, so
    the rejection of a message with a NUL is recorded rather than failing itself.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\u2400")
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(_json_safe(k)): _json_safe(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float):
        return value
    return repr(value)
