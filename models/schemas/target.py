"""``crm.target/1``: a weekly or monthly sales target for one seller, pushed by the ERP."""

from __future__ import annotations

from typing import Any

from marshmallow import fields, validate

from models.schemas.common import Day, MessageSchema, Text, load_message, no_nul

SCHEMA = "crm.target/1"
#: A target is a count of events; anything larger than this is a typo, not a target.
MAX_TARGET = 100_000


class TargetMessageSchema(MessageSchema):
    schema = fields.String(required=True, validate=validate.Equal(SCHEMA))
    seller = Text(required=True, max_length=100)
    category = fields.String(required=True, validate=[validate.Length(min=1, max=40), no_nul])
    kind = fields.String(required=True, validate=validate.OneOf(["weekly", "monthly"]))
    value = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=0, max=MAX_TARGET)
    )
    valid_from = Day(required=True)


def load_target_message(payload: Any) -> dict[str, Any]:
    return load_message(TargetMessageSchema(), payload, SCHEMA)
