"""The classification settings as a document: show, export, and apply with a dry run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.catalogue import Category, EventClass, EventProperty, EventType
from models.schemas.catalogue import load_catalogue_document
from tasks.errors import BadInput

#: One of the code-and-names models (a type variable, so helpers keep the concrete class).
Named = TypeVar("Named", bound=EventClass | EventType | EventProperty)

NAMED: tuple[tuple[str, type[EventClass] | type[EventType] | type[EventProperty]], ...] = (
    ("classes", EventClass),
    ("types", EventType),
    ("properties", EventProperty),
)
SINGULAR = {"classes": "class", "types": "type", "properties": "property"}
CATEGORY_FIELDS = ("fi", "en", "default_class", "default_type", "allow_selection", "sales_target")


def catalogue_document(session: Session) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, model in NAMED:
        document[key] = _named_document(session, model)
    document["categories"] = [
        {
            "code": c.code,
            "fi": c.name_fi,
            "en": c.name_en,
            "default_class": c.default_class,
            "default_type": c.default_type,
            "allow_selection": c.allow_selection,
            "sales_target": c.sales_target,
        }
        for c in session.scalars(select(Category).order_by(Category.position, Category.code))
    ]
    return document


def _named_document(session: Session, model: type[Named]) -> list[dict[str, Any]]:
    return [
        {"code": row.code, "fi": row.name_fi, "en": row.name_en}
        for row in session.scalars(select(model).order_by(model.code))
    ]


def _apply_named(
    session: Session,
    key: str,
    model: type[Named],
    items: Iterable[dict[str, Any]],
    changes: list[str],
) -> None:
    """Add or rename the ``key`` entries (classes, types or properties), noting each change."""
    for item in items:
        row = session.get(model, item["code"])
        if row is None:
            missing = [name for name in ("fi", "en") if not item.get(name)]
            if missing:
                raise BadInput(f"new {SINGULAR[key]} {item['code']} needs {' and '.join(missing)}")
            session.add(model(code=item["code"], name_fi=item["fi"], name_en=item["en"]))
            changes.append(f"add {SINGULAR[key]} {item['code']}")
            continue
        for attr, field_name in (("name_fi", "fi"), ("name_en", "en")):
            if field_name in item and getattr(row, attr) != item[field_name]:
                old, new = getattr(row, attr), item[field_name]
                changes.append(f"{model.__tablename__} {row.code}: {field_name} {old!r} -> {new!r}")
                setattr(row, attr, item[field_name])


def apply_catalogue(session: Session, document: dict[str, Any]) -> list[str]:
    """Add or change what the document says (nothing is deleted); returns the changes."""
    document = load_catalogue_document(document)
    changes: list[str] = []
    for key, model in NAMED:
        _apply_named(session, key, model, document.get(key, []), changes)
    session.flush()
    for position, item in enumerate(document.get("categories", [])):
        row = session.get(Category, item["code"])
        values = {
            "name_fi": item.get("fi"),
            "name_en": item.get("en"),
            "default_class": item.get("default_class"),
            "default_type": item.get("default_type"),
            "allow_selection": item.get("allow_selection"),
            "sales_target": item.get("sales_target"),
        }
        for ref, model in (("default_class", EventClass), ("default_type", EventType)):
            if values[ref] is not None and session.get(model, values[ref]) is None:
                raise BadInput(f"category {item['code']}: unknown {ref} {values[ref]!r}")
        if row is None:
            missing = [k for k, v in values.items() if v is None]
            if missing:
                raise BadInput(f"new category {item['code']} needs {', '.join(missing)}")
            session.add(Category(code=item["code"], position=position, **values))
            changes.append(f"add category {item['code']}")
            continue
        for attr, value in values.items():
            if value is not None and getattr(row, attr) != value:
                changes.append(f"category {row.code}: {attr} {getattr(row, attr)!r} -> {value!r}")
                setattr(row, attr, value)
    session.flush()
    return changes
