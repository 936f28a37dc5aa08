"""The worker's consumer: every message checked before Celery looks at it, every refusal
recorded before it is acknowledged.

A worker accepts JSON task messages only (or, with ``CRM_SIGNING_*`` set, only messages signed
with Celery's ``auth`` serializer, ``workers.transport.signing``). Celery's own consumer would log
a refused message (a pickle, another content type, a body that does not decode, a message of an
unknown task) and drop it; :class:`RecordingConsumer` records each one as a ``rejected_message``
row first: the reason, the task it named, and the body itself, base64-encoded up to
:data:`BODY_KEEP_BYTES` with its size and SHA-256, so that nothing is lost. The body of a refused
content type is never decoded, so a pickle is never unpickled, and a compressed body is expanded
only up to a bound. Every message's envelope is checked (``workers.transport.envelope``) before
anything is handed to the pool.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery.worker.consumer import Consumer
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from config.settings import Settings
from models.db import create_db_engine, create_session_factory, transaction
from models.ledger import Delivery, RejectedMessage
from tasks.errors import TRANSIENT_ERRORS
from tasks.ledger import json_safe, kept_payload
from tasks.store import record_delivery
from workers.base import payload_of, soft_time_limit
from workers.transport.compression import decompressed_limit, install_bounded_decompression
from workers.transport.envelope import MAX_TASK_ID, Limits, Refused, admit
from workers.transport.pool_health import guard_hand_off
from workers.transport.signing import SIGNED_CONTENT_TYPE, accepted_content_type

log = logging.getLogger("crm.security")

#: How much of a refused body is kept (base64) in its rejected_message row; the size and the
#: SHA-256 of the whole body are always kept.
BODY_KEEP_BYTES = 64 * 1024
#: Longest string kept from a refused message's headers.
HEADER_KEEP_CHARS = 2000
#: The first wait before recording a refused message again when the database did not take it;
#: it doubles up to CRM_RETRY_BACKOFF_MAX_S.
RECORD_RETRY_FIRST_S = 0.5

#: Marks a refusal whose message cannot be sent again as it is (see :class:`Refusal`).
_NOT_REPLAYABLE: Any = object()

KNOWN_CONTENT_TYPES = {
    "application/x-python-serialize": "pickle",
    "application/x-yaml": "YAML",
    "application/x-msgpack": "msgpack",
    SIGNED_CONTENT_TYPE: "signed (auth) or untyped data",
    "application/text": "text",
}


def _bounded(value: Any, depth: int = 0) -> Any:
    """A header value as JSON the database keeps: bounded strings and nesting, storable text."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return json_safe(value[:HEADER_KEEP_CHARS])
    if value is None or isinstance(value, bool | int | float):
        return json_safe(value)
    if depth > 5:
        return json_safe(repr(value)[:HEADER_KEEP_CHARS])
    if isinstance(value, list | tuple):
        return [_bounded(item, depth + 1) for item in list(value)[:100]]
    if isinstance(value, dict):
        return {
            str(_bounded(k, depth + 1)): _bounded(v, depth + 1)
            for k, v in list(value.items())[:100]
        }
    return json_safe(repr(value)[:HEADER_KEEP_CHARS])


def _header(message: Any, name: str) -> Any:
    headers = getattr(message, "headers", None)
    return headers.get(name) if isinstance(headers, dict) else None


def ledger_task_id(task_id: Any) -> str | None:
    """The id a refused message is recorded under: its own where the ledger can key it, else a
    stable stand-in (a prefix and a hash), so that the same message delivered again finds its
    record. None for a message without one."""
    if task_id is None or task_id == "":
        return None
    if isinstance(task_id, str) and len(task_id) <= MAX_TASK_ID and task_id.isprintable():
        return task_id
    text = task_id if isinstance(task_id, str) else json.dumps(json_safe(task_id))[:10_000]
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    shown = "".join(c if c.isprintable() else "?" for c in text[:40])
    return f"{shown}~{digest}"


def _task_name(name: Any) -> str:
    if isinstance(name, str) and name:
        return json_safe("".join(c if c.isprintable() else "?" for c in name[:100]))
    return "(unknown)"


def describe_message(message: Any) -> dict[str, Any]:
    """Everything needed to understand (and recover) a refused message, as JSON.

    The body is kept as bytes, base64-encoded: it is not decoded, whatever its type. (When the
    transport could not even build a message, ``message`` is its raw form.)
    """
    body = getattr(message, "body", message)
    if isinstance(body, str):
        raw = body.encode("utf-8", "surrogateescape")
    elif isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
    else:  # a transport that already decoded the body: keep its representation
        raw = repr(body).encode("utf-8", "replace")
    delivery = getattr(message, "delivery_info", None)
    delivery = delivery if isinstance(delivery, dict) else {}
    return {
        "content_type": _bounded(getattr(message, "content_type", None)),
        "content_encoding": _bounded(getattr(message, "content_encoding", None)),
        "headers": _bounded(getattr(message, "headers", None) or {}),
        "exchange": _bounded(delivery.get("exchange")),
        "routing_key": _bounded(delivery.get("routing_key")),
        "body_size": len(raw),
        "body_sha256": hashlib.sha256(raw).hexdigest(),
        "body_truncated": len(raw) > BODY_KEEP_BYTES,
        "body_b64": base64.b64encode(raw[:BODY_KEEP_BYTES]).decode("ascii"),
    }


def refused_content_reason(content_type: str | None, accepted: str) -> str:
    shown = content_type or "(none)"
    kind = KNOWN_CONTENT_TYPES.get(shown)
    named = f"{shown!r} ({kind})" if kind else repr(shown)[:200]
    if accepted == SIGNED_CONTENT_TYPE:
        wanted = "only signed messages (the auth serializer, application/data) are accepted"
    else:
        wanted = "only application/json is accepted"
    return f"refused content type {named}: {wanted}; the body was not deserialised"


@dataclass(frozen=True)
class Refusal:
    """What is recorded of one refused message; everything in it is storable already."""

    task_name: str
    task_id: str | None
    reason: str
    errors: Any
    payload: Any
    #: The payload is the message's own arguments (a replay can send them again): kept whole
    #: up to a bound, the rest in the document store. Else it is the bounded description.
    replayable: bool = False

    @classmethod
    def of(
        cls,
        message: Any,
        reason: str,
        errors: dict[str, Any],
        arguments: Any = _NOT_REPLAYABLE,
        *,
        task_name: Any = None,
        task_id: Any = None,
    ) -> Refusal:
        """``task_name`` and ``task_id`` where the body names them (protocol 1), else the
        message's headers do."""
        replayable = arguments is not _NOT_REPLAYABLE
        return cls(
            task_name=_task_name(task_name or _header(message, "task")),
            task_id=ledger_task_id(task_id if task_id is not None else _header(message, "id")),
            reason=json_safe(reason[:5000]),
            errors=_bounded(errors),
            payload=arguments if replayable else describe_message(message),
            replayable=replayable,
        )

    def without_payload(self, problem: BaseException) -> Refusal:
        """The record of last resort: no part of the message, only what was refused and why."""
        return Refusal(
            task_name=self.task_name,
            task_id=self.task_id,
            reason=self.reason,
            errors=self.errors,
            payload={
                "not_kept": json_safe(f"{type(problem).__name__}: {problem}"[:1000]),
                **(
                    {}
                    if self.replayable
                    else {k: self.payload[k] for k in ("body_size", "body_sha256")}
                ),
            },
        )


class RefusalRecorder:
    """Writes refused messages to ``rejected_message`` from the worker's consumer process.

    A refused message is acknowledged only once its record is committed, like every other
    outcome. When the database cannot take the record now (restarting, unreachable), the
    message stays unacknowledged and a background thread records it with a growing pause, up to
    CRM_RETRY_BACKOFF_MAX_S, for as long as it takes; it is acknowledged from the consumer's
    loop once recorded. Should the worker stop first, the broker delivers the message again.

    The consumer is the parent of the pool processes: its engine holds no connection between
    records (NullPool), so a pool process forked later inherits none.
    """

    def __init__(self, settings: Settings, call_soon: Callable[[Callable[[], None]], Any]) -> None:
        self.settings = settings
        self.call_soon = call_soon
        self._sessions: sessionmaker[Session] | None = None
        self._waiting: queue.SimpleQueue[tuple[Refusal, Callable[[], None]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            options: dict[str, Any] = {"poolclass": NullPool}
            if not self.settings.effective_database_url.startswith("sqlite"):
                # Written from the consumer's loop: an unreachable server must not stall it.
                options["connect_args"] = {"connect_timeout": 5}
            self._sessions = create_session_factory(create_db_engine(self.settings, **options))
        return self._sessions

    def record(self, refusal: Refusal, acknowledge: Callable[[], None]) -> None:
        """Record the refusal and acknowledge its message, now or once the database answers."""
        log.warning(
            "refused message %s of task %s: %s", refusal.task_id, refusal.task_name, refusal.reason
        )
        try:
            self.write(refusal)
        except Exception as exc:
            log.warning(
                "refused message %s not recorded yet, kept unacknowledged and retried: %s: %s",
                refusal.task_id,
                type(exc).__name__,
                exc,
            )
            self._retry_later(refusal, acknowledge)
            return
        acknowledge()

    def write(self, refusal: Refusal) -> None:
        """One attempt. Whatever the message held cannot fail it: a record the database refuses
        for its content (nothing known does) is written again without the message's part."""
        try:
            self._insert(refusal)
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            log.exception("refused message %s: kept without its payload", refusal.task_id)
            self._insert(refusal.without_payload(exc))

    def _insert(self, refusal: Refusal) -> None:
        with transaction(self.sessions) as session:
            recorded = None if refusal.task_id is None else session.get(Delivery, refusal.task_id)
            if recorded is not None:
                # Recorded already (its acknowledgement was lost): a redelivery, not a new row.
                return
            payload = (
                kept_payload(session, self.settings, refusal.payload)
                if refusal.replayable
                else refusal.payload
            )
            session.add(
                RejectedMessage(
                    task_name=refusal.task_name,
                    task_id=refusal.task_id,
                    reason=refusal.reason,
                    errors=refusal.errors,
                    payload=payload,
                )
            )
            record_delivery(
                session,
                task_id=refusal.task_id,
                task_name=refusal.task_name,
                outcome="rejected",
                detail=refusal.reason,
            )

    def _retry_later(self, refusal: Refusal, acknowledge: Callable[[], None]) -> None:
        self._waiting.put((refusal, acknowledge))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._retry_loop, name="crm-refusal-recorder", daemon=True
                )
                self._thread.start()

    def _retry_loop(self) -> None:
        pending: list[tuple[Refusal, Callable[[], None]]] = []
        pause = RECORD_RETRY_FIRST_S
        while True:
            if not pending:
                pending.append(self._waiting.get())
                pause = RECORD_RETRY_FIRST_S
            time.sleep(pause)
            while not self._waiting.empty():
                pending.append(self._waiting.get_nowait())
            still: list[tuple[Refusal, Callable[[], None]]] = []
            for refusal, acknowledge in pending:
                try:
                    self.write(refusal)
                except Exception as exc:
                    still.append((refusal, acknowledge))
                    log.warning(
                        "refused message %s still not recorded (%s: %s); next try in %.1f s",
                        refusal.task_id,
                        type(exc).__name__,
                        exc,
                        min(pause * 2, self.settings.retry_backoff_max_s),
                    )
                else:
                    log.info("refused message %s recorded", refusal.task_id)
                    self.call_soon(acknowledge)
            pending = still
            pause = min(pause * 2, float(self.settings.retry_backoff_max_s))


def _acknowledger(message: Any) -> Callable[[], None]:
    def acknowledge() -> None:
        if hasattr(message, "ack") and not message.acknowledged:
            # A message whose channel went away meanwhile is back on its queue already: its
            # redelivery finds the record and is acknowledged then.
            message.ack_log_error(log, (Exception,))

    return acknowledge


class RecordingConsumer(Consumer):
    """Celery's consumer, checking every message before Celery looks at it and recording every
    message it refuses before acknowledging it.

    Installed with the ``worker_consumer`` setting. The content type is checked before anything
    decodes the body, and the envelope (``workers.transport.envelope``) before anything is handed
    to a pool process: whatever arrives ends as an event, a rejection or a failure with a reason.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings: Settings = self.app.conf.crm_settings
        self.recorder = RefusalRecorder(settings, self.call_soon)
        self.accepted_content_type = accepted_content_type(settings)
        self.limits = Limits.of(
            settings, soft_time_limit(settings.task_time_limit_s), decompressed_limit(settings)
        )
        install_bounded_decompression(decompressed_limit(settings))
        if self.controller is not None:
            hand_off = self.controller._process_task
            guarded = guard_hand_off(self.controller, self.on_hand_off_error)
            handler: Any = getattr(self, "on_task_request", None)
            if handler == hand_off:  # a pool without a semaphore calls it directly
                self.on_task_request = guarded

    def on_hand_off_error(self, request: Any, exc: BaseException) -> None:
        reason = f"the worker could not hand it to a pool process: {type(exc).__name__}: {exc}"
        arguments = payload_of(request.task, tuple(request.args or ()), request.kwargs or {})
        self.refuse(request.message, reason[:1000], {"exception": type(exc).__name__}, arguments)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        celery_handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            content_type = message.content_type
            if content_type != self.accepted_content_type:
                reason = refused_content_reason(content_type, self.accepted_content_type)
                return self.refuse(message, reason, {"content_type": content_type})
            try:
                message.decode()
            except Exception as exc:
                return self.on_decode_error(message, exc)
            try:
                admit(message, self.app.tasks, self.limits, datetime.now(UTC))
            except Refused as refused:
                arguments: Any = _NOT_REPLAYABLE
                if refused.replayable and refused.args_kwargs is not None:
                    args, kwargs = refused.args_kwargs
                    task = self.app.tasks[refused.task_name]
                    arguments = payload_of(task, tuple(args), kwargs or {})
                refusal = Refusal.of(
                    message,
                    refused.reason,
                    refused.errors,
                    arguments,
                    task_name=refused.task_name,
                    task_id=refused.task_id,
                )
                return self.recorder.record(refusal, _acknowledger(message))
            try:
                return celery_handler(message)
            except Exception as exc:
                # What the envelope check let through and Celery still could not take.
                if message.acknowledged:
                    raise
                reason = f"not a task message: {type(exc).__name__}: {exc}"[:1000]
                return self.refuse(message, reason, {"exception": type(exc).__name__})

        return on_task_received

    def refuse(
        self,
        message: Any,
        reason: str,
        errors: dict[str, Any],
        arguments: Any = _NOT_REPLAYABLE,
    ) -> None:
        refusal = Refusal.of(message, reason, errors, arguments)
        self.recorder.record(refusal, _acknowledger(message))

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if self.accepted_content_type == SIGNED_CONTENT_TYPE:
            reason = f"the signature could not be verified: {exc}"
        else:
            content_type = getattr(message, "content_type", None)
            reason = f"the body could not be decoded as {content_type}: {type(exc).__name__}: {exc}"
        self.refuse(message, reason[:1000], {"exception": type(exc).__name__})

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        reason = f"not a valid task message: {type(exc).__name__}: {exc}"[:1000]
        self.refuse(message, reason, {"exception": type(exc).__name__})

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.refuse(message, "not a task message: it names no task", {})

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = _task_name(_header(message, "task"))
        self.refuse(message, f"no such task {name!r} on this worker", {})
