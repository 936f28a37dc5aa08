"""Logging setup shared by every process; secrets never reach a log line through settings' repr.

Log records carry the task id, task name, event id and seller of the work in hand: whoever does
the work says so once (``log_context``), and a filter adds it to every record logged meanwhile,
in the JSON form (``CRM_LOG_JSON``, python-json-logger) as fields, in the text form after the
message.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from config.settings import Settings

#: The fields a record may claim, in the order they are shown.
CONTEXT_FIELDS = ("task_name", "task_id", "event_id", "seller")
_context: ContextVar[dict[str, Any] | None] = ContextVar("crm_log_context", default=None)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Within the block, every record logged carries these fields (added to those in force)."""
    given = {k: v for k, v in fields.items() if v is not None}
    token = _context.set({**(_context.get() or {}), **given})
    try:
        yield
    finally:
        _context.reset(token)


def add_to_log_context(**fields: Any) -> None:
    """Add fields to the context of the block in force (what the work learnt: its event, its
    seller); outside a ``log_context`` block there is none, and nothing is kept."""
    current = _context.get()
    if current is not None:
        _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        shown = [f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if hasattr(record, k)]
        return f"{text} [{' '.join(shown)}]" if shown else text


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        from pythonjsonlogger.json import (
            JsonFormatter,  # only where asked for: a command starts sooner
        )

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                json_ensure_ascii=False,
            )
        )
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Alembic narrates every migration step at INFO; keep command output readable.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
