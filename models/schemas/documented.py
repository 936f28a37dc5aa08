"""The JSON Schemas of the messages (docs/schemas/), generated from the marshmallow schemas the
worker validates with, and the words of ``models.schemas.descriptions``.

``python -m models.schemas.documented docs/schemas`` writes them; a test keeps the committed files
equal to what this makes, and validates every example of docs/messages.md and examples/ against
them. The structure comes from the marshmallow schemas (apispec's converter, whose OpenAPI 3.1
output is JSON Schema 2020-12); what a schema-level rule of marshmallow says (exactly one of two
fields) is added here by hand, in ``RULES``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields

from models.schemas.common import Base64Bytes, Time
from models.schemas.descriptions import FIELDS, KINDS, MESSAGES
from models.schemas.kinds import MESSAGE_KINDS

DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: What marshmallow checks in a ``validates_schema`` rule, said in JSON Schema.
RULES: dict[str, dict[str, Any]] = {
    "crm.email/1": {
        "oneOf": [
            {"required": ["raw_b64"], "properties": {"raw_b64": {"type": "string"}}},
            {"required": ["raw_ref"], "properties": {"raw_ref": {"type": "string"}}},
        ]
    },
    "crm.document/1 event": {
        "if": {"required": ["kind"], "properties": {"kind": {"enum": ["call", "visit"]}}},
        "then": {
            "required": ["source_system"],
            "properties": {"source_system": {"type": "string", "minLength": 1}},
        },
    },
    "crm.call/1 recording": {
        "if": {"type": "object"},
        "then": {
            "oneOf": [
                {"required": ["url"], "properties": {"url": {"type": "string"}}},
                {"required": ["content_b64"], "properties": {"content_b64": {"type": "string"}}},
            ]
        },
    },
}
#: Times as the worker reads them: ISO 8601, an offset optional.
TIME_PATTERN = "^[0-9]{4}-?[0-9]{2}-?[0-9]{2}"
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def _plugin() -> MarshmallowPlugin:
    plugin = MarshmallowPlugin()
    APISpec(title="crm-events", version="1", openapi_version="3.1.0", plugins=[plugin])
    plugin.map_to_openapi_type(Base64Bytes, "string", None)
    plugin.map_to_openapi_type(Time, "string", None)
    return plugin


def _described(schema: dict[str, Any], field: fields.Field, text: str | None) -> dict[str, Any]:
    """A property with its words, and what its field kind adds (a pattern, an encoding)."""
    inner = field.inner if isinstance(field, fields.List) else field
    extra: dict[str, Any] = {}
    kind_text = None
    if isinstance(inner, Time):
        extra, kind_text = {"pattern": TIME_PATTERN}, KINDS["time"]
    elif isinstance(inner, Base64Bytes):
        extra = {"contentEncoding": "base64", "pattern": BASE64_PATTERN}
        kind_text = KINDS["base64"]
    target = schema["items"] if isinstance(field, fields.List) and "items" in schema else schema
    if "anyOf" not in target:
        target.update(extra)
    words = text or kind_text
    return {"description": words, **schema} if words else schema


def to_json_schema(
    plugin: MarshmallowPlugin, schema_cls: type[Schema], name: str, prefix: str = ""
) -> dict[str, Any]:
    """One marshmallow schema as JSON Schema, nested schemas inline, with their words."""
    assert plugin.converter is not None
    converted: dict[str, Any] = plugin.converter.schema2jsonschema(schema_cls)
    properties = converted.get("properties", {})
    for attribute, field in schema_cls().fields.items():
        wire = field.data_key or attribute
        path = f"{prefix}{wire}"
        nested = field.inner if isinstance(field, fields.List) else field
        if isinstance(nested, fields.Nested) and isinstance(nested.nested, type):
            list_of = isinstance(field, fields.List)
            inner = to_json_schema(
                plugin, nested.nested, name, f"{path}[]." if list_of else f"{path}."
            )
            rule = RULES.get(f"{name} {wire}")
            if rule:
                inner.update(rule)
                inner["type"] = ["object", "null"] if field.allow_none else "object"
            if list_of:
                item = {"type": ["array", "null"] if field.allow_none else "array", "items": inner}
                properties[wire] = item
            elif field.allow_none and not rule:
                properties[wire] = {"anyOf": [inner, {"type": "null"}]}
            else:
                properties[wire] = inner
        properties[wire] = _described(properties[wire], field, FIELDS.get(name, {}).get(path))
    return converted


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of one kind of message (``call``, ``party``, …)."""
    message = MESSAGE_KINDS[kind]
    plugin = _plugin()
    head = {
        "$schema": DIALECT,
        "title": message.schema_name,
        "description": MESSAGES[message.schema_name],
    }
    if message.variants:
        alternatives = []
        for variant, schema_cls in message.variants:
            alternative = to_json_schema(plugin, schema_cls, message.schema_name)
            alternative["title"] = f"{message.schema_name} {variant}"
            alternative["properties"]["kind"] = {"const": variant}
            alternatives.append(alternative)
        return {**head, "oneOf": alternatives}
    document = to_json_schema(plugin, message.schema, message.schema_name)
    document.update(RULES.get(message.schema_name, {}))
    return {**head, **document}


def file_name(kind: str) -> str:
    return MESSAGE_KINDS[kind].schema_name.replace("/", "-") + ".schema.json"


def rendered(kind: str) -> str:
    return json.dumps(json_schema(kind), indent=2, ensure_ascii=False) + "\n"


def write(folder: Path) -> list[Path]:
    written = []
    for kind in MESSAGE_KINDS:
        path = folder / file_name(kind)
        path.write_text(rendered(kind), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        print(path)
