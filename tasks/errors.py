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

# Bad input (BadInput): stage code raises it for anything wrong with the message itself. It is
# models.invalid's, where code that reads only (the command line's listings) takes it from
# without loading the broker's and Redis's errors.
from models.invalid import BadInput, MessageInvalid

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
