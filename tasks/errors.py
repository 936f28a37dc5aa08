"""The error taxonomy of the pipeline, declared as data (CONVENTIONS §5).

- bad input: :class:`BadInput`; recorded as a rejected message with its reason, never retried;
- transient: the exception types in :data:`TRANSIENT_ERRORS`; retried with backoff and jitter a
  bounded number of times, then recorded as a failed message;
- anything else is a bug: recorded as a failed message and raised, loudly.
"""

from __future__ import annotations

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc

from models.schemas.common import MessageInvalid

#: Bad input. Stage code raises it for anything wrong with the message itself.
BadInput = MessageInvalid

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    # Lost connections, lock timeouts, "database is locked", serialisation failures.
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    # Two workers inserting the same natural key at once: the retry finds the winner's row.
    sqlalchemy.exc.IntegrityError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
    ConnectionError,
    TimeoutError,
)

__all__ = ["TRANSIENT_ERRORS", "BadInput", "MessageInvalid"]
