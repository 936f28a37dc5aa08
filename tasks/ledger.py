"""How the ledger keeps a message that did not become an event: storable whatever it holds,
bounded in size, and whole again for a replay.

A rejected or failed message is kept so that a person can see what arrived and replay it after
a fix. Whatever the sender put in it, keeping it must not fail (a NUL, a lone surrogate, NaN or a
nesting no database takes), and it must not cost more than it is worth: a 50 MB email is not
copied into a JSON column. A payload whose JSON is over :data:`PAYLOAD_KEEP_CHARS` is kept as a
prefix with its size and SHA-256, and the whole of it goes to the document store (content
addressed, like every document), where ``crm-events replay`` finds it again.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sqlalchemy.orm import Session

from config.settings import Settings
from models.schemas.common import LONE_SURROGATE
from tasks.attach import read_blob, store_blob

#: Largest payload kept whole in a ledger row, in characters of its JSON.
PAYLOAD_KEEP_CHARS = 64 * 1024
#: Deeper nesting than any message of ours has; below it a value is kept as its (bounded) repr.
MAX_KEPT_DEPTH = 40
#: Longest text kept of a value that had to be shown as its repr.
REPR_KEEP_CHARS = 2000
#: The keys of a payload kept by reference (see :func:`kept_payload`).
KEPT_BY_REFERENCE = ("payload_sha256", "payload_size", "payload_prefix")


def json_safe(value: Any, depth: int = 0) -> Any:
    """A value as a JSON document any database keeps, whatever the sender put in it.

    PostgreSQL's JSONB cannot hold a NUL in a string, a lone surrogate or NaN/Infinity: NULs
    are shown as U+2400 (␀), lone surrogates as U+FFFD (�) and non-finite numbers as text.
    Nesting deeper than :data:`MAX_KEPT_DEPTH` is kept as its repr, so no input recurses deep.
    """
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\u2400")
        return value if value.isascii() else LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth >= MAX_KEPT_DEPTH:
        return json_safe(_short_repr(value))
    if isinstance(value, list | tuple):
        return [json_safe(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {str(json_safe(str(k))): json_safe(v, depth + 1) for k, v in value.items()}
    return json_safe(_short_repr(value))


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deep to show>"
    return text[:REPR_KEEP_CHARS]


def kept_payload(session: Session, settings: Settings, payload: Any) -> Any:
    """What a ledger row keeps of ``payload``: the payload itself when it is small, else its
    prefix, size and SHA-256, with the whole of it in the document store (in the caller's
    transaction)."""
    safe = json_safe(payload)
    text = json.dumps(safe, ensure_ascii=False, separators=(",", ":"))
    if len(text) <= PAYLOAD_KEEP_CHARS:
        return safe
    data = text.encode("utf-8")
    digest = store_blob(session, settings, data, "application/json")
    return {
        "payload_sha256": digest,
        "payload_size": len(data),
        "payload_prefix": text[:PAYLOAD_KEEP_CHARS],
    }


def kept_by_reference(payload: Any) -> bool:
    return isinstance(payload, dict) and set(KEPT_BY_REFERENCE) <= payload.keys()


def whole_payload(session: Session, settings: Settings, payload: Any) -> Any:
    """The payload a ledger row stands for: read back from the document store where it was
    kept by reference. Raises LookupError when those bytes are gone."""
    if not kept_by_reference(payload):
        return payload
    data = read_blob(session, settings, str(payload["payload_sha256"]))
    if data is None:
        raise LookupError(
            f"the payload's bytes (sha256 {payload['payload_sha256']}) are no longer stored"
        )
    return json.loads(data)
