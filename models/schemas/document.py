"""``crm.document/1``: documents added to an event that is already stored (a signed offer
scanned after the visit, the recording of a call sent later, a file for an email thread)."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from models.schemas.common import AttachmentSchema, MessageSchema, Text, load_message

SCHEMA = "crm.document/1"
#: Documents in one message; more go in further messages.
MAX_DOCUMENTS = 20
EVENT_KINDS = ("call", "email", "visit")


class EventReferenceSchema(Schema):
    """The event, as its sender knows it: a call by its system and call_id, a visit by its
    system and visit_id, an email by its Message-ID."""

    class Meta:
        unknown = RAISE

    kind = fields.String(required=True, validate=validate.OneOf(EVENT_KINDS))
    source_system = Text(max_length=100, load_default=None)
    id = Text(required=True, max_length=998)

    @validates_schema
    def system_for_calls_and_visits(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("kind") in ("call", "visit") and not data.get("source_system"):
            raise ValidationError(
                f"a {data['kind']} is named by its source_system and id", "source_system"
            )


class DocumentMessageSchema(MessageSchema):
    schema = fields.String(required=True, validate=validate.Equal(SCHEMA))
    event = fields.Nested(EventReferenceSchema, required=True)
    documents = fields.List(
        fields.Nested(AttachmentSchema),
        required=True,
        validate=validate.Length(min=1, max=MAX_DOCUMENTS),
    )
    note = Text(max_length=1000, allow_none=True)


def load_document_message(payload: Any) -> dict[str, Any]:
    return load_message(DocumentMessageSchema(), payload, SCHEMA)
