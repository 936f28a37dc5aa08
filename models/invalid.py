"""Bad input: the one exception every stage, command and endpoint raises for a message or an
argument that is wrong in itself. Here rather than beside the message schemas so that a listing
can catch it without loading marshmallow and the schemas."""

from __future__ import annotations

from typing import Any


class MessageInvalid(Exception):
    """A message failed validation: bad input, recorded with its field errors, never retried."""

    #: What the rejection keeps instead of the message (None: the message itself); a message
    #: naming an erased person is kept without them (``tasks.erasure``).
    kept_instead: Any = None

    def __init__(self, reason: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors = errors or {}

    def kept(self, message: Any) -> Any:
        """What a rejection of ``message`` for this reason keeps of it."""
        return message if self.kept_instead is None else self.kept_instead


#: The name stages and commands use (``tasks.errors`` gives it too, beside the transient errors).
BadInput = MessageInvalid
