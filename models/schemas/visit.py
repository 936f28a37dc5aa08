"""``crm.visit/1``: a customer visit reported by a field or calendar app."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from models.events import STATES
from models.schemas.common import (
    AttachmentSchema,
    Code,
    CodeList,
    ErpReferencesSchema,
    String,
    Text,
    Time,
)

SCHEMA = "crm.visit/1"


class VisitMessageSchema(ErpReferencesSchema):
    schema = fields.String(required=True, validate=validate.Equal(SCHEMA))
    visit_id = Text(required=True, max_length=200)
    seller = Text(required=True, max_length=320)
    customer_number = Text(max_length=40, allow_none=True)
    #: Contact references: email addresses or names of the customer's contacts.
    contacts = fields.List(Text(max_length=320), load_default=list)
    started_at = Time(required=True)
    ended_at = Time(allow_none=True)
    location = Text(max_length=500, allow_none=True)
    subject = Text(max_length=1000, allow_none=True)
    memo = Text(max_length=1_000_000, allow_none=True)
    #: Staff usernames or emails (participants) and customer people (contacts).
    attendees = fields.List(Text(max_length=320), load_default=list)
    attachments = fields.List(fields.Nested(AttachmentSchema), load_default=list)
    cancelled = fields.Boolean(load_default=False)
    #: Any CRM status: a visit may be booked (scheduled) or open as well as done; cancelled is
    #: the same as ``cancelled: true``.
    state = String(validate=validate.OneOf(STATES), allow_none=True)
    #: When the app last changed the visit: an update older than the one applied is ignored.
    updated_at = Time(allow_none=True)
    category = Code()
    class_ = Code(data_key="class")
    type = Code()
    properties = CodeList()

    @validates_schema
    def times_in_order(self, data: dict[str, Any], **_: Any) -> None:
        started: datetime | None = data.get("started_at")
        ended: datetime | None = data.get("ended_at")
        if not started or not ended:
            return
        comparable = (started.tzinfo is None) == (ended.tzinfo is None)
        if comparable and ended < started:
            raise ValidationError("ended_at is before started_at", "ended_at")
