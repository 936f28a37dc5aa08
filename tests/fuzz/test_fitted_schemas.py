"""A schema fitted to the fields a message names (``fitted_schema``) loads, dumps and refuses
every message exactly as the whole schema does: the same values, the same normalised form (and
so the same ledger key), the same reasons in the same order."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from marshmallow import Schema, fields, post_dump

from models.invalid import MessageInvalid
from models.schemas.call import SCHEMA as CALL
from models.schemas.call import CallMessageSchema
from models.schemas.common import dump_loaded, fitted_schema, load_message, shared_schema
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
