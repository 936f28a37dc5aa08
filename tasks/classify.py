"""Classify stage: category, then class and type from it, properties; and why (DESIGN §7).

An unknown category, class, type or property code never loses the event: it is classified as if
the code were absent and the refusal is noted on the event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config.catalogue import SOURCE_DEFAULT_CATEGORY
from models.catalogue import Category, EventClass, EventProperty, EventType
from models.db import table_of
from models.events import CrmEvent


@dataclass
class Classification:
    category: str
    class_code: str
    type_code: str
    properties: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def copy(self) -> Classification:
        """A copy whose lists are its own (``dataclasses.replace`` costs three times more)."""
        return Classification(
            category=self.category,
            class_code=self.class_code,
            type_code=self.type_code,
            properties=list(self.properties),
            notes=list(self.notes),
        )

    @property
    def note(self) -> str:
        return "; ".join(self.notes)

    def apply_to(self, event: CrmEvent) -> None:
        """Give ``event`` this category, class, type and note (its properties: set_properties)."""
        event.category_code = self.category
        event.class_code = self.class_code
        event.type_code = self.type_code
        event.classification_note = self.note


@dataclass(frozen=True)
class ClassificationRequest:
    source_kind: str
    category: str | None = None
    class_code: str | None = None
    type_code: str | None = None
    properties: tuple[str, ...] = ()
    #: A category chosen by a rule (plus-address, …) when the message names none.
    rule_category: str | None = None
    rule_reason: str = ""


#: The catalogue's categories as plain rows: read for every classified message.
_CATEGORIES = select(
    table_of(Category).c.code,
    table_of(Category).c.default_class,
    table_of(Category).c.default_type,
    table_of(Category).c.allow_selection,
)


def classify(session: Session, request: ClassificationRequest) -> Classification:
    categories = {c.code: c for c in session.execute(_CATEGORIES)}
    notes: list[str] = []
    category: Any = None  # a row of _CATEGORIES
    if request.category:
        category = categories.get(request.category)
        if category is None:
            notes.append(f"unknown category {request.category!r} refused")
        else:
            notes.append(f"category {category.code} given by the message")
    if category is None and request.rule_category:
        category = categories.get(request.rule_category)
        if category is not None:
            notes.append(f"category {category.code} by rule: {request.rule_reason}")
    if category is None:
        default = SOURCE_DEFAULT_CATEGORY[request.source_kind]
        category = categories[default]
        notes.append(f"category {default}: default for {request.source_kind}")

    class_code, type_code = category.default_class, category.default_type
    for label, wanted, model in (
        ("class", request.class_code, EventClass),
        ("type", request.type_code, EventType),
    ):
        default = class_code if label == "class" else type_code
        if not wanted or wanted == default:
            continue
        if not category.allow_selection:
            notes.append(
                f"{label} {wanted!r} refused: category {category.code} does not allow selection"
                f" (kept {default})"
            )
        elif session.get(model, wanted) is None:
            notes.append(f"unknown {label} {wanted!r} refused (kept {default})")
        else:
            notes.append(f"{label} {wanted} chosen by the message")
            if label == "class":
                class_code = wanted
            else:
                type_code = wanted

    properties = _known_properties(session, request.properties, notes)
    return Classification(category.code, class_code, type_code, properties, notes)


def _known_properties(session: Session, wanted: Iterable[str], notes: list[str]) -> list[str]:
    wanted = list(wanted)
    if not wanted:  # most messages ask for none: no query then
        return []
    known = set(session.scalars(select(EventProperty.code)))
    result: list[str] = []
    for code in wanted:
        if code in known:
            if code not in result:
                result.append(code)
        else:
            notes.append(f"unknown property {code!r} refused")
    return sorted(result)
