"""Every kind of inbound message: its schema name, its marshmallow schema and how it is loaded.

The worker's stages, the HTTP service (which validates before it enqueues) and the OpenAPI
document read the same table, so a message is judged the same way wherever it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from marshmallow import Schema

from models.schemas import call, document, email, party, target, task, visit
from models.schemas.common import load_message


@dataclass(frozen=True)
class MessageKind:
    #: ``call``, ``email``, … (``crm-events publish KIND``)
    kind: str
    #: ``crm.call/1``, …
    schema_name: str
    #: The schema documented for the kind (a party has one per ``kind``: see ``variants``).
    schema: type[Schema]
    load: Callable[[Any], dict[str, Any]]
    #: Named variants of the message (a party's customer, contact and staff forms).
    variants: tuple[tuple[str, type[Schema]], ...] = ()


MESSAGE_KINDS: dict[str, MessageKind] = {
    "call": MessageKind(
        "call",
        call.SCHEMA,
        call.CallMessageSchema,
        lambda m: load_message(call.CallMessageSchema(), m, call.SCHEMA),
    ),
    "email": MessageKind(
        "email",
        email.SCHEMA,
        email.EmailMessageSchema,
        lambda m: load_message(email.EmailMessageSchema(), m, email.SCHEMA),
    ),
    "visit": MessageKind(
        "visit",
        visit.SCHEMA,
        visit.VisitMessageSchema,
        lambda m: load_message(visit.VisitMessageSchema(), m, visit.SCHEMA),
    ),
    "party": MessageKind(
        "party",
        party.SCHEMA,
        party.CustomerSchema,
        party.load_party_message,
        (
            ("customer", party.CustomerSchema),
            ("contact", party.ContactSchema),
            ("staff", party.StaffSchema),
        ),
    ),
    "target": MessageKind(
        "target",
        target.SCHEMA,
        target.TargetMessageSchema,
        target.load_target_message,
    ),
    "document": MessageKind(
        "document",
        document.SCHEMA,
        document.DocumentMessageSchema,
        document.load_document_message,
    ),
    "task": MessageKind("task", task.SCHEMA, task.TaskMessageSchema, task.load_task_message),
}
