"""The call lookups hand out copies of what they remember: a caller adds notes to its copy,
and the next call of the batch must not find them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tasks.classify import Classification
from tasks.match import PartyMatch


def filled(cls: type[Any]) -> Any:
    """An instance with no field at its default: a copy that forgot one would differ."""
    values: dict[str, Any] = {}
    for number, f in enumerate(dataclasses.fields(cls)):
        if f.type in ("int | None", "int"):
            values[f.name] = 100 + number
        elif f.type == "str":
            values[f.name] = f"value {number}"
        else:  # a list
            values[f.name] = [f"item {number}"]
    return cls(**values)


@pytest.mark.parametrize("cls", [PartyMatch, Classification])
def test_a_copy_is_equal_and_its_lists_are_its_own(cls: type[Any]) -> None:
    original = filled(cls)
    copy = original.copy()
    assert copy == original
    for f in dataclasses.fields(cls):
        value = getattr(copy, f.name)
        if isinstance(value, list):
            value.append("added by a caller")
            assert getattr(original, f.name) != value, f.name
