"""A schema fitted to the fields a message names (``fitted_schema``) loads, dumps and refuses
every message exactly as the whole schema does: the same values, the same normalised form (and
so the same ledger key), the same reasons in the same order."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    post_load,
    validates_schema,
)

from models.invalid import MessageInvalid
from models.schemas.call import SCHEMA as CALL
from models.schemas.call import CallMessageSchema
from models.schemas.common import (
    dump_loaded,
    fitted_schema,
    load_message,
    load_valid,
    shared_schema,
)
from models.schemas.document import DocumentMessageSchema
from models.schemas.email import EmailMessageSchema
from models.schemas.target import TargetMessageSchema
from models.schemas.task import TaskMessageSchema
from models.schemas.visit import SCHEMA as VISIT
from models.schemas.visit import VisitMessageSchema
from tests.fuzz.strategies import FUZZ_WORLD, messages

KINDS: dict[str, tuple[type[Schema], str]] = {
    "call": (CallMessageSchema, CALL),
    "visit": (VisitMessageSchema, VISIT),  # defaults (contacts, attendees) and a time check
}


def outcome(schema: Schema, payload: Any, expected: str) -> tuple[Any, ...]:
    try:
        loaded = load_message(schema, payload, expected)
    except MessageInvalid as exc:
        return ("refused", exc.reason, exc.errors)
    return ("loaded", loaded, schema.dump(loaded))


@pytest.mark.parametrize("kind", sorted(KINDS))
@given(data=st.data())
def test_a_fitted_schema_is_the_whole_schema_for_its_message(kind: str, data: Any) -> None:
    schema_class, expected = KINDS[kind]
    payload = data.draw(messages(kind, FUZZ_WORLD, st.just(b"")))
    fitted = fitted_schema(schema_class, payload)
    assert outcome(fitted, payload, expected) == outcome(
        shared_schema(schema_class), payload, expected
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
@given(data=st.data())
def test_dump_loaded_is_marshmallows_dump(kind: str, data: Any) -> None:
    """The shortcut past marshmallow's per-field access dumps what marshmallow dumps, key for
    key and in its order, for the whole schema and for the one fitted to the message."""
    schema_class, expected = KINDS[kind]
    payload = data.draw(messages(kind, FUZZ_WORLD, st.just(b"")))
    for schema in (fitted_schema(schema_class, payload), shared_schema(schema_class)):
        try:
            loaded = load_message(schema, payload, expected)
        except MessageInvalid:
            continue
        mine, theirs = dump_loaded(schema, loaded), schema.dump(loaded)
        assert list(mine.items()) == list(theirs.items())


class Hooked(Schema):
    name = fields.String()

    @post_dump
    def shout(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {**data, "name": str(data.get("name")).upper()}


class ReadsAnotherAttribute(Schema):
    name = fields.String(attribute="real_name")
    when = fields.String(dump_default="now")


def test_dump_loaded_leaves_what_it_does_not_copy_to_marshmallow() -> None:
    assert dump_loaded(Hooked(), {"name": "x"}) == Hooked().dump({"name": "x"})
    assert dump_loaded(Hooked(), {"name": "x"})["name"] == "X"
    loaded = {"real_name": "y"}
    assert dump_loaded(ReadsAnotherAttribute(), loaded) == {"name": "y", "when": "now"}


def test_a_cdr_row_walks_only_its_fields() -> None:
    row = {
        "schema": CALL,
        "source_system": "pbx-hki",
        "call_id": "1764144300.161",
        "status": "completed",
        "direction": "inbound",
        "from": "0401234567",
        "to": "201",
        "started_at": "2026-11-26T08:05:00+00:00",
    }
    fitted = fitted_schema(CallMessageSchema, row)
    assert set(fitted.load_fields) == {
        "schema",
        "source_system",
        "call_id",
        "status",
        "direction",
        "from_",
        "to",
        "started_at",
    }
    assert fitted is fitted_schema(CallMessageSchema, {**row, "call_id": "another"})
    # Unknown and misspelt keys stay unknown to it, as to the whole schema.
    with pytest.raises(MessageInvalid, match="from_: Unknown field"):
        load_message(
            fitted_schema(CallMessageSchema, {**row, "from_": "x"}), row | {"from_": 1}, CALL
        )


LOADED_KINDS: dict[str, type[Schema]] = {
    "call": CallMessageSchema,
    "visit": VisitMessageSchema,
    "email": EmailMessageSchema,
    "target": TargetMessageSchema,
    "document": DocumentMessageSchema,
    "task": TaskMessageSchema,
}


def marshmallow_outcome(load: Any, schema: Schema, payload: Any) -> tuple[Any, ...]:
    try:
        loaded = load(schema, payload)
    except ValidationError as exc:
        return ("refused", exc.messages)
    return ("loaded", list(loaded.items()))


@pytest.mark.parametrize("kind", sorted(LOADED_KINDS))
@given(data=st.data())
def test_load_valid_is_marshmallows_load(kind: str, data: Any) -> None:
    """The shortcut past marshmallow's per-field bookkeeping loads what marshmallow loads, key
    for key and in its order, and refuses what it refuses with the same errors, for the whole
    schema and for the one fitted to the message (near-valid and arbitrary messages)."""
    payload = data.draw(messages(kind, FUZZ_WORLD, st.just(b"")))
    schema_class = LOADED_KINDS[kind]
    for schema in (fitted_schema(schema_class, payload), shared_schema(schema_class)):
        assert marshmallow_outcome(load_valid, schema, payload) == marshmallow_outcome(
            Schema.load, schema, payload
        )


class Lenient(Schema):
    class Meta:
        unknown = EXCLUDE

    name = fields.String()


class Nesting(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(attribute="person.name")


class Checked(Schema):
    class Meta:
        unknown = RAISE

    low = fields.Integer()
    high = fields.Integer()

    @validates_schema
    def ordered(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("low", 0) > data.get("high", 0):
            raise ValidationError("low over high")

    @post_load
    def total(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {**data, "total": data.get("low", 0) + data.get("high", 0)}


def test_load_valid_leaves_what_it_does_not_copy_to_marshmallow() -> None:
    assert load_valid(Lenient(), {"name": "x", "other": 1}) == {"name": "x"}
    assert load_valid(Nesting(), {"name": "x"}) == {"person": {"name": "x"}}
    assert load_valid(Checked(), {"low": 1, "high": 2}) == {"low": 1, "high": 2, "total": 3}
    with pytest.raises(ValidationError, match="low over high"):
        load_valid(Checked(), {"low": 3, "high": 2})
    # An unknown key or a refused value: marshmallow's own errors, every one of them.
    call = CallMessageSchema()
    bad = {"schema": CALL, "source_system": "", "call_id": 5, "unknown": 1}
    with pytest.raises(ValidationError) as mine:
        load_valid(call, bad)
    with pytest.raises(ValidationError) as theirs:
        call.load(bad)
    assert mine.value.messages == theirs.value.messages
    assert set(mine.value.messages) == {"source_system", "call_id", "unknown"}
