"""The OpenAPI document of the service, generated from the marshmallow schemas the worker
validates with (apispec's MarshmallowPlugin), and a page that reads it: ``/openapi.json``,
``/docs``.

The message schemas are the worker's own (``models.schemas.kinds``); the answers are described
by the schemas below, which mirror the JSON the query functions return (``tasks.views``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from models.schemas.common import Base64Bytes, Time
from models.schemas.documented import json_schema
from models.schemas.kinds import MESSAGE_KINDS

# -- the answers ---------------------------------------------------------------------------------


class ProblemSchema(Schema):
    error = fields.String(required=True, metadata={"description": "What is wrong, in words."})
    index = fields.Integer(metadata={"description": "The message of a list that is wrong."})
    errors = fields.Dict(metadata={"description": "Field errors, by field path."})
    queued = fields.List(
        fields.String(), metadata={"description": "Task ids the broker took before it failed."}
    )


class AcceptedSchema(Schema):
    accepted = fields.Integer(required=True)
    task_ids = fields.List(
        fields.String(),
        required=True,
        metadata={"description": "One Celery task id per message, in the order posted."},
    )


class EnqueuedSchema(Schema):
    enqueued = fields.Integer(required=True)
    task_ids = fields.List(fields.String(), required=True)


class DocumentSchema(Schema):
    id = fields.Integer(metadata={"description": "Download: /v1/events/{event}/documents/{id}."})
    filename = fields.String()
    media_type = fields.String()
    size = fields.Integer()
    sha256 = fields.String(allow_none=True, metadata={"description": "null for a stub."})
    role = fields.String(metadata={"description": "attachment, memo, raw_message, photo, …"})
    note = fields.String()


class EventSchema(Schema):
    id = fields.Integer(required=True)
    source = fields.String(
        metadata={"description": "The system that sent it; for an email, its gateway."}
    )
    source_kind = fields.String(metadata={"description": "call, email, visit or meeting."})
    source_id = fields.String()
    category = fields.String()
    class_ = fields.String(data_key="class")
    type = fields.String()
    properties = fields.List(fields.String())
    customer_number = fields.String(allow_none=True)
    contact = fields.String(allow_none=True)
    contacts = fields.List(fields.String())
    link_state = fields.String(metadata={"description": "linked, unlinked or ambiguous."})
    seller = fields.String(allow_none=True)
    staff = fields.List(fields.String(), metadata={"description": "Staff involved."})
    occurred_at = fields.String(metadata={"format": "date-time"})
    ended_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    duration_s = fields.Integer(allow_none=True)
    project_number = fields.String(allow_none=True, metadata={"description": "The ERP's project."})
    project_name = fields.String(allow_none=True)
    offer_number = fields.String(
        allow_none=True, metadata={"description": "The offer it concerns."}
    )
    offer_url = fields.String(allow_none=True)
    state = fields.String(
        metadata={"description": "The CRM status (tila): open, scheduled, done or cancelled."}
    )
    direction = fields.String(allow_none=True)
    subject = fields.String(allow_none=True)
    body = fields.String(allow_none=True)
    location = fields.String(
        allow_none=True, metadata={"description": "Where a visit took place; null otherwise."}
    )
    status = fields.String(allow_none=True)
    documents = fields.List(fields.Nested(DocumentSchema))
    classification_note = fields.String()
    match_note = fields.String()


class EventPageSchema(Schema):
    events = fields.List(fields.Nested(EventSchema), required=True)
    next = fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "The cursor of the next page; null after the last one."},
    )


class CardSchema(Schema):
    card = fields.String(metadata={"description": "The card's title (Finnish)."})
    card_en = fields.String()
    key = fields.String(
        metadata={"description": "The category code, or class:<code> for a card of a class."}
    )
    category = fields.String(allow_none=True, metadata={"description": "Null on a class card."})
    class_ = fields.String(
        data_key="class", allow_none=True, metadata={"description": "Null on a category card."}
    )
    week = fields.String(metadata={"description": "ISO week, e.g. 2026-W48."})
    month = fields.String(metadata={"description": "Month, e.g. 2026-11."})
    count_week = fields.Integer()
    count_month = fields.Integer()
    events = fields.List(
        fields.Dict(), metadata={"description": "The latest 50 events of the week and month."}
    )
    more = fields.Boolean(metadata={"description": "More events in the periods than listed."})
    follow_ups = fields.List(fields.Dict())
    target = fields.Dict(allow_none=True)


class ProgressSchema(Schema):
    seller = fields.String()
    category = fields.String()
    period = fields.String()
    target = fields.Integer(allow_none=True)
    actual = fields.Integer()


class HistorySchema(Schema):
    customer_number = fields.String()
    name = fields.String()
    seller = fields.String(allow_none=True)
    contacts = fields.List(fields.Dict())
    staff = fields.List(fields.Dict())
    events = fields.List(fields.Nested(EventSchema))


# -- the document --------------------------------------------------------------------------------

PRODUCERS = {
    "/v1/calls": ("call", "CallMessage"),
    "/v1/visits": ("visit", "VisitMessage"),
    "/v1/parties": ("party", "PartyMessage"),
    "/v1/targets": ("target", "TargetMessage"),
    "/v1/emails": ("email", "EmailMessage"),
}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _json(description: str, schema: str | dict[str, Any]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema
    return {"description": description, "content": {"application/json": {"schema": ref}}}


READ: list[dict[str, list[str]]] = [{"bearer": []}, {"session": []}]
STANDARD = {
    "401": _problem("No token, or an unknown or revoked one."),
    "403": _problem("The token's scope does not allow this."),
}


def build_spec() -> APISpec:
    try:
        release = version("crm-events")
    except PackageNotFoundError:
        release = "0"
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="crm-events",
        version=release,
        openapi_version="3.1.0",
        plugins=[plugin],
        info={
            "description": "Post calls, visits, parties, targets and emails; read CRM events,"
            " their documents, customers' histories, sellers' views and target progress."
            " Messages are validated with the worker's own schemas before they are queued.",
        },
    )
    plugin.map_to_openapi_type(Base64Bytes, "string", "byte")
    plugin.map_to_openapi_type(Time, "string", "date-time")
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme(
        "session", {"type": "apiKey", "in": "cookie", "name": "crm_session"}
    )
    spec.components.security_scheme(
        "webhookSecret", {"type": "apiKey", "in": "header", "name": "X-CRM-Webhook-Secret"}
    )
    spec.components.security_scheme(
        "twilioSignature", {"type": "apiKey", "in": "header", "name": "X-Twilio-Signature"}
    )
    answers: tuple[tuple[str, type[Schema]], ...] = (
        ("Problem", ProblemSchema),
        ("Accepted", AcceptedSchema),
        ("Enqueued", EnqueuedSchema),
        ("Document", DocumentSchema),
        ("Event", EventSchema),
        ("EventPage", EventPageSchema),
        ("Card", CardSchema),
        ("Progress", ProgressSchema),
        ("History", HistorySchema),
    )
    for name, answer in answers:
        spec.components.schema(name, schema=answer)
    # The messages: the JSON Schemas of docs/schemas/, made from the worker's own schemas.
    for kind, component in PRODUCERS.values():
        document = {k: v for k, v in json_schema(kind).items() if k != "$schema"}
        spec.components.schema(component, component=document)
    for path, (kind, component) in PRODUCERS.items():
        one = {"$ref": f"#/components/schemas/{component}"}
        content: dict[str, Any] = {
            "application/json": {"schema": {"oneOf": [one, {"type": "array", "items": one}]}}
        }
        if kind == "email":
            content["message/rfc822"] = {"schema": {"type": "string", "format": "binary"}}
        spec.path(
            path=path,
            operations={
                "post": {
                    "tags": ["producers"],
                    "summary": f"Post {MESSAGE_KINDS[kind].schema_name} messages",
                    "description": "One message or a list. Every message is validated first:"
                    " one invalid message and nothing is queued.",
                    "security": [{"bearer": []}],
                    "requestBody": {"required": True, "content": content},
                    "responses": {
                        "202": _json("Queued: the broker has every message.", "Accepted"),
                        "400": _problem("A message is invalid (its index and field errors)."),
                        **STANDARD,
                        "413": _problem("Over the size limit."),
                        "415": _problem("Not JSON."),
                        "503": _problem("The broker did not take the messages; try again."),
                    },
                }
            },
        )
    filters = [
        ("customer", "The customer's number."),
        ("seller", "The seller's username."),
        ("class", "Class code (laji)."),
        ("type", "Type code (tyyppi)."),
        ("category", "Category code (kategoria)."),
        ("property", "Property code (ominaisuus)."),
        ("source", "The system that sent them (for an email, its gateway)."),
        ("source_kind", "call, email, visit or meeting."),
        ("project", "The ERP's project number."),
        ("offer", "The offer number."),
        ("state", "The CRM status: open, scheduled, done, cancelled (or kesken, sovittu...)."),
        ("since", "From this day (YYYY-MM-DD), in the configured zone."),
        ("until", "To this day, inclusive."),
        ("text", "Words in the subject or the text."),
        ("unlinked", "true: only unlinked and ambiguous events."),
        ("limit", "Events per page, 1-1000 (default 100)."),
        ("cursor", "The `next` of the previous page."),
    ]
    spec.path(
        path="/v1/events",
        operations={
            "get": {
                "tags": ["readers"],
                "summary": "Search events, newest first, a page at a time",
                "security": READ,
                "parameters": [
                    {"name": n, "in": "query", "schema": {"type": "string"}, "description": d}
                    for n, d in filters
                ],
                "responses": {"200": _json("A page of events.", "EventPage"), **STANDARD},
            }
        },
    )
    event_id = {"name": "event_id", "in": "path", "required": True, "schema": {"type": "integer"}}
    spec.path(
        path="/v1/events/{event_id}",
        operations={
            "get": {
                "tags": ["readers"],
                "summary": "One event, with its documents, participants and follow-ups",
                "security": READ,
                "parameters": [event_id],
                "responses": {
                    "200": _json("The event.", "Event"),
                    **STANDARD,
                    "404": _problem("No such event."),
                },
            }
        },
    )
    spec.path(
        path="/v1/events/{event_id}/documents/{document_id}",
        operations={
            "get": {
                "tags": ["readers"],
                "summary": "A document's bytes, with its media type and name",
                "security": READ,
                "parameters": [
                    event_id,
                    {
                        "name": "document_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The bytes; Content-Disposition names the file.",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **STANDARD,
                    "404": _problem("No such stored document of that event."),
                },
            }
        },
    )
    spec.path(
        path="/v1/customers/{number}/history",
        operations={
            "get": {
                "tags": ["readers"],
                "summary": "A customer's history: who on the staff, when, what about",
                "security": READ,
                "parameters": [
                    {"name": "number", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json("The history.", "History"),
                    **STANDARD,
                    "404": _problem("No such customer."),
                },
            }
        },
    )
    spec.path(
        path="/v1/sellers/{username}/view",
        operations={
            "get": {
                "tags": ["readers"],
                "summary": "A seller's cards (Myyjän näkymä) for a period",
                "security": READ,
                "parameters": [
                    {
                        "name": "username",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "period",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "An ISO week (2026-W48) or a month (2026-11); the view"
                        " as at its end. Default: now.",
                    },
                ],
                "responses": {
                    "200": _json(
                        "The cards.",
                        {"type": "array", "items": {"$ref": "#/components/schemas/Card"}},
                    ),
                    **STANDARD,
                    "404": _problem("No such staff member."),
                },
            }
        },
    )
    spec.path(
        path="/v1/targets/progress",
        operations={
            "get": {
                "tags": ["readers"],
                "summary": "Targets against actuals",
                "security": READ,
                "parameters": [
                    {"name": "seller", "in": "query", "schema": {"type": "string"}},
                    {"name": "period", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _json(
                        "One row per seller, category and period.",
                        {"type": "array", "items": {"$ref": "#/components/schemas/Progress"}},
                    ),
                    **STANDARD,
                },
            }
        },
    )
    spec.path(
        path="/v1/tasks",
        operations={
            "get": {
                "tags": ["readers"],
                "summary": "Work tasks, overdue first",
                "description": "As crm-events task list --json: each task with its event, "
                "assignee, due day, state and whether it is overdue.",
                "security": READ,
                "parameters": [
                    {"name": "assignee", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["open", "done", "all"]},
                    },
                ],
                "responses": {
                    "200": _json("The tasks.", {"type": "array", "items": {"type": "object"}}),
                    **STANDARD,
                },
            }
        },
    )
    spec.path(
        path="/v1/stream/sellers/{username}",
        operations={
            "get": {
                "tags": ["readers"],
                "summary": "Server-sent events: one `view` event each time the view changes",
                "security": READ,
                "parameters": [
                    {
                        "name": "username",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "An event stream (`ready`, then `view` events).",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **STANDARD,
                    "404": _problem("No such staff member."),
                },
            }
        },
    )
    webhook_answers = {
        "200": _json("Queued.", "Enqueued"),
        "400": _problem("Not a call update."),
        "503": _problem("The broker did not take it; try again."),
    }
    spec.path(
        path="/twilio/status",
        operations={
            "post": {
                "tags": ["webhooks"],
                "summary": "Twilio call status callbacks (form posts, signed)",
                "security": [{"twilioSignature": []}],
                "requestBody": {
                    "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}}
                },
                "responses": {**webhook_answers, "403": _problem("The signature does not match.")},
            }
        },
    )
    for path, summary, schema in (
        (
            "/calls",
            "crm.call/1 updates (one or a list)",
            {"$ref": "#/components/schemas/CallMessage"},
        ),
        (
            "/asterisk/cdr",
            "Asterisk CDRs, JSON objects of the Master.csv columns",
            {"type": "object"},
        ),
    ):
        spec.path(
            path=path,
            operations={
                "post": {
                    "tags": ["webhooks"],
                    "summary": summary,
                    "security": [{"webhookSecret": []}],
                    "requestBody": {
                        "content": {
                            "application/json": {
                                "schema": {"oneOf": [schema, {"type": "array", "items": schema}]}
                            }
                        }
                    },
                    "responses": {
                        **webhook_answers,
                        "401": _problem("The secret is missing or wrong."),
                    },
                }
            },
        )
    spec.path(
        path="/livez",
        operations={
            "get": {
                "tags": ["operations"],
                "summary": "200 while the process answers (no database or broker)",
                "responses": {"200": {"description": "Alive."}},
            }
        },
    )
    spec.path(
        path="/healthz",
        operations={
            "get": {
                "tags": ["operations"],
                "summary": "200 when the database and the broker answer",
                "responses": {"200": {"description": "Healthy."}, "503": {"description": "Not."}},
            }
        },
    )
    spec.path(
        path="/metrics",
        operations={
            "get": {
                "tags": ["operations"],
                "summary": "Prometheus text format",
                "responses": {
                    "200": {"description": "The figures.", "content": {"text/plain": {}}}
                },
            }
        },
    )
    return spec


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    document: dict[str, Any] = build_spec().to_dict()
    return document


async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(openapi_document())


async def docs_page(request: Request) -> HTMLResponse:
    from workers.gateways.http.pages import render

    document = openapi_document()
    operations = [
        {"path": path, "method": method.upper(), **operation}
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]
    schemas = {
        name: json.dumps(schema, indent=2, ensure_ascii=False)
        for name, schema in document["components"]["schemas"].items()
    }
    return render(
        request, "docs.html.j2", document=document, operations=operations, schemas=schemas
    )


ROUTES = [
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs_page, methods=["GET"]),
]
