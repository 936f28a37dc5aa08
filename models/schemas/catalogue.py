"""The classification settings as a document (``crm-events catalogue export`` / ``apply``)."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from models.schemas.common import MessageInvalid, Text, _summarise

#: A code is a word: letters (any alphabet), digits, "_", "-" and "." and nothing else. It is
#: typed in filters (--class, ?category=), shown in tables and put into addresses, where a
#: space, a control character or an escape sequence would break or forge what is shown.
CODE = validate.Regexp(
    r"^[\w.-]+\Z", error="A code is letters, digits, '_', '-' and '.', with no space."
)


def _code(required: bool = True) -> fields.String:
    return fields.String(required=required, validate=[validate.Length(min=1, max=40), CODE])


class NamedEntrySchema(Schema):
    """A class, type or property: a new one needs both names, a change names what it changes."""

    class Meta:
        unknown = RAISE

    code = _code()
    fi = Text(max_length=200)
    en = Text(max_length=200)


class CategoryEntrySchema(Schema):
    class Meta:
        unknown = RAISE

    code = _code()
    fi = Text(max_length=200)
    en = Text(max_length=200)
    default_class = _code(required=False)
    default_type = _code(required=False)
    allow_selection = fields.Boolean(truthy={True}, falsy={False})
    sales_target = fields.Boolean(truthy={True}, falsy={False})


class CatalogueDocumentSchema(Schema):
    class Meta:
        unknown = RAISE

    classes = fields.List(fields.Nested(NamedEntrySchema), load_default=list)
    types = fields.List(fields.Nested(NamedEntrySchema), load_default=list)
    properties = fields.List(fields.Nested(NamedEntrySchema), load_default=list)
    categories = fields.List(fields.Nested(CategoryEntrySchema), load_default=list)


def load_catalogue_document(document: Any) -> dict[str, Any]:
    """The document validated, or :class:`MessageInvalid` naming every field that is wrong."""
    if not isinstance(document, dict):
        raise MessageInvalid("a catalogue document is a JSON object")
    try:
        loaded: dict[str, Any] = CatalogueDocumentSchema().load(document)
    except ValidationError as exc:
        errors = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise MessageInvalid(
            _summarise(errors).replace("invalid message", "invalid catalogue document", 1), errors
        ) from exc
    return loaded
