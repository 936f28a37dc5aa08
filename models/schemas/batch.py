"""``crm.batch/1``: many messages of one kind in one task message, for backfills and bursts.

The batch itself is checked here (its kind, that it carries a list of at most
:data:`MAX_BATCH_MESSAGES` objects); each message in it is validated by its own kind's schema
when its turn comes, so one bad message is rejected alone and never sinks the others.
"""

from __future__ import annotations

from typing import Any

from marshmallow import fields, validate

from models.schemas.common import MessageSchema, load_message, shared_schema

SCHEMA = "crm.batch/1"
#: The kinds a batch may carry (each message still names its own schema).
BATCH_KINDS = ("call", "visit", "party", "target", "email")
#: Messages in one batch: enough to spread a transaction's cost, few enough that a batch that
#: must be redone (its worker killed) costs seconds, not minutes.
MAX_BATCH_MESSAGES = 1000


class BatchMessageSchema(MessageSchema):
    schema = fields.String(required=True, validate=validate.Equal(SCHEMA))
    kind = fields.String(required=True, validate=validate.OneOf(BATCH_KINDS))
    messages = fields.List(
        fields.Raw(),
        required=True,
        validate=validate.Length(min=1, max=MAX_BATCH_MESSAGES),
    )


def item_id(batch_id: str | None, index: int) -> str:
    """The id a batch's message is known by (its delivery row, its rejection, ``wait_for``)."""
    return f"{batch_id or 'batch'}/{index}"


def load_batch_message(payload: Any) -> dict[str, Any]:
    return load_message(shared_schema(BatchMessageSchema), payload, SCHEMA, carried="messages")
