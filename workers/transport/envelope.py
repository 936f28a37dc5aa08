"""The envelope check: what a task message must be before the worker hands it to a pool process.

Celery's consumer decodes a task message and pickles its headers and arguments to a pool
process. What it does not check can take the worker down with it: arguments nested a few hundred
levels deep pass the JSON decoder and then raise ``RecursionError`` while being pickled, after
the message took a pool slot that is never given back; a task id longer than the ledger's key
fails every record of the message; arguments that do not fit the task raise ``TypeError`` in
the pool, where Celery acknowledges the message with only a log line; a producer's
``timelimit`` header overrides the worker's limits and lets a message run past the broker's
visibility timeout; an ``expires`` in the past makes Celery drop the message unrecorded.

:func:`admit` runs in the consumer (``workers.transport.consumer.RecordingConsumer``) on every
message before Celery sees it. A message it refuses raises :class:`Refused` with a reason, and the
consumer records it as a rejected message before acknowledging it; a message it admits may have
had its own limits clamped to the worker's. The walk is iterative, so no input can make the
check itself recurse.

Both of Celery's protocols are read: version 2 (headers ``task`` and ``id``, body ``[args,
kwargs, embed]``, what Celery 4+ and celery-node send) and version 1 (everything in the body, as
gocelery sends it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from config.settings import Settings
from models.jsondoc import MAX_DEPTH, too_deep

#: The longest task id the ledger keeps (the key of ``delivery``, ``rejected_message`` …).
MAX_TASK_ID = 100
#: Celery logs and Flower shows these producer-given representations of the arguments.
MAX_REPR_CHARS = 1024
#: The headers of one message, counted as characters of their keys and values.
MAX_HEADER_CHARS = 64 * 1024
#: A producer's own links to other tasks: none of our tasks takes one.
LINKS = ("callbacks", "errbacks", "chain", "chord")
#: Headers Celery reads, and the types they must have (None always allowed).
STRING_HEADERS = ("root_id", "parent_id", "group", "shadow", "origin", "lang")


class Refused(Exception):
    """The message must not reach a pool process: record it with this reason."""

    def __init__(self, reason: str, errors: dict[str, Any] | None = None, *, field: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors = errors or {field: reason}
        #: The body decoded, and its arguments fit the task: a replay can send it again.
        self.replayable = False
        self.args_kwargs: tuple[list[Any], dict[str, Any]] | None = None
        #: The task name and id, where the message names them (protocol 1 does in its body).
        self.task_name: Any = None
        self.task_id: Any = None


@dataclass(frozen=True)
class Limits:
    """What a message may ask of this worker (from its settings)."""

    max_body_bytes: int
    hard_time_limit_s: float
    soft_time_limit_s: float
    #: How far ahead an ``eta`` may be: a message held longer than the broker's visibility
    #: timeout minus the time limit is delivered again to another worker while it waits.
    max_eta_ahead_s: float

    @classmethod
    def of(cls, settings: Settings, soft_time_limit_s: float, max_body_bytes: int) -> Limits:
        return cls(
            max_body_bytes=max_body_bytes,
            hard_time_limit_s=float(settings.task_time_limit_s),
            soft_time_limit_s=float(soft_time_limit_s),
            max_eta_ahead_s=float(settings.visibility_timeout_s - settings.task_time_limit_s),
        )


@dataclass
class Envelope:
    """The parts of a task message the worker acts on, from either protocol."""

    task_name: str
    task_id: Any
    args: Any
    kwargs: Any
    #: Where the request fields live: the headers (protocol 2) or the body (protocol 1).
    fields: dict[str, Any]
    links: dict[str, Any]


def admit(message: Any, tasks: Mapping[str, Any], limits: Limits, now: datetime) -> None:
    """Check a task message's envelope; raise :class:`Refused`, or return with its limits
    clamped. ``tasks`` is the app's task registry."""
    headers = message.headers
    if not isinstance(headers, dict):
        raise Refused("not a task message: its headers are not an object", field="headers")
    check_nesting(headers, "headers")
    size = _chars(headers)
    if size > MAX_HEADER_CHARS:
        raise Refused(
            f"the message's headers hold {size} characters; at most {MAX_HEADER_CHARS} are"
            " accepted",
            field="headers",
        )
    body = message.body
    body_size = len(body) if isinstance(body, bytes | bytearray | str) else 0
    if body_size > limits.max_body_bytes:
        raise Refused(
            f"the message body is {body_size} bytes; at most {limits.max_body_bytes} are"
            " accepted (the largest email, CRM_MAX_EMAIL_BYTES, base64-encoded)",
            field="body",
        )
    try:
        payload = message.decode()
    except Exception as exc:
        raise Refused(
            f"the body could not be decoded as {message.content_type}: {type(exc).__name__}: {exc}"[
                :1000
            ],
            field="body",
        ) from exc
    try:
        check_nesting(payload, "body")
    except Refused as refused:
        if isinstance(payload, dict):  # protocol 1 names its task and id at the top
            refused.task_name, refused.task_id = payload.get("task"), payload.get("id")
        raise
    envelope = read_envelope(headers, payload)
    try:
        _check(envelope, tasks, limits, now)
    except Refused as refused:
        refused.task_name, refused.task_id = envelope.task_name, envelope.task_id
        raise


def _check(envelope: Envelope, tasks: Mapping[str, Any], limits: Limits, now: datetime) -> None:
    # Celery's own tasks (celery.chain, celery.chord_unlock …) run other tasks: never from a
    # producer's message.
    task = None if envelope.task_name.startswith("celery.") else tasks.get(envelope.task_name)
    if task is None:
        raise Refused(
            f"no such task {envelope.task_name[:100]!r} on this worker",
            {},
            field="task",
        )
    check_arguments(task, envelope.args, envelope.kwargs)
    # From here on the body is a message the task could run: a refusal can be replayed.
    try:
        check_task_id(envelope.task_id)
        check_links(envelope.links)
        check_request_fields(envelope.fields, limits, now)
    except Refused as refused:
        refused.replayable = True
        refused.args_kwargs = (envelope.args, envelope.kwargs)
        raise


def read_envelope(headers: dict[str, Any], payload: Any) -> Envelope:
    if "task" in headers:
        name = headers["task"]
        if isinstance(payload, dict) and "args" in payload:
            # Celery's "hybrid": a protocol 1 body whose fields the headers override; the
            # headers are made the whole view, so what is clamped there is what Celery reads.
            for key in (*STRING_HEADERS, "id", "eta", "expires", "retries", "timelimit"):
                if key not in headers and key in payload:
                    headers[key] = payload[key]
            return _protocol_1(name, headers.get("id"), payload, headers)
        if not isinstance(payload, list | tuple) or len(payload) != 3:
            raise Refused(
                "not a task message: the body of a protocol 2 message is [args, kwargs, embed]",
                field="body",
            )
        args, kwargs, embed = payload
        if embed is None:
            embed = {}
        if not isinstance(embed, dict):
            raise Refused("not a task message: its embed part is not an object", field="body")
        return Envelope(_name(name), headers.get("id"), args, kwargs, headers, embed)
    if not isinstance(payload, dict) or "task" not in payload:
        raise Refused("not a task message: it names no task", {}, field="task")
    return _protocol_1(payload["task"], payload.get("id"), payload, payload)


def _protocol_1(
    name: Any, task_id: Any, payload: dict[str, Any], fields: dict[str, Any]
) -> Envelope:
    links = {key: payload.get(key) for key in ("callbacks", "errbacks", "chord")}
    return Envelope(
        _name(name),
        task_id,
        payload.get("args", []),
        payload.get("kwargs", {}),
        fields,
        links,
    )


def _name(name: Any) -> str:
    if not isinstance(name, str):
        raise Refused("not a task message: the task name is not a string", {}, field="task")
    return name


def check_nesting(value: Any, where: str) -> None:
    """Refuse containers nested deeper than :data:`MAX_DEPTH`, without recursing."""
    if too_deep(value):
        raise Refused(
            f"the message's {where} is nested deeper than {MAX_DEPTH} levels; no message of"
            " ours needs that many",
            field=where,
        )


def _chars(value: Any) -> int:
    """A bound on the size of a (shallow, already depth-checked) JSON value, in characters."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += len(item)
            for key, child in item.items():
                total += len(key) if isinstance(key, str) else 8
                stack.append(child)
        elif isinstance(item, list | tuple):
            total += len(item)
            stack.extend(item)
        else:
            total += 8
    return total


def check_task_id(task_id: Any) -> None:
    if not isinstance(task_id, str) or not task_id:
        raise Refused(f"the task id must be a non-empty string, not {_shown(task_id)}", field="id")
    if len(task_id) > MAX_TASK_ID:
        raise Refused(
            f"the task id is {len(task_id)} characters long; at most {MAX_TASK_ID} are accepted",
            field="id",
        )
    if not task_id.isprintable():
        raise Refused("the task id holds control or unprintable characters", field="id")


_signatures: dict[str, inspect.Signature] = {}


def check_arguments(task: Any, args: Any, kwargs: Any) -> None:
    """The arguments must be a list and an object that fit the task's parameters."""
    if not isinstance(args, list | tuple):
        raise Refused(f"the task's arguments must be a list, not {_shown(args)}", field="args")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise Refused(
            f"the task's keyword arguments must be an object, not {_shown(kwargs)}",
            field="kwargs",
        )
    signature = _signatures.get(task.name)
    if signature is None:
        signature = _signatures[task.name] = inspect.signature(task.run)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        parameters = ", ".join(signature.parameters)
        raise Refused(
            f"the arguments do not fit {task.name}({parameters}): {exc}"
            f" ({len(args)} positional, keywords {sorted(map(str, kwargs))[:10]})",
            field="args",
        ) from exc


def check_links(links: dict[str, Any]) -> None:
    given = sorted(name for name in LINKS if links.get(name))
    if given:
        raise Refused(
            f"links to other tasks ({', '.join(given)}) are not accepted: every message is"
            " one task whose outcome is recorded",
            field="embed",
        )


def check_request_fields(fields: dict[str, Any], limits: Limits, now: datetime) -> None:
    """Check the request fields Celery acts on, and clamp the message's own limits."""
    for name in STRING_HEADERS:
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise Refused(f"the {name!r} header must be a string, not {_shown(value)}", field=name)
    for name in ("argsrepr", "kwargsrepr"):
        value = fields.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise Refused(f"the {name!r} header must be a string, not {_shown(value)}", field=name)
        if len(value) > MAX_REPR_CHARS:
            fields[name] = value[: MAX_REPR_CHARS - 1] + "…"
    retries = fields.get("retries")
    if retries is not None and (
        isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10**6
    ):
        raise Refused(
            f"'retries' must be a whole number from 0, not {_shown(retries)}", field="retries"
        )
    check_eta(fields.get("eta"), limits, now)
    # Not honoured: a message that expired before a worker reached it would be dropped by
    # Celery with no record. Every message ends as an event, a rejection or a failure.
    if fields.get("expires") is not None:
        fields["expires"] = None
    fields["timelimit"] = clamped_time_limits(fields.get("timelimit"), limits)


def check_eta(eta: Any, limits: Limits, now: datetime) -> None:
    if eta is None:
        return
    if not isinstance(eta, str):
        raise Refused(f"'eta' must be an ISO 8601 time, not {_shown(eta)}", field="eta")
    try:
        when = datetime.fromisoformat(eta)
    except ValueError as exc:
        raise Refused(f"'eta' is not an ISO 8601 time: {eta[:60]!r}", field="eta") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # Celery's protocol 2 sends UTC
    ahead = (when - now).total_seconds()
    if ahead > limits.max_eta_ahead_s:
        raise Refused(
            f"'eta' {eta[:40]} is {ahead:.0f} s ahead; at most {limits.max_eta_ahead_s:.0f} s"
            " are accepted (CRM_VISIBILITY_TIMEOUT_S minus CRM_TASK_TIME_LIMIT_S): the broker"
            " would deliver it again while it waits. Publish it when it is due.",
            field="eta",
        )


def clamped_time_limits(timelimit: Any, limits: Limits) -> list[float | None]:
    """A producer's ``[hard, soft]`` time limits, never above the worker's own.

    Above them, a message could run past the broker's visibility timeout and be delivered to a
    second worker while the first still runs. Lower limits are the producer's to choose.
    """
    if timelimit is None:
        return [None, None]
    if not isinstance(timelimit, list | tuple) or len(timelimit) != 2:
        raise Refused(
            f"'timelimit' must be [hard, soft] seconds, not {_shown(timelimit)}",
            field="timelimit",
        )
    clamped: list[float | None] = []
    for value, ceiling in zip(
        timelimit, (limits.hard_time_limit_s, limits.soft_time_limit_s), strict=True
    ):
        if value is None:
            clamped.append(None)
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise Refused(
                f"'timelimit' must be [hard, soft] seconds, not {_shown(timelimit)}",
                field="timelimit",
            )
        clamped.append(min(float(value), ceiling) if value else None)
    return clamped


def _shown(value: Any) -> str:
    kind = type(value).__name__
    if isinstance(value, list | tuple | dict):
        return f"a {kind} of {len(value)}"
    text = repr(value)
    return f"{kind} {text[:60]}{'…' if len(text) > 60 else ''}"
