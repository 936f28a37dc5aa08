"""``crm.party/1``: upserts of customers, contacts and staff pushed by the ERP."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate

from config.settings import known_zone
from models.schemas.common import MessageInvalid, MessageSchema, Text, load_message

SCHEMA = "crm.party/1"


def _known_zone(value: str) -> None:
    try:
        known_zone(value)
    except ValueError as exc:
        raise ValidationError(f"Unknown time zone {value[:64]!r}.") from exc


class _PartySchema(MessageSchema):
    schema = fields.String(required=True, validate=validate.Equal(SCHEMA))
    kind = fields.String(required=True)


class CustomerSchema(_PartySchema):
    customer_number = Text(required=True, max_length=40)
    name = Text(required=True, max_length=300)
    email_domains = fields.List(Text(max_length=255), load_default=list)
    phones = fields.List(Text(max_length=64), load_default=list)
    seller = Text(max_length=100, allow_none=True)


class ContactSchema(_PartySchema):
    customer_number = Text(required=True, max_length=40)
    name = Text(required=True, max_length=300)
    email = fields.Email(allow_none=True)
    #: Further addresses of the contact; ``email`` stays the primary one and the natural key.
    emails = fields.List(fields.Email(validate=[validate.Length(max=320)]), load_default=list)
    phones = fields.List(Text(max_length=64), load_default=list)


class StaffSchema(_PartySchema):
    username = Text(required=True, max_length=100)
    name = Text(required=True, max_length=200)
    email = fields.Email(allow_none=True)
    phones = fields.List(Text(max_length=64), load_default=list)
    extension = Text(max_length=20, allow_none=True)
    role = fields.String(validate=validate.OneOf(["seller", "manager"]), load_default="seller")
    manager = Text(max_length=100, allow_none=True)
    time_zone = fields.String(validate=_known_zone, load_default="Europe/Helsinki")
    active = fields.Boolean(load_default=True)


PARTY_SCHEMAS: dict[str, type[Schema]] = {
    "customer": CustomerSchema,
    "contact": ContactSchema,
    "staff": StaffSchema,
}


def load_party_message(payload: Any) -> dict[str, Any]:
    kind = payload.get("kind") if isinstance(payload, dict) else None
    schema_cls = PARTY_SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema_cls is None:
        raise MessageInvalid(
            f"kind must be one of customer, contact, staff; got {kind!r}",
            {"kind": ["Must be one of: customer, contact, staff."]},
        )
    return load_message(schema_cls(), payload, SCHEMA)
