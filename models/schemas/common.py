"""Shared pieces of the message schemas."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any, TypeVar

from marshmallow import RAISE, Schema, ValidationError, fields, missing, validate
from marshmallow.decorators import (
    POST_DUMP,
    POST_LOAD,
    PRE_DUMP,
    PRE_LOAD,
    VALIDATES,
    VALIDATES_SCHEMA,
)

from models.invalid import MessageInvalid


class DirectlyValidated(fields.Field):
    """A field that runs its validators in turn, as marshmallow's ``And`` does (every error
    kept, in order, with their keyword arguments), without building an ``And`` of them for
    each value it validates (a twelfth of a call update's load)."""

    def _validate(self, value: Any) -> None:
        errors: list[Any] = []
        kwargs: dict[str, Any] = {}
        for validator in self.validators:
            try:
                validator(value)
            except ValidationError as err:
                kwargs.update(err.kwargs)
                if isinstance(err.messages, dict):
                    errors.append(err.messages)
                else:
                    errors.extend(err.messages)
        if errors:
            raise ValidationError(errors, **kwargs)


class String(DirectlyValidated, fields.String):
    pass


class Integer(DirectlyValidated, fields.Integer):
    pass


class Base64Bytes(fields.Field):
    """Standard base64 text on the wire, ``bytes`` after loading."""

    default_error_messages = {  # noqa: RUF012
        "invalid": "Not valid base64.",
        "empty": "Empty content.",
    }

    def __init__(self, *, allow_empty: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allow_empty = allow_empty

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bytes:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        try:
            decoded = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
            raise self.make_error("invalid") from exc
        if not decoded and not self.allow_empty:
            raise self.make_error("empty")
        return decoded

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else base64.b64encode(value).decode("ascii")


#: Times and dates a message may carry. The ends of the calendar are refused: a time there may
#: not exist in UTC ("9999-12-31T23:59:59-12:00"), nor its week or month (DESIGN §7 periods).
EARLIEST = datetime(2, 1, 1)
LATEST = datetime(9998, 12, 31, 23, 59, 59)


class Time(DirectlyValidated, fields.DateTime):
    """An ISO 8601 time (offset optional) between the years 2 and 9998."""

    default_error_messages = {  # noqa: RUF012
        "range": "Not a time between the years 2 and 9998.",
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(format="iso", **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        moment: datetime = super()._deserialize(value, attr, data, **kwargs)
        try:
            utc = moment if moment.tzinfo is None else moment.astimezone(UTC)
        except (OverflowError, ValueError) as exc:
            raise self.make_error("range") from exc
        if not EARLIEST <= utc.replace(tzinfo=None) <= LATEST:
            raise self.make_error("range")
        return moment


def Day(**kwargs: Any) -> fields.Date:
    """An ISO 8601 date between the years 2 and 9998."""
    return fields.Date(
        validate=validate.Range(
            min=EARLIEST.date(),
            max=LATEST.date(),
            error="Not a date between the years 2 and 9998.",
        ),
        **kwargs,
    )


def no_nul(value: str) -> None:
    """PostgreSQL text cannot hold NUL; a NUL in a message is bad input, not a database error."""
    if "\x00" in value:
        raise ValidationError("Contains a NUL character.")


def Text(*, required: bool = False, max_length: int = 10_000, **kwargs: Any) -> String:
    return String(
        required=required,
        validate=[validate.Length(max=max_length, min=1 if required else 0), no_nul],
        **kwargs,
    )


def CodeList() -> fields.List:
    """Property codes; unknown ones are refused (noted) at classify, empty ones here."""
    return fields.List(String(validate=[validate.Length(min=1, max=40), no_nul]), allow_none=True)


def Code(**kwargs: Any) -> String:
    """A catalogue code; unknown codes pass validation and are refused (noted) at classify."""
    return String(validate=[validate.Length(min=1, max=40), no_nul], allow_none=True, **kwargs)


class MessageSchema(Schema):
    class Meta:
        unknown = RAISE

    source_system = Text(required=True, max_length=100)


#: The states a call or an email may be given (a visit may have any of ``STATES``).
DELIVERED_STATES = ("open", "done")


class ErpReferencesSchema(MessageSchema):
    """The ERP's project an event belongs to and the offer it concerns (optional, v1 additive):
    calls, visits and emails carry them alike; and the CRM status, open or done (a visit's
    schema widens it)."""

    project_number = Text(max_length=40, allow_none=True)
    project_name = Text(max_length=200, allow_none=True)
    offer_number = Text(max_length=40, allow_none=True)
    offer_url = fields.Url(schemes={"http", "https"}, allow_none=True)
    state = String(validate=validate.OneOf(DELIVERED_STATES), allow_none=True)


class AttachmentSchema(Schema):
    class Meta:
        unknown = RAISE

    filename = Text(required=True, max_length=1000)
    media_type = Text(max_length=200, load_default="application/octet-stream")
    content_b64 = Base64Bytes(required=True)


SchemaT = TypeVar("SchemaT", bound=Schema)


@cache
def shared_schema(schema_class: type[SchemaT]) -> SchemaT:
    """One instance of a message schema per process, reused for every message.

    Building a marshmallow schema deep-copies its declared fields: it cost a CDR import more
    than validating the row did. Loading and dumping keep no state in the instance.
    """
    return schema_class()


def fitted_schema(schema_class: type[SchemaT], payload: Any) -> SchemaT:
    """The schema for ``payload``: one that loads and dumps exactly as ``schema_class`` does,
    but walks only the fields the payload names and those every load needs (required ones and
    those with a default), not every field the schema declares.

    marshmallow visits each declared field for each message, present or not: a CDR row names
    13 of a call's 25, and the others cost a third of its validation. One instance per set of
    names, shared like ``shared_schema``'s; a payload of another set costs one construction.
    """
    if not isinstance(payload, dict):
        return shared_schema(schema_class)
    attribute_of = _attributes(schema_class)
    return _fitted(schema_class, frozenset(attribute_of[k] for k in payload if k in attribute_of))


@cache
def _attributes(schema_class: type[Schema]) -> dict[Any, str]:
    """Each declared field's attribute by its key in a message (``from`` -> ``from_``)."""
    return {f.data_key or name: name for name, f in shared_schema(schema_class).fields.items()}


@lru_cache(maxsize=128)
def _fitted(schema_class: type[SchemaT], named: frozenset[str]) -> SchemaT:
    declared = shared_schema(schema_class).fields
    # In the declared order: errors are then reported in the order the whole schema gives.
    wanted = tuple(
        name
        for name, f in declared.items()
        if name in named or f.required or f.load_default is not missing
    )
    if len(wanted) == len(declared):
        return shared_schema(schema_class)
    return schema_class(only=wanted)


def dump_loaded(schema: Schema, loaded: dict[str, Any]) -> dict[str, Any]:
    """``schema.dump(loaded)`` of what ``schema.load`` made: each present field's value through
    that field's own ``_serialize``, without marshmallow's generic access per field (the
    accessor, the dotted-path check, the default), a third of a dump's cost. A schema with
    anything that access serves (dump hooks or defaults, another attribute, a field that reads
    no attribute, an overridden accessor) is dumped by marshmallow itself."""
    plan = _dump_plan(schema)
    if plan is None:
        result: dict[str, Any] = schema.dump(loaded)
        return result
    dumped: dict[str, Any] = {}
    for attr, key, field_obj in plan:
        if attr in loaded:
            dumped[key] = field_obj._serialize(loaded[attr], attr, loaded)
    return dumped


@lru_cache(maxsize=256)
def _dump_plan(schema: Schema) -> tuple[tuple[str, str, fields.Field], ...] | None:
    """(attribute, key, field) for each dumped field, or None when ``dump_loaded`` must leave
    the dump to marshmallow."""
    if (
        schema.many
        or schema._hooks[PRE_DUMP]
        or schema._hooks[POST_DUMP]
        or type(schema).get_attribute is not Schema.get_attribute
    ):
        return None
    plan = []
    for name, field_obj in schema.dump_fields.items():
        attr = name if field_obj.attribute is None else field_obj.attribute
        if (
            not field_obj._CHECK_ATTRIBUTE
            or type(field_obj).serialize is not fields.Field.serialize
            or field_obj.dump_default is not missing
            or "." in attr
            or hasattr(dict, attr)  # a missing key would be read as the dict's attribute
        ):
            return None
        plan.append((attr, name if field_obj.data_key is None else field_obj.data_key, field_obj))
    return tuple(plan)


def load_valid(schema: Schema, payload: Any) -> Any:
    """``schema.load(payload)``, the way nearly every message goes: each field it names loaded
    by the field itself, without marshmallow's per-field error bookkeeping (an error store, a
    getter built per field, the hooks looked up), two fifths of a call update's load. A message
    with a key the schema does not know, or a value a field refuses, is loaded again by
    marshmallow, which then reports every error as it always does; a schema with anything
    that bookkeeping serves (load hooks, validators of its own, partial or lenient loading,
    another attribute path, an overridden ``load``) is left to marshmallow whole."""
    plan = _load_plan(schema)
    if plan is None or type(payload) is not dict:
        return schema.load(payload)
    keys, steps = plan
    if not payload.keys() <= keys:
        return schema.load(payload)
    loaded: dict[str, Any] = {}
    try:
        for data_key, attr, field_obj in steps:
            value = field_obj.deserialize(payload.get(data_key, missing), data_key, payload)
            if value is not missing:
                loaded[attr] = value
    except ValidationError:
        return schema.load(payload)
    return loaded


@lru_cache(maxsize=256)
def _load_plan(
    schema: Schema,
) -> tuple[frozenset[str], tuple[tuple[str, str, fields.Field], ...]] | None:
    """The keys ``schema`` takes and (key, attribute, field) for each field it loads, or None
    when ``load_valid`` must leave the load to marshmallow."""
    hooks = schema._hooks
    if (
        schema.many
        or schema.partial not in (None, False)
        or schema.unknown != RAISE
        or schema.dict_class is not dict
        or hooks[PRE_LOAD]
        or hooks[POST_LOAD]
        or hooks[VALIDATES]
        or hooks[VALIDATES_SCHEMA]
        or type(schema).load is not Schema.load
        or type(schema)._do_load is not Schema._do_load
        or type(schema)._deserialize is not Schema._deserialize
    ):
        return None
    steps = []
    for name, field_obj in schema.load_fields.items():
        attr = field_obj.attribute or name
        if "." in attr:
            return None  # marshmallow nests the value under the dotted path
        steps.append((name if field_obj.data_key is None else field_obj.data_key, attr, field_obj))
    return frozenset(key for key, _attr, _field in steps), tuple(steps)


def load_message(
    schema: Schema,
    payload: Any,
    expected_schema: str,
    *,
    carried: str | None = None,
    known_storable: bool = False,
) -> dict[str, Any]:
    """Validate ``payload`` against ``schema``; raise :class:`MessageInvalid` with every error.

    ``carried`` names a field holding messages of their own (a batch's), each validated in its
    turn: a value no database keeps in one of them rejects that one alone, not their carrier.
    ``known_storable``: the caller found every value storable (``storable``), for many
    messages at once.
    """
    if not isinstance(payload, dict):
        raise MessageInvalid(
            f"a {expected_schema} message must be a JSON object, got {type(payload).__name__}"
        )
    envelope = payload if carried is None else {k: v for k, v in payload.items() if k != carried}
    unstorable = [] if known_storable else unstorable_values(envelope)
    if unstorable:
        errors = {path: [problem] for path, problem in unstorable}
        raise MessageInvalid(_summarise(errors), errors)
    version = payload.get("schema")
    if version != expected_schema:
        raise MessageInvalid(
            f"schema must be {expected_schema!r}, got {version!r}",
            {"schema": [f"Must be {expected_schema!r}."]},
        )
    try:
        loaded: dict[str, Any] = load_valid(schema, payload)
    except ValidationError as exc:
        errors = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        errors = _capped(errors)
        raise MessageInvalid(_summarise(errors), errors) from exc
    return loaded


#: Fields a rejection names at most (a message of 78,000 unknown fields made a 4 MB answer and
#: a 4 MB row of the rejected list), and the characters of a field's name shown.
MAX_REPORTED_FIELDS = 20
MAX_FIELD_NAME = 100


def _capped(errors: dict[str, Any]) -> dict[str, Any]:
    """The first :data:`MAX_REPORTED_FIELDS` fields' errors (in name order), each name cut,
    and under ``_more`` how many fields more had one."""
    names = sorted(errors, key=str)
    if len(names) <= MAX_REPORTED_FIELDS and all(len(str(n)) <= MAX_FIELD_NAME for n in names):
        return errors
    capped = {str(name)[:MAX_FIELD_NAME]: errors[name] for name in names[:MAX_REPORTED_FIELDS]}
    if len(names) > MAX_REPORTED_FIELDS:
        capped["_more"] = [f"{len(names) - MAX_REPORTED_FIELDS} more field(s) with errors."]
    return capped


#: Where a message is walked for values no database can keep, it stops after this many.
MAX_REPORTED_VALUES = 20


def storable(payload: Any) -> bool:
    """Whether every value of ``payload`` can be kept (see ``unstorable_values``).

    Nearly every message holds none: C's encoder says so at a fraction of the walk's cost (a
    surrogate fails the UTF-8 encoding, a non-finite float ``allow_nan``). A batch asks once
    for all its messages, where asking for each would build an encoder for each.
    """
    try:
        json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError):
        return False  # the walk finds what it was, and where
    return True


def unstorable_values(payload: Any, path: str = "") -> list[tuple[str, str]]:
    """Paths of values that JSON can carry but no database text or JSON column can keep.

    Python's JSON reads ``NaN``, ``Infinity`` and lone UTF-16 surrogates (``"\\ud800"``); a
    message holding one would fail at the database (a hash, an insert) long after validation.
    They are bad input, reported here with their paths, which are shown ASCII-escaped so that
    the reason itself can always be stored.
    """
    if storable(payload):
        return []
    found: list[tuple[str, str]] = []
    stack: list[tuple[str, Any]] = [(path, payload)]
    while stack and len(found) < MAX_REPORTED_VALUES:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            found.append((where or "_schema", f"{value!r} is not a JSON number."))
        # isascii() reads a flag of the string: long ASCII values (base64) skip the scan.
        elif isinstance(value, str) and not value.isascii() and LONE_SURROGATE.search(value):
            found.append((where or "_schema", "Contains a lone UTF-16 surrogate."))
        elif isinstance(value, dict):
            for key, item in value.items():
                name = _escaped(str(key))
                child = f"{where}.{name}" if where else name
                if LONE_SURROGATE.search(str(key)):
                    found.append((child, "Field name contains a lone UTF-16 surrogate."))
                stack.append((child, item))
        elif isinstance(value, list):
            stack.extend(
                (f"{where}.{index}" if where else str(index), item)
                for index, item in enumerate(value)
            )
    return sorted(found)


#: A UTF-16 surrogate on its own: JSON carries it, no database text or JSON column keeps it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _escaped(name: str) -> str:
    return name.encode("ascii", "backslashreplace").decode("ascii")[:100]


def _summarise(errors: dict[str, Any]) -> str:
    parts = []
    for field_name, messages in sorted(errors.items()):
        text = messages if isinstance(messages, str) else _flatten(messages)
        parts.append(f"{field_name}: {text}")
    return "invalid message: " + "; ".join(parts)


def _flatten(messages: Any) -> str:
    if isinstance(messages, list):
        return " ".join(_flatten(m) for m in messages)
    if isinstance(messages, dict):
        return " ".join(f"{k}: {_flatten(v)}" for k, v in messages.items())
    return str(messages)
