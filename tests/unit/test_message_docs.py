"""docs/messages.md and docs/schemas/ stay in step with the marshmallow message schemas."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from marshmallow import Schema, fields

from models.schemas import (
    CallMessageSchema,
    EmailMessageSchema,
    MessageInvalid,
    VisitMessageSchema,
    load_message,
    load_party_message,
)
from models.schemas.document import DocumentMessageSchema, load_document_message
from models.schemas.documented import file_name, json_schema, rendered
from models.schemas.kinds import MESSAGE_KINDS
from models.schemas.party import PARTY_SCHEMAS
from models.schemas.target import TargetMessageSchema, load_target_message
from models.schemas.task import TaskMessageSchema, load_task_message

DOCS = Path(__file__).resolve().parents[2] / "docs"
MESSAGES_MD = (DOCS / "messages.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```json (example|invalid)\n(.*?)^```", re.MULTILINE | re.DOTALL)

#: Message loaders by schema name without the version, so that a wrong version is still loaded.
LOADERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "crm.call": lambda m: load_message(CallMessageSchema(), m, "crm.call/1"),
    "crm.email": lambda m: load_message(EmailMessageSchema(), m, "crm.email/1"),
    "crm.visit": lambda m: load_message(VisitMessageSchema(), m, "crm.visit/1"),
    "crm.party": load_party_message,
    "crm.target": load_target_message,
    "crm.document": load_document_message,
    "crm.task": load_task_message,
}
JSON_SCHEMAS = {
    "crm.call-1.schema.json": CallMessageSchema,
    "crm.email-1.schema.json": EmailMessageSchema,
    "crm.visit-1.schema.json": VisitMessageSchema,
    "crm.target-1.schema.json": TargetMessageSchema,
    "crm.document-1.schema.json": DocumentMessageSchema,
    "crm.task-1.schema.json": TaskMessageSchema,
}


def doc_messages(label: str) -> list[Any]:
    blocks = [json.loads(body) for kind, body in BLOCK.findall(MESSAGES_MD) if kind == label]
    assert blocks, f"no ```json {label} block in docs/messages.md"
    return [item for block in blocks for item in (block if isinstance(block, list) else [block])]


def load(message: dict[str, Any]) -> dict[str, Any]:
    return LOADERS[message["schema"].partition("/")[0]](message)


@pytest.mark.parametrize("message", doc_messages("example"))
def test_documented_example_is_valid(message: dict[str, Any]) -> None:
    load(message)


@pytest.mark.parametrize("message", doc_messages("invalid"))
def test_documented_invalid_message_is_rejected_with_the_documented_reason(
    message: dict[str, Any],
) -> None:
    with pytest.raises(MessageInvalid) as rejected:
        load(message)
    assert rejected.value.reason in MESSAGES_MD


def assert_same_fields(json_schema: dict[str, Any], schema: Schema, where: str) -> None:
    """Same wire names and required fields, also in nested objects and lists of objects."""
    wire = {field.data_key or name: field for name, field in schema.fields.items()}
    assert json_schema["additionalProperties"] is False, where
    assert set(json_schema["properties"]) == set(wire), where
    assert set(json_schema.get("required", [])) == {k for k, f in wire.items() if f.required}, where
    for key, field in wire.items():
        inner = field.inner if isinstance(field, fields.List) else field
        if isinstance(inner, fields.Nested):
            nested = json_schema["properties"][key]
            nested = nested["items"] if isinstance(field, fields.List) else nested
            assert_same_fields(nested, inner.schema, f"{where}.{key}")


def read_schema(name: str) -> dict[str, Any]:
    json_schema: dict[str, Any] = json.loads((DOCS / "schemas" / name).read_text(encoding="utf-8"))
    assert json_schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert f"schemas/{name}" in MESSAGES_MD, f"docs/messages.md does not link {name}"
    return json_schema


@pytest.mark.parametrize("name", sorted(JSON_SCHEMAS))
def test_json_schema_has_the_marshmallow_fields(name: str) -> None:
    assert_same_fields(read_schema(name), JSON_SCHEMAS[name](), name)


def test_party_json_schema_has_the_marshmallow_fields_per_kind() -> None:
    variants = read_schema("crm.party-1.schema.json")["oneOf"]
    by_kind = {variant["properties"]["kind"]["const"]: variant for variant in variants}
    assert set(by_kind) == set(PARTY_SCHEMAS)
    for kind, schema_cls in PARTY_SCHEMAS.items():
        assert_same_fields(by_kind[kind], schema_cls(), f"party {kind}")


# -- the JSON Schemas are generated from the same source, and agree with the worker -----------


@pytest.mark.parametrize("kind", sorted(MESSAGE_KINDS))
def test_the_committed_json_schema_is_the_generated_one(kind: str) -> None:
    committed = (DOCS / "schemas" / file_name(kind)).read_text(encoding="utf-8")
    assert committed == rendered(kind), (
        f"docs/schemas/{file_name(kind)} is not what the schemas say: run"
        " `python -m models.schemas.documented docs/schemas`"
    )


def every_example() -> list[tuple[str, Any]]:
    """Every message in docs/messages.md and examples/, with where it comes from."""
    found = [
        (f"docs/messages.md ({label})", message)
        for label, body in BLOCK.findall(MESSAGES_MD)
        for message in (lambda d: d if isinstance(d, list) else [d])(json.loads(body))
    ]
    for path in sorted((DOCS.parent / "examples").rglob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        for message in document if isinstance(document, list) else [document]:
            if isinstance(message, dict) and "schema" in message:
                found.append((str(path.relative_to(DOCS.parent)), message))
    return found


@pytest.mark.parametrize(("where", "message"), every_example())
def test_an_example_is_valid_by_its_json_schema_exactly_when_the_worker_takes_it(
    where: str, message: dict[str, Any]
) -> None:
    kinds = {k.schema_name.partition("/")[0]: k for k in MESSAGE_KINDS.values()}
    kind = kinds[str(message["schema"]).partition("/")[0]]
    validator = jsonschema.Draft202012Validator(json_schema(kind.kind))
    problems = [error.message for error in validator.iter_errors(message)]
    try:
        kind.load(message)
        taken = True
    except MessageInvalid:
        taken = False
    assert (not problems) == taken, (where, problems[:3], taken)
