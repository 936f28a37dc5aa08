"""``crm.task/1``: a work task on an event already stored (send the offer by Friday, call the
customer back), for a staff member, by a date; a later message with the same ``task_id`` changes
it or marks it done."""

from __future__ import annotations

from typing import Any

from marshmallow import fields, validate

from models.schemas.common import Day, MessageSchema, Text, load_message
from models.schemas.document import EventReferenceSchema

SCHEMA = "crm.task/1"


class TaskMessageSchema(MessageSchema):
    schema = fields.String(required=True, validate=validate.Equal(SCHEMA))
    task_id = Text(max_length=200, load_default=None)
    event = fields.Nested(EventReferenceSchema, required=True)
    title = Text(required=True, max_length=500)
    assignee = Text(max_length=320, load_default=None)
    due = Day(load_default=None)
    done = fields.Boolean(load_default=False)


def load_task_message(payload: Any) -> dict[str, Any]:
    return load_message(TaskMessageSchema(), payload, SCHEMA)
