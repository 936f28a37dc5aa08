"""Files of messages and bodies posted as JSON: whatever they hold, a reason, never a crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.jsondoc import MAX_DEPTH, read_json
from workers.cli.bulk import messages_from_lines
from workers.publish import PublishError, messages_from_file

#: Deeper than Python's own JSON reader goes: it raises RecursionError, not ValueError.
TOO_DEEP_TO_READ = "[" * 100_000 + "]" * 100_000


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (TOO_DEEP_TO_READ, f"the JSON is nested deeper than {MAX_DEPTH} levels"),
        (nested(MAX_DEPTH + 1), f"the JSON is nested deeper than {MAX_DEPTH} levels"),
        ("{categories: [", "not JSON: Expecting property name enclosed in double quotes"),
        (b'{"subject": "\xe4"}', "not JSON: 'utf-8' codec can't decode byte 0xe4"),
        ("", "not JSON: Expecting value"),
    ],
)
def test_what_is_not_a_json_document_of_ours_is_refused_with_its_reason(
    data: str | bytes, reason: str
) -> None:
    with pytest.raises(ValueError) as refused:
        read_json(data)
    assert str(refused.value).startswith(reason)


def test_a_document_as_deep_as_a_message_may_be_is_read() -> None:
    assert read_json(nested(MAX_DEPTH)) == read_json(nested(MAX_DEPTH))
    document: Any = read_json('{"a": [{"b": 1}]}')
    assert document == {"a": [{"b": 1}]}


def test_a_line_nested_too_deep_is_reported_with_its_number_and_the_rest_are_read() -> None:
    text = "\n".join(
        [
            '{"schema": "crm.call/1", "call_id": "c-1"}',
            TOO_DEEP_TO_READ,
            nested(MAX_DEPTH + 1),
            '{"schema": "crm.call/1", "call_id": "c-2"}',
        ]
    )
    items, errors = messages_from_lines(text.encode(), "backfill.jsonl")
    assert [(i.source, i.kind) for i in items] == [
        ("backfill.jsonl:1", "call"),
        ("backfill.jsonl:4", "call"),
    ]
    assert [(e["line"], e["error"]) for e in errors] == [
        (2, f"the JSON is nested deeper than {MAX_DEPTH} levels"),
        (3, f"the JSON is nested deeper than {MAX_DEPTH} levels"),
    ]


def test_lines_end_at_line_ends_only_and_each_is_read_as_utf_8() -> None:
    """U+2028, U+2029 and U+0085 are letters in a JSON string (str.splitlines broke lines at
    them, and both halves were lost); a Latin-1 line is reported, not read with its letters
    replaced."""
    memo = json.dumps(
        {"schema": "crm.visit/1", "memo": "eka\u2028toka\u2029kolmas\x85neljäs"},
        ensure_ascii=False,
    ).encode()
    data = b"\r\n".join(
        [
            memo,
            '{"schema": "crm.visit/1", "memo": "Jääskeläinen"}'.encode("latin-1"),
            b'{"schema": "crm.call/1"}\r{"schema": "crm.call/1"}',
        ]
    )
    items, errors = messages_from_lines(data, "v.jsonl")
    assert [(i.source, i.kind) for i in items] == [
        ("v.jsonl:1", "visit"),
        ("v.jsonl:3", "call"),
        ("v.jsonl:4", "call"),
    ]
    assert items[0].message["memo"] == "eka\u2028toka\u2029kolmas\x85neljäs"
    [(line, error)] = [(e["line"], e["error"]) for e in errors]
    assert line == 2 and error.startswith("not JSON: 'utf-8' codec can't decode byte 0xe4")


def test_a_file_to_publish_nested_too_deep_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "deep.json"
    path.write_text(TOO_DEEP_TO_READ)
    with pytest.raises(PublishError) as refused:
        messages_from_file("call", path, settings=None)  # type: ignore[arg-type]
    assert str(refused.value) == f"{path}: the JSON is nested deeper than {MAX_DEPTH} levels"


def test_a_rejection_names_at_most_twenty_fields() -> None:
    """78,000 unknown fields made a 4 MB answer and a 4 MB row of the rejected list."""
    from models.invalid import MessageInvalid
    from models.schemas.call import SCHEMA, CallMessageSchema
    from models.schemas.common import load_message, shared_schema

    message: dict[str, Any] = {"schema": SCHEMA, "source_system": "pbx", "call_id": "c-1"}
    message.update({f"extra{i}": 1 for i in range(78_000)})
    message["x" * 5000] = 1
    with pytest.raises(MessageInvalid) as refused:
        load_message(shared_schema(CallMessageSchema), message, SCHEMA)
    errors = refused.value.errors
    assert len(errors) == 21 and errors["_more"] == ["77981 more field(s) with errors."]
    assert all(len(name) <= 100 for name in errors)
    assert len(refused.value.reason) < 2000
