"""``crm.email/1``: a raw RFC 5322 message plus its SMTP envelope; the worker parses it."""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from models.schemas.common import Base64Bytes, ErpReferencesSchema, Text, Time

SCHEMA = "crm.email/1"


class EmailMessageSchema(ErpReferencesSchema):
    schema = fields.String(required=True, validate=validate.Equal(SCHEMA))
    raw_b64 = Base64Bytes(allow_none=True, allow_empty=False)
    #: SHA-256 of a raw message our own SMTP gateway already stored as a document.
    raw_ref = fields.String(validate=validate.Regexp(r"^[0-9a-f]{64}$"), allow_none=True)
    mail_from = Text(max_length=320, allow_none=True)
    rcpt_to = fields.List(Text(max_length=320), load_default=list)
    received_at = Time(allow_none=True)

    @validates_schema
    def exactly_one_source(self, data: dict[str, Any], **_: Any) -> None:
        if (data.get("raw_b64") is None) == (data.get("raw_ref") is None):
            raise ValidationError("give exactly one of raw_b64 and raw_ref", "raw_b64")
