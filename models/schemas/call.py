"""``crm.call/1``: one status update of one call."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from models.schemas.common import (
    RAISE,
    Base64Bytes,
    Code,
    CodeList,
    ErpReferencesSchema,
    Integer,
    String,
    Text,
    Time,
)

SCHEMA = "crm.call/1"


class RecordingSchema(Schema):
    class Meta:
        unknown = RAISE

    url = fields.Url(schemes={"http", "https"}, allow_none=True)
    content_b64 = Base64Bytes(allow_none=True)
    media_type = Text(max_length=200, load_default="audio/mpeg")
    filename = Text(max_length=255, load_default=None, allow_none=True)

    @validates_schema
    def exactly_one_source(self, data: dict[str, Any], **_: Any) -> None:
        if bool(data.get("url")) == bool(data.get("content_b64")):
            raise ValidationError("give exactly one of url and content_b64")


class CallMessageSchema(ErpReferencesSchema):
    schema = String(required=True, validate=validate.Equal(SCHEMA))
    call_id = Text(required=True, max_length=200)
    # Unknown provider statuses are kept raw: never a reason to drop the call.
    status = Text(max_length=40, allow_none=True)
    direction = String(validate=validate.OneOf(["inbound", "outbound"]), allow_none=True)
    from_ = Text(data_key="from", max_length=64, allow_none=True)
    to = Text(max_length=64, allow_none=True)
    agent = Text(max_length=320, allow_none=True)
    started_at = Time(allow_none=True)
    answered_at = Time(allow_none=True)
    ended_at = Time(allow_none=True)
    duration_s = Integer(validate=validate.Range(min=0, max=7 * 24 * 3600), allow_none=True)
    sequence = Integer(validate=validate.Range(min=0), allow_none=True)
    recording = fields.Nested(RecordingSchema, allow_none=True)
    note = Text(max_length=100_000, allow_none=True)
    category = Code()
    class_ = Code(data_key="class")
    type = Code()
    properties = CodeList()
    customer_number = Text(max_length=40, allow_none=True)
