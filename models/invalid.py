"""Bad input: the one exception every stage, command and endpoint raises for a message or an
argument that is wrong in itself. Here rather than beside the message schemas so that a listing
can catch it without loading marshmallow and the schemas."""

from __future__ import annotations

from typing import Any


class MessageInvalid(Exception):
    """A message failed validation: bad input, recorded with its field errors, never retried."""

    def __init__(self, reason: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors = errors or {}


#: The name stages and commands use (``tasks.errors`` gives it too, beside the transient errors).
BadInput = MessageInvalid
