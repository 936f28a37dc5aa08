"""What a task message shows outside the database: its kind, source and id, never its contents.

Celery shows a task's arguments wherever it speaks of the task: in the ``task-received`` event
that Flower lists, in the worker's log records (the ``data`` of a JSON record), in the failure
log of the pool process and, at DEBUG, in the pool's "Apply" line, whose arguments are the raw
message body. It takes them from the ``argsrepr`` and ``kwargsrepr`` headers that the producer
set, or from ``repr()`` of the arguments. A message of ours is a person's call, email or visit:
names, numbers, addresses, what was said.

:class:`SummarisedRequest`, the request class of every crm.* task, replaces both with a summary
made from the arguments themselves (``crm.email/1 from smtp-gateway, raw_b64 of 98304
characters``), whatever the producer sent, in whatever language; :class:`PoolArgumentsFilter`
drops the arguments from the pool's DEBUG line; :class:`SummarisingAMQP` gives our own producers'
messages the same summary. The message itself stays in the database (the
ledger, a rejection, a failure) for those allowed to read it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.app.amqp import AMQP
from celery.worker.request import Request

#: Fields shown as they are: which schema and system, and the sender's own ids (of calls,
#: visits, tasks, documents), none of which names a person.
SHOWN_FIELDS = (
    "kind",
    "call_id",
    "visit_id",
    "task_id",
    "customer_number",
    "event_id",
    "raw_ref",
    "period",
)
#: The longest id shown; an id is the sender's, and could be anything.
MAX_SHOWN_CHARS = 100
#: The longest summary of one message.
MAX_SUMMARY_CHARS = 400


def summarise_arguments(args: Any, kwargs: Any) -> tuple[str, str]:
    """(argsrepr, kwargsrepr): each argument summarised, see :func:`summarise`."""
    shown_args = (
        ", ".join(summarise(value) for value in args[:5])
        if isinstance(args, list | tuple)
        else summarise(args)
    )
    if isinstance(args, list | tuple) and len(args) > 5:
        shown_args += f", and {len(args) - 5} more"
    if isinstance(kwargs, dict):
        shown_kwargs = ", ".join(
            f"{_clip(str(key))}={summarise(value)}" for key, value in list(kwargs.items())[:5]
        )
    else:
        shown_kwargs = summarise(kwargs)
    return f"({shown_args})", f"{{{shown_kwargs}}}"


def summarise(value: Any) -> str:
    """One argument, without its personal contents.

    A message (an object): its ``schema``, ``source_system`` and ids; every other field by name
    and size only (``raw_b64 of 98304 characters``, ``messages: 500``). A number, a boolean or
    null as it is (a seller's id, a flag); any other text or list by its length.
    """
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return f"<text of {len(value)} characters>"
    if isinstance(value, list | tuple):
        return f"<list of {len(value)}>"
    if not isinstance(value, dict):
        return f"<{type(value).__name__}>"
    schema = value.get("schema")
    head = _clip(schema) if isinstance(schema, str) else "a message"
    source = value.get("source_system")
    if isinstance(source, str):
        head += f" from {_clip(source)}"
    parts = [
        f"{name} {_clip(shown)}"
        for name in SHOWN_FIELDS
        if isinstance(shown := value.get(name), str | int) and not isinstance(shown, bool)
    ]
    messages = value.get("messages")
    if isinstance(messages, list):
        parts.append(f"{len(messages)} messages")
    raw = value.get("raw_b64")
    if isinstance(raw, str):
        parts.append(f"raw_b64 of {len(raw)} characters")
    text = head + (": " + ", ".join(parts) if parts else "")
    return text[:MAX_SUMMARY_CHARS]


def _clip(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 1] + "…"


class SummarisedRequest(Request):
    """Celery's request, showing its arguments summarised (the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        argsrepr, kwargsrepr = summarise_arguments(self._args, self._kwargs)
        self._argsrepr, self._kwargsrepr = argsrepr, kwargsrepr
        # The pool process logs a failure with the request's own copy (celery.app.trace).
        self._request_dict["argsrepr"] = argsrepr
        self._request_dict["kwargsrepr"] = kwargsrepr


class SummarisingAMQP(AMQP):
    """Our producers' messages carry the summary as their ``argsrepr``: Celery's ``task-sent``
    event and the broker's copy of the headers show no more than the worker will."""

    def as_task_v2(
        self,
        task_id: Any,
        name: Any,
        args: Any = None,
        kwargs: Any = None,
        *rest: Any,
        **options: Any,
    ) -> Any:
        options["argsrepr"], options["kwargsrepr"] = summarise_arguments(args or (), kwargs or {})
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)


class PoolArgumentsFilter(logging.Filter):
    """The pool's DEBUG line "TaskPool: Apply <target> (args:… kwargs:…)" without the
    arguments: they are the task's request and its raw message body."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name == "celery.pool"
            and isinstance(record.msg, str)
            and record.msg.startswith("TaskPool: Apply")
            and isinstance(record.args, tuple)
            and record.args
        ):
            record.msg = "TaskPool: Apply %s (arguments not logged)"
            record.args = (record.args[0],)
        return True


POOL_ARGUMENTS_FILTER = PoolArgumentsFilter()
