"""Our fields run their validators without marshmallow's per-value ``And``: the same values
pass, and a refused one gets the same errors, in the same order, with the same details."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from marshmallow import ValidationError, fields, validate

from models.schemas.common import Integer, String, no_nul


def by_dict(value: Any) -> None:
    if value == "dict":
        raise ValidationError({"inner": ["Refused inside."]}, field_name="x")


def outcome(field: fields.Field, value: Any) -> Any:
    try:
        return ("passed", field.deserialize(value))
    except ValidationError as exc:
        return ("refused", exc.messages, exc.kwargs)


STRING_VALIDATORS: list[Callable[[Any], Any]] = [validate.Length(min=1, max=4), no_nul, by_dict]


@pytest.mark.parametrize("value", ["ok", "", "much too long\x00", "a\x00", "dict", None, 7])
def test_a_string_is_refused_as_marshmallow_refuses_it(value: Any) -> None:
    ours = String(validate=STRING_VALIDATORS, allow_none=True)
    theirs = fields.String(validate=STRING_VALIDATORS, allow_none=True)
    assert outcome(ours, value) == outcome(theirs, value)


@pytest.mark.parametrize("value", [0, 5, -1, 99, "3", "x"])
def test_an_integer_is_refused_as_marshmallow_refuses_it(value: Any) -> None:
    validators = [validate.Range(min=0, max=10), validate.OneOf([0, 3, 5, 99])]
    assert outcome(Integer(validate=validators), value) == outcome(
        fields.Integer(validate=validators), value
    )
